"""The one module that touches mlx-lm internals: block subclasses, caches, positions.

Steering is installed by swapping each decoder block's `__class__` to a
subclass that adds the request's vectors to the block output. The vectors
travel on the request's KV cache objects (`cache.steer`), never on the
shared model, so concurrent requests and interleaved generators each see
only their own steering. Parameter names, weight loading, `make_cache` and
`generate_step` are untouched because the block object itself is unchanged.
"""

from __future__ import annotations

import functools
import inspect
import threading
import types
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import base as mlx_base
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from ..errors import InvalidArgumentError, UnsupportedModelError
from ..steer import EMBEDDING, NEVER, Steer
from . import attention


class LayerPlan:
    """The steering terms of one layer for one request or one batch.

    Terms are applied in the documented order (see `mlx_steer.steer`): every
    addition, then every cap, then every ablation. All arrays have a row axis
    (B or 1); a row without a term in some slot gets a zero delta / zero unit
    vector there, which leaves its hidden state bit-identical.

    - add:    (delta (B, 1, D), start (B, 1), end (B, 1))
    - cap:    (unit (B, 1, D), cap (B, 1, 1), start, end)
    - ablate: (unit (B, 1, D), start, end)
    `start <= p < end` selects the absolute positions p of each row. `mid`
    holds the ablations (`Steer.mid`) applied to the block's attention output,
    i.e. to the stream in the middle of the block.
    """

    def __init__(self, terms: list[tuple[mx.array, mx.array, mx.array]],
                 caps: list[tuple[mx.array, mx.array, mx.array, mx.array]] | None = None,
                 ablations: list[tuple[mx.array, mx.array, mx.array]] | None = None,
                 mid: list[tuple[mx.array, mx.array, mx.array]] | None = None):
        self.terms = terms
        self.caps = caps or []
        self.ablations = ablations or []
        self.mid = mid or []

    def apply_mid(self, r: mx.array, pos: mx.array) -> mx.array:
        """Ablate the `mid` directions from an attention output `r`.

        The block's input has no component along them (it was ablated at the
        previous block's output or the embedding), so projecting what attention
        writes is projecting the stream in the middle of the block.
        """
        for unit, start, end in self.mid:
            sel = ((pos >= start) & (pos < end))[..., None]
            r = r - (sel * _along(r, unit) * unit).astype(r.dtype)
        return r

    def apply(self, h: mx.array, pos: mx.array) -> mx.array:
        for delta, start, end in self.terms:
            sel = (pos >= start) & (pos < end)
            # The vector is cast to the stream's dtype: an fp32 vector would
            # otherwise promote every later layer and the KV cache.
            h = h + sel[..., None].astype(h.dtype) * delta.astype(h.dtype)
        for unit, cap, start, end in self.caps:
            sel = ((pos >= start) & (pos < end))[..., None]
            excess = mx.maximum(_along(h, unit) - cap, 0.0)
            h = h - (sel * excess * unit).astype(h.dtype)
        for unit, start, end in self.ablations:
            sel = ((pos >= start) & (pos < end))[..., None]
            h = h - (sel * _along(h, unit) * unit).astype(h.dtype)
        return h


def _along(h: mx.array, unit: mx.array) -> mx.array:
    """The component h·v̂ per token, (B, T, 1), computed in float32."""
    return (h.astype(mx.float32) * unit).sum(axis=-1, keepdims=True)


def positions(offset: Any, length: int) -> mx.array:
    """Absolute positions of the `length` new tokens: (1, L) or (B, L)."""
    if isinstance(offset, int):
        return mx.arange(offset, offset + length)[None]
    return offset[:, None] + mx.arange(length)[None]


# MLX fuses a compiled function's elementwise operations into one CPU kernel that g++
# builds at run time. On Linux x86-64 every product and sum in it still rounds on its own,
# as MLX's separate operations do: without -march the target has no fma instruction, and
# the fast path's shim adds -march=native together with -ffp-contract=off. Elsewhere
# (clang on macOS; aarch64, whose baseline has fma) a compiler may fuse a * b + c into one
# rounding, so there the composed operations are kept.
_EXACT_FUSION = attention.LINUX_X86_64


def _fusing() -> bool:
    """Whether this call may take a fused kernel: MLX's CPU device where fusion is exact."""
    return _EXACT_FUSION and mx.default_device() == mx.cpu


def _rotation(x1, x2, cos, sin):
    """The CPU fallback of `mx.fast.rope`'s rotation, in its order."""
    return x1 * cos - x2 * sin, x1 * sin + x2 * cos


# Fewer operations per decode step: on the CPU a step's time is largely MLX's cost per
# operation (see FusedRMSNorm).
_rotated = mx.compile(_rotation, shapeless=True)


class FusedRMSNorm(nn.RMSNorm):
    """nn.RMSNorm as one compiled function on MLX's CPU: the same bits, fewer operations.

    On the CPU `mx.fast.rms_norm` has no kernel: MLX composes it from ~11 operations, and a
    decode step of SmolLM2 calls it 61 times. Compiled, its elementwise tail (the mean's
    scale, + eps, rsqrt and the two products) is one fused kernel. With the rotation of
    SharedRoPE fused too, a 1-row step of SmolLM2 has 2,561 operations instead of 3,468
    (docs/BENCHMARKS.md). Elsewhere it is nn.RMSNorm.
    """

    def __call__(self, x):
        if not _fusing():
            return super().__call__(x)
        return _fused_rms_norm(self.eps)(x, self["weight"])


@functools.lru_cache(maxsize=None)  # one compiled function per epsilon (a model has one)
def _fused_rms_norm(eps: float):
    return mx.compile(lambda x, w: mx.fast.rms_norm(x, w, eps), shapeless=True)


class SharedRoPE(nn.RoPE):
    """mlx's RoPE with its cosines and sines computed once per step, not once per call.

    On the CPU `mx.fast.rope` has no kernel: MLX composes it from ~33 operations, most of
    them building the cosine and sine tables of the positions, and a decode step calls it
    for the queries and keys of every block (60 calls for SmolLM2: about 45% of a step's
    MLX operations). Here the tables are built by `mx.fast.rope` itself, on a probe of ones
    and zeros (rotating (1, 0) gives (cos, sin), each exactly: 1 * c - 0 * s = c), once per
    offset and length, and every call applies them with the fallback's own operations in
    its order, so the result is the same bit for bit (`tests/test_core.py`); where fusion is
    exact, that rotation is one fused kernel. Elsewhere (a GPU, another input rank) it is
    `nn.RoPE`.
    """

    def __call__(self, x, offset=0):
        if x.ndim != 4 or mx.default_device() != mx.cpu:
            return super().__call__(x, offset)
        B, N, T, D = x.shape
        cos, sin = self._table(T, offset, x.dtype)
        d = self.dims
        if self.traditional:
            x1, x2 = x[..., 0:d:2], x[..., 1:d:2]
        else:
            x1, x2 = x[..., : d // 2], x[..., d // 2: d]
        o1, o2 = (_rotated if _EXACT_FUSION else _rotation)(x1, x2, cos, sin)  # on the CPU
        if self.traditional:
            out = mx.concatenate([o1[..., None], o2[..., None]], axis=-1).reshape(B, N, T, d)
            return mx.concatenate([out, x[..., d:]], axis=-1) if d < D else out
        return mx.concatenate([o1, o2, x[..., d:]] if d < D else [o1, o2], axis=-1)

    def _table(self, T: int, offset, dtype) -> tuple[mx.array, mx.array]:
        # Keyed by the offset's value (an int) or by the array itself (a batch's offsets:
        # the queries and keys of a block share it), which the entry keeps alive so that
        # its id cannot be reused while the entry stands.
        key = (offset if isinstance(offset, int) else id(offset), T, dtype, self.dims,
               self.base, self.scale)
        memo = _rope_memo()
        hit = memo.get(key)
        if hit is not None:
            return hit[1]
        rows = offset.size if isinstance(offset, mx.array) and offset.size > 1 else 1
        probe = mx.broadcast_to(mx.array([1.0, 0.0], dtype), (rows, 1, T, self.dims // 2, 2))
        t = mx.fast.rope(probe.reshape(rows, 1, T, self.dims), self.dims, traditional=True,
                         base=self.base, scale=self.scale, offset=offset)
        table = (t[..., 0::2], t[..., 1::2])
        if len(memo) >= 16:  # a few steps' worth; older offsets do not come back
            memo.clear()
        memo[key] = (offset, table)
        return table


_ROPE_MEMO = threading.local()


def _rope_memo() -> dict:
    """This thread's tables (each thread builds its own requests' graphs)."""
    memo = getattr(_ROPE_MEMO, "tables", None)
    if memo is None:
        memo = _ROPE_MEMO.tables = {}
    return memo


def _attend(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's `scaled_dot_product_attention`, through `attention.attention` (the same
    bits, a vectorised softmax) where that applies."""
    if sinks is None and not hasattr(cache, "bits") \
            and attention.applies(queries, keys, values, mask):
        return attention.attention(queries, keys, values, scale, mask)
    return mlx_base.scaled_dot_product_attention(queries, keys, values, cache=cache,
                                                 scale=scale, mask=mask, sinks=sinks)


def _attending(call):
    """A copy of an attention module's `__call__` that calls `_attend` where it called
    mlx-lm's `scaled_dot_product_attention`; None when it does not call that function.

    The copy runs the same code with its module's globals (as they are when the class is
    made steerable) but that one name, so that only steered models take the other route;
    mlx-lm's module and its plain models are left as they are.
    """
    name = "scaled_dot_product_attention"
    if not isinstance(call, types.FunctionType) or name not in call.__code__.co_names \
            or call.__globals__.get(name) is not mlx_base.scaled_dot_product_attention:
        return None
    copy = types.FunctionType(call.__code__, {**call.__globals__, name: _attend},
                              call.__name__, call.__defaults__, call.__closure__)
    copy.__kwdefaults__ = call.__kwdefaults__
    return copy


class SteerAttentionMixin:
    """Applies the cache's mid-block ablations to an attention module's output, and
    attends through `_attend` (see `_attending`)."""

    _base_block: type
    _attend_call = None  # the base class's __call__ through `_attend`, where it applies

    def __call__(self, x, mask=None, cache=None, *args, **kwargs):
        plan = getattr(cache, "steer", None)
        if plan is not None and plan.mid:
            pos = positions(cache.offset, x.shape[1])  # before attention advances the offset
        call = self._attend_call or super().__call__
        out = call(x, mask, cache, *args, **kwargs)
        return plan.apply_mid(out, pos) if plan is not None and plan.mid else out


class Grow:
    """Rows that leave the unsteered trunk (batch row 0) at a block's output, in a
    prefill shared by layer: each new row is a copy of the trunk's output with its own
    terms of that block applied (`plans[k]`, None: no term there), appended after the
    rows already in the batch; `drop` then removes the trunk."""

    def __init__(self, plans: list[LayerPlan | None], drop: bool):
        self.plans = plans
        self.drop = drop

    def apply(self, h: mx.array, pos: mx.array) -> mx.array:
        trunk, at = h[:1], pos[:1]
        new = [trunk if p is None else p.apply(trunk, at) for p in self.plans]
        return mx.concatenate([h[1:] if self.drop else h, *new])


class SteerMixin:
    """Adds the cache's steering plan to the block output; optionally records it."""

    _base_block: type

    def __call__(self, x, mask=None, cache=None, *args, **kwargs):
        plan = getattr(cache, "steer", None)
        pre = getattr(cache, "pre_steer", None)  # the embedding output (block 0 only)
        capture = getattr(cache, "capture", None)
        grow = getattr(cache, "grow", None)  # rows leaving the trunk (shared prefill)
        if plan is not None or pre is not None or grow is not None:
            # Read before the call: attention advances cache.offset.
            pos = positions(cache.offset, x.shape[1])
        if pre is not None:
            x = pre.apply(x, pos)
        h = super().__call__(x, mask, cache, *args, **kwargs)
        if plan is not None:
            h = plan.apply(h, pos)
        if grow is not None:
            h = grow.apply(h, pos)
        if capture is not None:
            capture.append(h)
        return h


_REGISTRY: dict[type, type] = {}


def register(base: type, steered: type) -> None:
    """Declare `steered` as the steering subclass of mlx-lm block class `base`."""
    _REGISTRY[base] = steered


def _takes_cache(cls: type) -> bool:
    params = list(inspect.signature(cls.__call__).parameters)[1:]
    return len(params) >= 3 and params[2] == "cache"


def _steered_class(cls: type, mixin: type = SteerMixin) -> type:
    if issubclass(cls, mixin):
        return cls
    if cls in _REGISTRY:
        return _REGISTRY[cls]
    if not _takes_cache(cls):
        raise UnsupportedModelError(
            f"{cls.__module__}.{cls.__name__} is not a decoder block called as "
            "(x, mask, cache); mlx-steer cannot steer this architecture"
        )
    extra = {"_attend_call": _attending(cls.__call__)} if mixin is SteerAttentionMixin else {}
    steered = type(f"Steered{cls.__name__}", (mixin, cls), {"_base_block": cls, **extra})
    register(cls, steered)
    return steered


def _attention(layer):
    """The block's attention module when it is called as (x, mask, cache), else None."""
    attn = getattr(layer, "self_attn", None)
    if isinstance(attn, nn.Module) and (isinstance(attn, SteerAttentionMixin)
                                        or _takes_cache(type(attn))):
        return attn
    return None


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
    """Make every decoder block of `model` steerable (in place; idempotent), with the
    CPU's shared RoPE tables and fused RMSNorms (the same bits)."""
    layers = decoder_layers(model)  # not a decoder: an error, and nothing changed
    for m in model.modules():  # where fusion is exact: elsewhere it would only add a call
        if _EXACT_FUSION and type(m) is nn.RMSNorm:  # exactly: other norms differ
            m.__class__ = FusedRMSNorm
    for layer in layers:
        layer.__class__ = _steered_class(type(layer))
        attn = _attention(layer)
        if attn is not None:
            attn.__class__ = _steered_class(type(attn), SteerAttentionMixin)
        rope = getattr(getattr(layer, "self_attn", None), "rope", None)
        if type(rope) is nn.RoPE:  # exactly: scaled variants compute other tables
            rope.__class__ = SharedRoPE
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Restore mlx-lm's own block classes (in place)."""
    for m in model.modules():
        if type(m) is FusedRMSNorm:
            m.__class__ = nn.RMSNorm
    for layer in decoder_layers(model):
        if isinstance(layer, SteerMixin):
            layer.__class__ = type(layer)._base_block
        attn = getattr(layer, "self_attn", None)
        if isinstance(attn, SteerAttentionMixin):
            attn.__class__ = type(attn)._base_block
        rope = getattr(attn, "rope", None)
        if type(rope) is SharedRoPE:
            rope.__class__ = nn.RoPE
    return model


SHARDINGS = ("auto", "tensor", "pipeline")


def sharding_kind(model: nn.Module, sharding: str = "auto") -> str:
    """"tensor" or "pipeline": what mlx-lm can do for this model ("auto": tensor
    parallelism where the model has it, else pipeline stages)."""
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
    """Per-layer plans for a batch: row i gets `rows[i]` (steers with int layers;
    additions of strength 0 are skipped). Key -1 is the embedding output."""
    B = len(rows)
    by_layer: dict[int, dict[str, list[list[Steer]]]] = {}
    for i, steers in enumerate(rows):
        for s in steers:
            if s.is_noop:
                continue
            ops = by_layer.setdefault(s.layer, {})
            ops.setdefault(s.op, [[] for _ in range(B)])[i].append(s)
    plans = {}
    for layer, ops in by_layer.items():
        slots = {op: _slots(per_row, prompt_lens, op) for op, per_row in ops.items()}
        mid = [[s for s in r if s.mid] for r in ops.get("ablate", [])]
        plans[layer] = LayerPlan(slots.get("add", []), slots.get("cap", []),
                                 slots.get("ablate", []),
                                 _slots(mid, prompt_lens, "ablate") if any(mid) else [])
    return plans


def _slots(per_row: list[list[Steer]], prompt_lens: Sequence[int], op: str) -> list[tuple]:
    """Batched terms of one op: slot k holds every row's k-th steer of that op."""
    B = len(per_row)
    out = []
    for k in range(max(len(r) for r in per_row)):
        D = next(r[k].vector.shape[0] for r in per_row if len(r) > k)
        vec = np.zeros((B, 1, D), np.float32)
        cap = np.zeros((B, 1, 1), np.float32)
        start = np.full((B, 1), NEVER, np.int32)
        end = np.full((B, 1), NEVER, np.int32)
        for i, r in enumerate(per_row):
            if len(r) > k:
                vec[i, 0] = r[k].delta if op == "add" else r[k].unit
                cap[i] = r[k].cap if op == "cap" else 0.0
                start[i, 0], end[i, 0] = r[k].window(prompt_lens[i])
        vec, start, end = mx.array(vec), mx.array(start), mx.array(end)
        out.append((vec, mx.array(cap), start, end) if op == "cap" else (vec, start, end))
    return out


def _check_mid(model: nn.Module, local: int, layer: int, plan: LayerPlan) -> None:
    if plan.mid and not isinstance(getattr(decoder_layers(model)[local], "self_attn", None),
                                   SteerAttentionMixin):
        raise UnsupportedModelError(
            f"block {layer} of {type(model).__name__} has no steerable self_attn "
            "called as (x, mask, cache): cannot ablate in the middle of the block")


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
    for local, (layer, c) in enumerate(zip(layer_span(model), caches)):
        if plans and layer in plans:
            c.steer = plans[layer]
            _check_mid(model, local, layer, plans[layer])
        if capture:
            c.capture = []
    if plans and EMBEDDING in plans:
        caches[0].pre_steer = plans[EMBEDDING]
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


class ResidualWriters:
    """Parameter names of the weights that write into the residual stream.

    `embedding`: the token embedding; `blocks[i]`: the attention output and MLP
    down projections of block i (their outputs are summed into the stream);
    `mlp_biases[i]`: the MLP's bias names and sizes, when the architecture's
    config can switch MLP biases on (`mlp_bias`, llama family), else None.
    """

    def __init__(self, model: nn.Module):
        if not hasattr(getattr(model, "model", None), "embed_tokens"):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no model.embed_tokens: cannot fold steering "
                "into its weights")
        self.embedding = "model.embed_tokens.weight"
        self.blocks: list[list[str]] = []
        self.mlp_biases: list[dict[str, int]] | None = (
            [] if hasattr(model.args, "mlp_bias") else None)
        for i, layer in enumerate(decoder_layers(model)):
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            o_proj, down = getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)
            if not isinstance(o_proj, nn.Module) or not isinstance(down, nn.Module):
                raise UnsupportedModelError(
                    f"block {i} of {type(model).__name__} has no self_attn.o_proj and "
                    "mlp.down_proj: cannot fold steering into its weights")
            prefix = f"model.layers.{i}"
            self.blocks.append([f"{prefix}.self_attn.o_proj", f"{prefix}.mlp.down_proj"])
            if self.mlp_biases is not None:
                projs = {n: getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")}
                if any(p is None for p in projs.values()):
                    self.mlp_biases = None
                else:
                    self.mlp_biases.append({f"{prefix}.mlp.{n}.bias": int(p.weight.shape[0])
                                            for n, p in projs.items()})
        quantised = (nn.QuantizedLinear, nn.QuantizedEmbedding)
        if any(isinstance(m, quantised) for _, m in model.named_modules()):
            raise UnsupportedModelError(
                "the model's weights are quantised: load it with float weights "
                "(GGUF: dequantize=True, the CPU default) to fold steering into them")
        self.tied = bool(getattr(model.args, "tie_word_embeddings", False))


def addition_caches(model: nn.Module, layer: int, delta: mx.array, start: int = 1) -> list:
    """Fresh caches adding `delta` (an mx array, (D,) for every row or (B, D) one per
    row; it may be traced by autodiff) to block `layer`'s output at absolute
    positions >= `start`."""
    delta = delta.reshape(-1, 1, delta.shape[-1])
    plan = LayerPlan([(delta, mx.array([[start]]), mx.array([[NEVER]]))])
    return make_caches(model, {layer: plan})


# ---- one offset array per step for every block of a batch ---------------------------


class _ClockedBatchKVCache(BatchKVCache):
    """A `BatchKVCache` whose blocks share their offset arrays (see `share_offsets`).

    Each block's cache advances its offset itself (`offset + n`); a block whose offset
    is the very array another block advanced by the same n takes that block's result
    instead of making its own: the same values, one array. SharedRoPE keys a batch's
    tables by that array, so a decode step then builds one table, not one per block.
    Anything else that rebinds an offset (trim, filter, extend) just ends the sharing.
    """

    clock: dict  # (id(offset before), n) -> (offset before, offset after), per batch

    def update_and_fetch(self, keys, values):
        before = self.offset
        out = super().update_and_fetch(keys, values)
        key = (id(before), keys.shape[2])
        hit = self.clock.get(key)
        if hit is not None and hit[0] is before:
            self.offset = hit[1]
        else:
            if len(self.clock) >= 8:  # a few steps back; the oldest first
                del self.clock[next(iter(self.clock))]
            self.clock[key] = (before, self.offset)  # holding `before` keeps its id
        return out


def share_offsets(caches: list) -> bool:
    """Make a batch's per-block caches share one offset array where their offsets are
    equal (they are after a prefill: every block saw the same positions), so that
    SharedRoPE builds a decode step's rotary tables once instead of once per block
    (measured on SmolLM2: 1.7 ms of a 21 ms step at 1 row, 2.5 ms at 8 rows). Returns
    whether it did; caches of other kinds, or unequal offsets, are left as they are."""
    if len(caches) < 2 or any(type(c) not in (BatchKVCache, _ClockedBatchKVCache)
                              for c in caches):
        return False
    first = caches[0]
    if any(c._idx != first._idx or c.offset.shape != first.offset.shape for c in caches):
        return False
    if not mx.all(mx.stack([c.offset for c in caches]) == first.offset).item():
        return False
    clock: dict = {}
    for c in caches:
        c.__class__ = _ClockedBatchKVCache
        c.offset, c.clock = first.offset, clock
    return True


# ---- continuous batching: rows join and leave a running batch ----------------------


def attach_plans(caches: list, plans: dict[int, LayerPlan]) -> None:
    """Give each layer's cache its plan (or none): after rows joined or left."""
    for i, c in enumerate(caches):
        c.steer = plans.get(i)
    if caches:
        caches[0].pre_steer = plans.get(EMBEDDING)


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


def fork_rows(caches: list, n: int) -> list:
    """`n` copies of the one row of batch caches `caches` (after a shared prefill)
    as new `n`-row batch caches; the original is left as it is."""
    return [BatchKVCache.merge([c.extract(0)] * n) for c in caches]


# ---- prefill shared by layer (rows steered from different blocks, one prompt) -------

TRUNK = -1  # the unsteered trunk row in `layer_shared_caches`' row lists


def shares_layers(model: nn.Module) -> bool:
    """Whether `layer_shared_caches` applies: every block steerable, all in this process."""
    return _stage(model) is None and all(isinstance(layer, SteerMixin)
                                         for layer in decoder_layers(model))


def layer_shared_caches(model: nn.Module, rows: Sequence[Sequence[Steer]],
                        diverge: Sequence[int | None], prompt_len: int
                        ) -> tuple[list, list[list[int]], list[int]]:
    """Caches for prefilling one prompt for `rows`, shared by layer.

    Row k is unsteered inside the prompt up to block `diverge[k]`'s output (None: through
    every block; see `prefix.divergence`; at least one row has a block). One trunk row
    enters block 0 alone; after block d the rows diverging there join the batch as
    copies of the trunk with their own terms of block d, and after the last of them the
    trunk leaves unless some row never diverges. Each block's cache holds the rows that
    enter it. Returns (caches, the rows entering each block, the rows out of the last
    block), rows named by their index in `rows`, the trunk by TRUNK.
    """
    last = max(d for d in diverge if d is not None)
    keep = any(d is None for d in diverge)
    present, caches, members = [TRUNK], [], []
    for layer in range(len(decoder_layers(model))):
        members.append(present)
        c = BatchKVCache([0] * len(present))
        at = [[s for s in ([] if r == TRUNK else rows[r]) if s.layer == layer]
              for r in present]
        plan = build_plans(at, [prompt_len] * len(present)).get(layer)
        if plan is not None:
            _check_mid(model, layer, layer, plan)
            c.steer = plan
        new = [k for k, d in enumerate(diverge) if d == layer]
        drop = layer == last and not keep
        if new or drop:
            c.grow = Grow([build_plans([[s for s in rows[k] if s.layer == layer]],
                                       [prompt_len]).get(layer) for k in new], drop)
        present = [r for r in present if not (drop and r == TRUNK)] + new
        caches.append(c)
    return caches, members, present


def spread_rows(caches: list, members: list[list[int]], diverge: Sequence[int | None]
                ) -> list:
    """The caches of `layer_shared_caches` after the prefill, as one batch row per row
    (in place): row k's keys and values at block l are its own when it had left the
    trunk before block l, else the trunk's (what row k computed there is bit for bit
    what the trunk did)."""
    for layer, (c, present) in enumerate(zip(caches, members)):
        idx = [present.index(k) if d is not None and d < layer else present.index(TRUNK)
               for k, d in enumerate(diverge)]
        c.filter(mx.array(idx, dtype=mx.int32))
        c.grow = None
    return caches


def keep_rows(caches: list, rows: Sequence[int]) -> list | None:
    """Keep only batch rows `rows`, in that order (in place); None when no row is left."""
    if not rows:
        return None
    idx = mx.array(list(rows), dtype=mx.int32)
    for c in caches:
        c.filter(idx)
    return caches

