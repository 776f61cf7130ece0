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


class SteerAttentionMixin:
    """Applies the cache's mid-block ablations to an attention module's output."""

    _base_block: type

    def __call__(self, x, mask=None, cache=None, *args, **kwargs):
        plan = getattr(cache, "steer", None)
        if plan is None or not plan.mid:
            return super().__call__(x, mask, cache, *args, **kwargs)
        pos = positions(cache.offset, x.shape[1])  # before attention advances the offset
        return plan.apply_mid(super().__call__(x, mask, cache, *args, **kwargs), pos)


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
    steered = type(f"Steered{cls.__name__}", (mixin, cls), {"_base_block": cls})
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


def install(model: nn.Module) -> nn.Module:
    """Make every decoder block of `model` steerable (in place; idempotent)."""
    for layer in decoder_layers(model):
        layer.__class__ = _steered_class(type(layer))
        attn = _attention(layer)
        if attn is not None:
            attn.__class__ = _steered_class(type(attn), SteerAttentionMixin)
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Restore mlx-lm's own block classes (in place)."""
    for layer in decoder_layers(model):
        if isinstance(layer, SteerMixin):
            layer.__class__ = type(layer)._base_block
        attn = getattr(layer, "self_attn", None)
        if isinstance(attn, SteerAttentionMixin):
            attn.__class__ = type(attn)._base_block
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
    layers = decoder_layers(model)
    for i, c in enumerate(caches):
        if plans and i in plans:
            c.steer = plans[i]
            if plans[i].mid and not isinstance(getattr(layers[i], "self_attn", None),
                                               SteerAttentionMixin):
                raise UnsupportedModelError(
                    f"block {i} of {type(model).__name__} has no steerable self_attn "
                    "called as (x, mask, cache): cannot ablate in the middle of the block")
        if capture:
            c.capture = []
    if plans and EMBEDDING in plans:
        caches[0].pre_steer = plans[EMBEDDING]
    return caches


def new_kv_cache() -> KVCache:
    return KVCache()


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
