"""Activation capture: pooled block outputs of many texts, and typical residual norms.

The primitive that extraction, the lens, introspection and the CLI read states
through: texts go through `lab.hidden_states_batch` in left-padded batches, every
layer at once; position 0 and massive-activation positions are never read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .errors import InvalidArgumentError
from .metrics import massive_positions
from .prompts import neutral_prompts

if TYPE_CHECKING:
    from .lab import Lab

READS = ("last", "mean")
BATCH = 32  # texts per forward pass
Progress = Callable[[int, int], None]


def valid_positions(h: np.ndarray) -> np.ndarray:
    """Positions to read from one text's (L, T, D) states: not 0, not massive."""
    bad = np.zeros(h.shape[1], bool)
    for layer in h:
        bad |= massive_positions(layer)
    bad[0] = True
    return ~bad


def batches(lab: "Lab", texts: Sequence[str], chat: bool, progress: Progress | None = None):
    """Yield each text's (L, T, D) block outputs, BATCH texts per forward pass."""
    for start in range(0, len(texts), BATCH):
        yield from lab.hidden_states_batch(texts[start:start + BATCH], chat=chat)
        if progress:
            progress(min(start + BATCH, len(texts)), len(texts))


def capture(lab: "Lab", texts: Sequence[str], read: str = "last", chat: bool = False,
            progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled states (N, L, D) of every text, and median token norms (L,)."""
    if read not in READS:
        raise InvalidArgumentError(f"read must be one of {READS}, got {read!r}")
    pooled, token_norms = [], []
    for h in batches(lab, texts, chat, progress):
        ok = valid_positions(h)
        token_norms.append(np.linalg.norm(h[:, ok], axis=-1))
        if read == "last" or not ok.any():
            pooled.append(h[:, -1])
        else:
            pooled.append(h[:, ok].mean(axis=1))
    every = np.concatenate(token_norms, axis=1)
    if every.shape[1] == 0:
        raise InvalidArgumentError("every text is a single token: no positions to measure")
    norms = np.median(every, axis=1)
    return np.stack(pooled).astype(np.float32), norms.astype(np.float32)


def residual_norms(lab: "Lab", texts: Sequence[str] | str | None = None, chat: bool = True
                   ) -> np.ndarray:
    """Median residual token norm per layer, float32 (L,), over `texts` (default: the
    neutral prompts, chat-templated); position 0 and massive positions excluded. The
    norm that turns a relative strength (alpha) into a raw scale."""
    texts = neutral_prompts() if texts is None else [texts] if isinstance(texts, str) else texts
    if not texts:
        raise InvalidArgumentError("residual norms need at least one text")
    return capture(lab, list(texts), "last", chat)[1]
