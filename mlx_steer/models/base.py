"""The one module that touches mlx-lm internals: block subclasses, caches, positions.

Steering is installed by swapping each decoder block's `__class__` to a
subclass that adds the request's vectors to the block output. The vectors
travel on the request's KV cache objects (`cache.steer`), never on the
shared model, so concurrent requests and interleaved generators each see
only their own steering. Parameter names, weight loading, `make_cache` and
`generate_step` are untouched because the block object itself is unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

from ..errors import UnsupportedModelError
from ..steer import NEVER, Steer


class LayerPlan:
    """The steering terms of one layer for one request or one batch.

    Each term is (delta (B|1, 1, D) float32, start (B|1, 1), end (B|1, 1)):
    `delta` is added at absolute positions start <= p < end of each row.
    """

    def __init__(self, terms: list[tuple[mx.array, mx.array, mx.array]]):
        self.terms = terms

    def apply(self, h: mx.array, pos: mx.array) -> mx.array:
        for delta, start, end in self.terms:
            sel = (pos >= start) & (pos < end)
            # The vector is cast to the stream's dtype: an fp32 vector would
            # otherwise promote every later layer and the KV cache.
            h = h + sel[..., None].astype(h.dtype) * delta.astype(h.dtype)
        return h


def positions(offset: Any, length: int) -> mx.array:
    """Absolute positions of the `length` new tokens: (1, L) or (B, L)."""
    if isinstance(offset, int):
        return mx.arange(offset, offset + length)[None]
    return offset[:, None] + mx.arange(length)[None]


class SteerMixin:
    """Adds the cache's steering plan to the block output; optionally records it."""

    _base_block: type

    def __call__(self, x, mask=None, cache=None, *args, **kwargs):
        plan = getattr(cache, "steer", None)
        capture = getattr(cache, "capture", None)
        if plan is not None:
            # Read before the call: attention advances cache.offset.
            pos = positions(cache.offset, x.shape[1])
        h = super().__call__(x, mask, cache, *args, **kwargs)
        if plan is not None:
            h = plan.apply(h, pos)
        if capture is not None:
            capture.append(h)
        return h


_REGISTRY: dict[type, type] = {}


def register(base: type, steered: type) -> None:
    """Declare `steered` as the steering subclass of mlx-lm block class `base`."""
    _REGISTRY[base] = steered


def _steered_class(cls: type) -> type:
    if issubclass(cls, SteerMixin):
        return cls
    if cls in _REGISTRY:
        return _REGISTRY[cls]
    params = list(inspect.signature(cls.__call__).parameters)[1:]
    if len(params) < 3 or params[2] != "cache":
        raise UnsupportedModelError(
            f"{cls.__module__}.{cls.__name__} is not a decoder block called as "
            "(x, mask, cache); mlx-steer cannot steer this architecture"
        )
    steered = type(f"Steered{cls.__name__}", (SteerMixin, cls), {"_base_block": cls})
    register(cls, steered)
    return steered


def decoder_layers(model: nn.Module) -> list:
    layers = getattr(model, "layers", None)
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `layers`: not an mlx-lm decoder model"
        )
    return list(layers)


def _stage(model: nn.Module):
    """mlx-lm's pipeline stage state (`PipelineMixin`) when the model is pipelined."""
    inner = getattr(model, "model", None)
    return inner if getattr(inner, "pipeline_size", 1) > 1 else None


def num_layers(model: nn.Module) -> int:
    """Decoder blocks of the whole model (a pipeline stage runs only some of them)."""
    if _stage(model) is not None:
        return int(model.args.num_hidden_layers)
    return len(decoder_layers(model))


def layer_span(model: nn.Module) -> range:
    """Indices of the blocks this process runs: all, or a pipeline stage's slice."""
    stage = _stage(model)
    if stage is not None:
        return range(stage.start_idx, stage.end_idx)
    return range(len(decoder_layers(model)))


def install(model: nn.Module) -> nn.Module:
    """Make every decoder block of `model` steerable (in place; idempotent)."""
    for layer in decoder_layers(model):
        layer.__class__ = _steered_class(type(layer))
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Restore mlx-lm's own block classes (in place)."""
    for layer in decoder_layers(model):
        if isinstance(layer, SteerMixin):
            layer.__class__ = type(layer)._base_block
    return model


SHARDINGS = ("auto", "tensor", "pipeline")


def sharding_kind(model: nn.Module, sharding: str = "auto") -> str:
    """"tensor" or "pipeline": what mlx-lm can do for this model ("auto": tensor
    parallelism where the model has it, else pipeline stages)."""
    from ..errors import InvalidArgumentError

    if sharding not in SHARDINGS:
        raise InvalidArgumentError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    tensor = callable(getattr(model, "shard", None))
    pipeline = callable(getattr(getattr(model, "model", None), "pipeline", None))
    if sharding == "auto":
        sharding = "tensor" if tensor else "pipeline"
    if not (tensor if sharding == "tensor" else pipeline):
        raise UnsupportedModelError(
            f"mlx-lm has no {sharding} sharding for {type(model).__module__} "
            f"(tensor: {'yes' if tensor else 'no'}, pipeline: {'yes' if pipeline else 'no'})")
    return sharding


def shard_problem(model: nn.Module, n: int, sharding: str = "tensor") -> str | None:
    """Why `model` cannot be sharded over `n` ranks by mlx-lm, or None if it can.

    mlx-lm's `shard(group)` splits attention heads, KV heads and the MLP's inner
    width evenly across the ranks, and its `pipeline(group)` gives each rank at
    least one block; neither checks.
    """
    if sharding == "pipeline":
        total = num_layers(model)
        return None if total >= n else f"its {total} blocks cannot make {n} pipeline stages"
    if not callable(getattr(model, "shard", None)):
        return f"mlx-lm has no tensor-parallel sharding for {type(model).__module__}"
    args = getattr(model, "args", None)
    for field in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(args, field, None)
        if isinstance(value, int) and value % n:
            return (f"its {field} ({value}) is not divisible by {n} ranks; "
                    "use a number of ranks that divides it")
    return None


def shard(model: nn.Module, group, sharding: str = "auto") -> nn.Module:
    """Shard `model` in place over `group` with mlx-lm's own sharding.

    Tensor parallel: every block's output is the full residual stream on every
    rank (the row-sharded projections end in an all-reduce), so each rank adds
    the same steering vectors there. Pipeline: a rank runs a slice of the
    blocks and steers those (see `layer_span`); captured block outputs are
    shared between the stages by `captured`.
    """
    kind = sharding_kind(model, sharding)
    problem = shard_problem(model, group.size(), kind)
    if problem:
        raise UnsupportedModelError(f"cannot shard this model: {problem}")
    if kind == "tensor":
        model.shard(group)
    else:
        model.model.pipeline(group)
    mx.eval(model.parameters())
    return install(model)


def build_plans(rows: Sequence[Sequence[Steer]], prompt_lens: Sequence[int]
                ) -> dict[int, LayerPlan]:
    """Per-layer plans for a batch: row i gets `rows[i]` (strength 0 is skipped)."""
    B = len(rows)
    by_layer: dict[int, list[list[Steer]]] = {}
    for i, steers in enumerate(rows):
        for s in steers:
            if s.strength == 0.0:
                continue
            by_layer.setdefault(s.layer, [[] for _ in range(B)])[i].append(s)
    plans = {}
    for layer, per_row in by_layer.items():
        terms = []
        for k in range(max(len(r) for r in per_row)):
            D = next(r[k].vector.shape[0] for r in per_row if len(r) > k)
            delta = np.zeros((B, 1, D), np.float32)
            start = np.full((B, 1), NEVER, np.int32)
            end = np.full((B, 1), NEVER, np.int32)
            for i, r in enumerate(per_row):
                if len(r) > k:
                    delta[i, 0] = r[k].delta
                    start[i, 0], end[i, 0] = r[k].window(prompt_lens[i])
            terms.append((mx.array(delta), mx.array(start), mx.array(end)))
        plans[layer] = LayerPlan(terms)
    return plans


def make_caches(model: nn.Module, plans: dict[int, LayerPlan] | None = None,
                left_padding: Sequence[int] | None = None,
                capture: bool = False) -> list:
    """A fresh per-request cache list carrying the steering plans.

    With `left_padding`, one `BatchKVCache` per layer for a left-padded batch.
    With `capture`, each cache records its block's (steered) output in
    `cache.capture`.
    """
    if left_padding is None:
        caches = make_prompt_cache(model)
    else:
        caches = [BatchKVCache(list(left_padding)) for _ in decoder_layers(model)]
    for layer, c in zip(layer_span(model), caches):
        if plans and layer in plans:
            c.steer = plans[layer]
        if capture:
            c.capture = []
    return caches


def watch(model: nn.Module, caches: list, layers) -> None:
    """Make the caches of blocks `layers` (the ones this process runs) record their output."""
    span = layer_span(model)
    for layer in layers:
        if layer in span:
            caches[layer - span.start].capture = []


def captured(model: nn.Module, caches: list, layers, out: mx.array, group=None
             ) -> dict[int, mx.array]:
    """The recorded (first) output of each block of `layers`, float32 (B, T, D);
    `out` is the forward pass's output (B, T, ...).

    A pipeline stage records only its own blocks: the stages add their records,
    zeros elsewhere, with one all-reduce over `group`, so every rank gets every
    block's output exactly. That all-reduce is made to wait for `out`: the
    stages' send/receive must come first on every rank, or they wait on each
    other.
    """
    span, layers = layer_span(model), list(layers)
    if _stage(model) is None or not layers:
        return {layer: caches[layer].capture[0].astype(mx.float32) for layer in layers}
    zeros = mx.zeros((*out.shape[:2], int(model.args.hidden_size)), mx.float32)
    stack = mx.stack([caches[layer - span.start].capture[0].astype(mx.float32)
                      if layer in span else zeros for layer in layers])
    stack = mx.depends(stack, out)
    total = mx.distributed.all_sum(stack, group=group, stream=mx.cpu)
    return {layer: total[i] for i, layer in enumerate(layers)}


def wait_for_generation() -> None:
    """Wait for the step mlx-lm's `generate_step` computes ahead on its own stream.

    A generator that stops leaves that step pending; on a sharded model its
    collectives would then run concurrently with the next call's, in an order
    that differs between ranks, and mix their data.
    """
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)


def new_kv_cache() -> KVCache:
    return KVCache()


# ---- continuous batching: rows join and leave a running batch ----------------------


def attach_plans(caches: list, plans: dict[int, LayerPlan]) -> None:
    """Give each layer's cache its plan (or none): after rows joined or left."""
    for i, c in enumerate(caches):
        c.steer = plans.get(i)


def as_batch_row(caches: list) -> list:
    """A lone request's per-layer `KVCache`s (after its prefill) as one-row
    `BatchKVCache`s, ready to join a running batch. Offsets stay the row's own."""
    return [BatchKVCache.merge([c]) for c in caches]


def join_batch(running: list | None, new: list) -> list:
    """Append the rows of batch caches `new` to `running` (in place; None: start one).

    mlx-lm pads the shorter side on the left; each row's `offset` (its absolute
    position) is kept, so steering windows stay per row.
    """
    if running is None:
        return new
    for c, n in zip(running, new):
        c.extend(n)
    return running


def keep_rows(caches: list, rows: Sequence[int]) -> list | None:
    """Keep only batch rows `rows` (in place); None when no row is left."""
    if not rows:
        return None
    idx = mx.array(list(rows), dtype=mx.int32)
    for c in caches:
        c.filter(idx)
    return caches

