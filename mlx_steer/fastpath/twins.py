"""Quantised twins: let the preloaded shim read a model's quantised bytes.

A GGUF model expanded to float32 keeps each matrix's quantised form (bytes,
scales and biases per group of 32). `attach` registers those with the sgemv
shim, when it is preloaded and the CPU has AVX-512: few-row products
`x @ W.T` then read 4–8× fewer bytes and rebuild the float32 weights exactly
(see sgemv_shim.c). Without the shim nothing happens and the float32 weights
are used as before; `MLX_STEER_SHIM_TWINS=0` turns twins off.
"""

from __future__ import annotations

import ctypes
import weakref

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

_LIVE: dict[int, list] = {}  # tag -> buffers the shim points into


def _shim():
    """The preloaded shim's twin API, or None."""
    try:
        lib = ctypes.CDLL(None)
        lib.mlx_steer_twin_register.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
        lib.mlx_steer_twin_unregister.argtypes = [ctypes.c_long]
    except (OSError, AttributeError):
        return None
    return lib if lib.mlx_steer_twin_supported() else None


def _release(lib, tag: int) -> None:
    lib.mlx_steer_twin_unregister(tag)
    _LIVE.pop(tag, None)


def attach(model, twins: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> int:
    """Register the twins of `model`'s float32 matrices; returns how many took."""
    lib = _shim() if twins else None
    if lib is None:
        return 0
    params = dict(tree_flatten(model.parameters()))
    tag, keep = id(model), []
    for name, (q, scales, biases) in twins.items():
        w = params.get(name)
        if w is None or w.dtype != mx.float32 or w.ndim != 2:
            continue
        wn = np.asarray(w)  # a view of MLX's buffer: keeps it alive while registered
        n, k = wn.shape
        q = np.ascontiguousarray(q, dtype=np.uint8)
        s = np.ascontiguousarray(scales, dtype=np.float32)
        b = np.ascontiguousarray(biases, dtype=np.float32)
        if not wn.flags.c_contiguous or q.shape[0] != n or s.shape != (n, k // 32) \
                or b.shape != s.shape or q.shape[1] * 8 % k:
            continue
        if lib.mlx_steer_twin_register(wn.ctypes.data, n, k, q.shape[1] * 8 // k, q.ctypes.data,
                                       s.ctypes.data, b.ctypes.data, tag):
            keep.append((wn, q, s, b))
    if keep:
        _LIVE[tag] = keep
        weakref.finalize(model, _release, lib, tag)
    return len(keep)
