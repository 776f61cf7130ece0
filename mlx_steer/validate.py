"""Checks of plain arguments (numbers, seeds, text, token ids) that raise typed errors.

One function per kind of argument, so every entry point refuses the same inputs with
the same message. Strings, booleans and complex numbers are never taken for numbers.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

from .errors import (EmptyPromptError, InvalidArgumentError, InvalidTokenError,
                     LayerOutOfRangeError, MlxSteerError)

SEED_MAX = 2**64 - 1  # MLX's random keys take an unsigned 64-bit seed
INT32_MAX = 2**31 - 1  # positions and sizes MLX stores as int32


def real(x, what: str, error: type[MlxSteerError] = InvalidArgumentError) -> float:
    """A finite real number: int, float or a NumPy real scalar (not bool, str, complex)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise error(f"{what} must be a number, got {x!r:.60}")
    try:
        v = float(x)
    except (OverflowError, ValueError, TypeError):
        raise error(f"{what} must be a finite number, got {x!r:.60}") from None
    if not math.isfinite(v):
        raise error(f"{what} must be finite, got {v}")
    return v


def integer(x, what: str, lo: int | None = None, hi: int | None = None,
            error: type[MlxSteerError] = InvalidArgumentError) -> int:
    """An int (or NumPy integer, not bool) within [lo, hi]."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise error(f"{what} must be an integer, got {x!r:.60}")
    v = int(x)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        span = f"{'' if lo is None else lo} … {'' if hi is None else hi}".strip()
        raise error(f"{what} must be in {span}, got {v}")
    return v


def layer(x, num_layers: int) -> int:
    """A 0-based block index of a model with `num_layers` blocks (the one layer check)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral) or not (
            0 <= x < num_layers):
        raise LayerOutOfRangeError(
            f"layer {x!r} is out of range: this model has {num_layers} layers "
            f"(0 … {num_layers - 1})")
    return int(x)


def seed(x) -> int | None:
    """None or an integer seed in 0 … 2⁶⁴-1."""
    return None if x is None else integer(x, "seed", 0, SEED_MAX)


def text(x, what: str = "the prompt") -> str:
    """Non-empty text that can be encoded (no lone surrogates)."""
    if not isinstance(x, str):
        raise InvalidArgumentError(f"{what} must be text, got {type(x).__name__}")
    if not x.strip():
        raise EmptyPromptError(f"{what} is empty: type some text to continue")
    try:
        x.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(
            f"{what} contains a character that is not valid text "
            f"({x[e.start:e.end]!r} at {e.start}: a lone surrogate)") from None
    return x


def token_ids(ids, vocab_size: int) -> list[int]:
    """Token ids as a list of ints in 0 … vocab_size-1."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise InvalidTokenError(f"token ids must be a list of integers, got {type(ids).__name__}")
    out = []
    for i, t in enumerate(ids):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral):
            raise InvalidTokenError(f"token {i} is not an integer id: {t!r:.40}")
        t = int(t)
        if not 0 <= t < vocab_size:
            raise InvalidTokenError(
                f"token id {t} at {i} is out of range: this model's vocabulary has "
                f"{vocab_size} ids (0 … {vocab_size - 1})")
        out.append(t)
    if not out:
        raise EmptyPromptError("the prompt has no tokens")
    return out
