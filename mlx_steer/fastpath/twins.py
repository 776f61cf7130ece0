"""Quantised twins: let the preloaded shim read a model's quantised bytes.

A GGUF model expanded to float32 keeps each matrix's quantised form (bytes,
scales and biases per group of 32). `attach` registers those with the sgemv
shim, when it is preloaded and the CPU has AVX-512: few-row products
`x @ W.T` then read 4–8× fewer bytes and rebuild the float32 weights exactly
(see sgemv_shim.c). Without the shim nothing happens and the float32 weights
are used as before; `MLX_STEER_SHIM_TWINS=0` turns twins off.

The twins are copied into one anonymous mapping advised for transparent huge pages
(`MADV_HUGEPAGE`; Linux's default mode, "madvise", gives them only on request): a
decode step streams all ~100 MB of them, and with 4 KB pages every few rows of a
matrix cost a page walk, which in a virtual machine is several memory reads. Measured
(SmolLM2, 8 alternating rounds in one process): decode step 36.1 against 37.3 ms at 8
rows, 23.3 against 23.9 ms at 1 row (docs/BENCHMARKS.md, round 5).
4-bit bytes are stored in the shim's order (`_halves`), not MLX's.
"""

from __future__ import annotations

import ctypes
import mmap
import weakref

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

_LIVE: dict[int, list] = {}  # tag -> the registered float32 matrices (views of MLX's buffers)
_ARENAS: dict[int, "_Arena"] = {}  # tag -> the mapping holding its twins' bytes


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
    _ARENAS.pop(tag, None)


_HUGE = 2 << 20  # a transparent huge page
_ALIGN = 64  # a cache line


class _Arena:
    """Arrays carved one after another from one anonymous mapping advised for huge pages."""

    def __init__(self, nbytes: int):
        self.map = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self.map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # a kernel without transparent huge pages: plain pages
                pass
        self.bytes = np.frombuffer(self.map, np.uint8)
        self.at = -self.bytes.ctypes.data % _HUGE  # huge pages need 2 MB-aligned addresses

    def take(self, shape: tuple, dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        out = self.bytes[self.at:self.at + nbytes].view(dtype).reshape(shape)
        self.at += -(-nbytes // _ALIGN) * _ALIGN
        return out

    def copy(self, a: np.ndarray) -> np.ndarray:
        out = self.take(a.shape, a.dtype)
        out[...] = a
        return out


def _halves(q: np.ndarray, out: np.ndarray) -> None:
    """MLX's 4-bit order (byte i: elements 2i and 2i + 1) to the shim's (byte j of a group of
    32: elements j and j + 16, GGUF's order), which lets the shim read input rows as they are."""
    n = q.shape[0]
    pairs = q.reshape(n, -1, 16)  # per group: 16 bytes, elements 0..31 in neighbour pairs
    e = np.stack([pairs & 15, pairs >> 4], axis=-1).reshape(n, -1, 32)
    out.reshape(n, -1, 16)[...] = e[..., :16] | (e[..., 16:] << 4)


def attach(model, twins: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> int:
    """Register the twins of `model`'s float32 matrices; returns how many took."""
    lib = _shim() if twins else None
    if lib is None:
        return 0
    params = dict(tree_flatten(model.parameters()))
    tag, found = id(model), []
    for name, (q, scales, biases) in twins.items():
        w = params.get(name)
        if w is None or w.dtype != mx.float32 or w.ndim != 2:
            continue
        wn = np.asarray(w)  # a view of MLX's buffer: keeps it alive while registered
        n, k = wn.shape
        q = np.asarray(q, dtype=np.uint8)
        s = np.asarray(scales, dtype=np.float32)
        b = np.asarray(biases, dtype=np.float32)
        if not wn.flags.c_contiguous or q.ndim != 2 or q.shape[0] != n or k % 32 \
                or s.shape != (n, k // 32) or b.shape != s.shape or q.shape[1] * 8 % k:
            continue
        found.append((wn, q, s, b))
    if not found:
        return 0
    if tag in _LIVE:  # registered before: its old mapping goes with its old twins
        _release(lib, tag)
    arena = _Arena(sum(-(-a.nbytes // _ALIGN) * _ALIGN for _, *parts in found for a in parts))
    keep = []
    for wn, q, s, b in found:
        n, k = wn.shape
        bits = q.shape[1] * 8 // k
        if bits == 4:
            q4 = arena.take(q.shape, np.uint8)
            _halves(q, q4)
            q = q4
        else:
            q = arena.copy(q)
        s, b = arena.copy(s), arena.copy(b)
        if lib.mlx_steer_twin_register(wn.ctypes.data, n, k, bits, q.ctypes.data,
                                       s.ctypes.data, b.ctypes.data, tag):
            keep.append(wn)
    if keep:
        _LIVE[tag], _ARENAS[tag] = keep, arena  # alive while registered
        weakref.finalize(model, _release, lib, tag)
    return len(keep)
