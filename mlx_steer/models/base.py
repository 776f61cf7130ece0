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
    for i, c in enumerate(caches):
        if plans and i in plans:
            c.steer = plans[i]
        if capture:
            c.capture = []
    return caches


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


def fork_rows(caches: list, n: int) -> list:
    """`n` copies of the one row of batch caches `caches` (after a shared prefill)
    as new `n`-row batch caches; the original is left as it is."""
    return [BatchKVCache.merge([c.extract(0)] * n) for c in caches]


def keep_rows(caches: list, rows: Sequence[int]) -> list | None:
    """Keep only batch rows `rows`, in that order (in place); None when no row is left."""
    if not rows:
        return None
    idx = mx.array(list(rows), dtype=mx.int32)
    for c in caches:
        c.filter(idx)
    return caches

