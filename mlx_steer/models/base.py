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
from ..steer import EMBEDDING, NEVER, Steer


class LayerPlan:
    """The steering terms of one layer for one request or one batch.

    Terms are applied in the documented order (see `mlx_steer.steer`): every
    addition, then every cap, then every ablation. All arrays have a row axis
    (B or 1); a row without a term in some slot gets a zero delta / zero unit
    vector there, which leaves its hidden state bit-identical.

    - add:    (delta (B, 1, D), start (B, 1), end (B, 1))
    - cap:    (unit (B, 1, D), cap (B, 1, 1), start, end)
    - ablate: (unit (B, 1, D), start, end)
    `start <= p < end` selects the absolute positions p of each row.
    """

    def __init__(self, terms: list[tuple[mx.array, mx.array, mx.array]],
                 caps: list[tuple[mx.array, mx.array, mx.array, mx.array]] | None = None,
                 ablations: list[tuple[mx.array, mx.array, mx.array]] | None = None):
        self.terms = terms
        self.caps = caps or []
        self.ablations = ablations or []

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


class SteerMixin:
    """Adds the cache's steering plan to the block output; optionally records it."""

    _base_block: type

    def __call__(self, x, mask=None, cache=None, *args, **kwargs):
        plan = getattr(cache, "steer", None)
        pre = getattr(cache, "pre_steer", None)  # the embedding output (block 0 only)
        capture = getattr(cache, "capture", None)
        if plan is not None or pre is not None:
            # Read before the call: attention advances cache.offset.
            pos = positions(cache.offset, x.shape[1])
        if pre is not None:
            x = pre.apply(x, pos)
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
        plans[layer] = LayerPlan(slots.get("add", []), slots.get("cap", []),
                                 slots.get("ablate", []))
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
    if plans and EMBEDDING in plans:
        caches[0].pre_steer = plans[EMBEDDING]
    return caches


def new_kv_cache() -> KVCache:
    return KVCache()
