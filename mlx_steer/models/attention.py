"""Scaled dot-product attention on the CPU, bit for bit MLX's, with a vectorised softmax.

On the CPU `mx.fast.scaled_dot_product_attention` has no kernel: MLX composes it from
a matrix product, a mask, `softmax` and a second product. MLX's Linux CPU build has no
SIMD types (one float per "vector"), so its softmax calls a scalar `exp` per score, and
each of those calls libm's `fmaf` six times. With 8 rows that softmax is ~40% of the
attention's time (a decode step of SmolLM2: 8 x 9 heads x ~60 scores, in 30 blocks).

`attention` does what MLX's fallback does, in its order and with its operations, except
that the softmax is written as its own steps (`softmax`): the row maximum, `exp(s - max)`
as a compiled kernel (compiled kernels are vectorised: see `mlx_steer.fastpath`), the
row sum, and the product with `1 / sum`. MLX's softmax does exactly these float
operations, each correctly rounded, and sums in the same order (left to right: with one
float per vector its reductions are sequential), so every output bit is the same
(`tests/test_attention.py`). That holds where MLX has no SIMD types for floats, so
`applies` is true only on Linux x86-64, on the CPU, for float32, and where there are
enough scores for the extra operations to pay (decoding a single row stays on MLX's).
"""

from __future__ import annotations

import platform
import sys

import mlx.core as mx

from ..fastpath import rows_alone

# Fewer scores than this (batch x query heads x queries x keys) stay on MLX's own
# function: there its single softmax costs less than the four operations here
# (measured: break-even at 2 rows x 9 heads x 60 keys, a gain of ~30% from 8 rows).
MIN_SCORES = 2048

# MLX's CPU build on Linux x86-64: where its floats are sequential here, and where its
# compiled kernels round every operation on its own (models/base.py, _EXACT_FUSION)
LINUX_X86_64 = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
_SEQUENTIAL_FLOATS = LINUX_X86_64

# masks MLX takes with float32 scores: boolean (where), or additive in a type that promotes
_MASK_TYPES = (mx.bool_, mx.float32, mx.float16, mx.bfloat16)

_shifted_exp = mx.compile(lambda s, m: mx.exp(s - m), shapeless=True)
_normalised = mx.compile(lambda e, total: e * (1 / total), shapeless=True)


def softmax(scores: mx.array) -> mx.array:
    """`mx.softmax(scores, axis=-1, precise=True)`, bit for bit where `applies` holds."""
    e = _shifted_exp(scores, mx.max(scores, axis=-1, keepdims=True))
    return _normalised(e, mx.sum(e, axis=-1, keepdims=True))


def applies(queries: mx.array, keys: mx.array, values: mx.array, mask) -> bool:
    """Whether `attention` both equals MLX's function here and is faster."""
    if not _SEQUENTIAL_FLOATS or mx.default_device() != mx.cpu:
        return False
    if any(a.ndim != 4 or a.dtype != mx.float32 for a in (queries, keys, values)):
        return False
    B, H, L, D = queries.shape
    if keys.shape[0] != B or keys.shape[-1] != D or keys.shape[:3] != values.shape[:3] \
            or H % keys.shape[1]:
        return False
    if isinstance(mask, str):
        if mask != "causal" or L > keys.shape[2]:
            return False
    elif mask is not None and (not isinstance(mask, mx.array) or mask.ndim > 4
                               or (mask.ndim >= 3 and mask.shape[-3] not in (1, H))
                               or mask.dtype not in _MASK_TYPES):
        return False
    return B * H * L * keys.shape[2] >= MIN_SCORES


def attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
              mask=None) -> mx.array:
    """MLX's CPU attention (its fallback's operations, in order) with `softmax` above.

    mask: None, "causal", or an array broadcastable to (B, heads, queries, keys): boolean
    (False: masked) or additive. Check `applies` first; elsewhere call MLX's own.
    """
    B, H, L, D = queries.shape
    kv, n = keys.shape[1], keys.shape[2]
    rep = H // kv
    q = mx.array(scale, queries.dtype) * queries
    k, v = keys, values
    # MLX multiplies each query head by its keys apart (B x heads products of L rows). Where
    # the shim computes a few rows each as alone, the heads that share keys go together
    # (B x kv products of rep x L rows): the same bits, a third of the calls for SmolLM2.
    group = rep > 1 and rows_alone(rep * L) >= n * max(D, values.shape[-1])
    if group:
        q = q.reshape(B, kv, rep * L, D)
    elif rep > 1:
        q = q.reshape(B, kv, rep, L, D)
        k = mx.expand_dims(k, 2)
        v = mx.expand_dims(v, 2)
    scores = q @ mx.swapaxes(k, -1, -2)
    if group:
        scores = scores.reshape(B, kv, rep, L, n)
    if isinstance(mask, str):  # "causal": query i sees keys up to its own position
        mask = mx.arange(n - L, n)[:, None] >= mx.arange(0, n)[None]
    if mask is not None:
        if rep > 1 and mask.ndim >= 3:
            if mask.shape[-3] == 1:
                mask = mx.expand_dims(mask, -3)
            else:  # one per query head (`applies` allows no other count)
                mask = mask.reshape(*mask.shape[:-3], kv, rep, *mask.shape[-2:])
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        else:
            scores = scores + mask.astype(scores.dtype)
    p = softmax(scores)
    out = (p.reshape(B, kv, rep * L, n) if group else p) @ v
    return out.reshape(B, H, L, v.shape[-1]) if rep > 1 else out
