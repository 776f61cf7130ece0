"""Teacher-forced scoring: how likely the model finds texts, and where it puts them.

Each :class:`ScoreEntry` is a context (prompt tokens) followed by `n_gen`
generated tokens. Scoring fills, per entry, the mean negative log-likelihood
of the generated tokens given everything before them, and the mean projection
of chosen blocks' outputs on chosen unit directions over the generated
positions.

Two ways, with the same results up to float rounding:

- :func:`score_passes`: every entry's whole sequence through the model,
  left-padded batches (needed when the entry is steered);
- :func:`score_shared`: unsteered entries with the same context prefill it
  once; its cache is forked to those entries, and only their generated tokens
  run (right-padded). The prompt is then computed once per context instead of
  once per row, and no logits are made over it. :func:`score` picks the way
  per entry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from .generation import feed
from .models import base
from .steer import Steer

if TYPE_CHECKING:
    from .lab import Lab

METRIC_BATCH = 16  # sequences per teacher-forced scoring pass
LOGITS_BUDGET = 1 << 26  # ... and at most this many logits in one pass (256 MB float32)


@dataclass
class ScoreEntry:
    """One sequence of a teacher-forced scoring pass."""

    tokens: list[int]
    prompt_len: int
    steers: list[Steer]
    n_gen: int
    nll: bool
    probes: list[tuple[int, np.ndarray, str]] = field(default_factory=list)  # layer, unit, key
    out: dict = field(default_factory=dict)


def _vocab(lab: "Lab") -> int:
    return int(getattr(lab.model.args, "vocab_size", 0) or 32000)


def _chunks(entries: Sequence[ScoreEntry], batch: int, vocab: int,
            length: Callable[[ScoreEntry], int] = lambda e: len(e.tokens)
            ) -> list[list[ScoreEntry]]:
    """Consecutive groups of at most `batch` sequences and ~LOGITS_BUDGET logits
    (`length`: the positions an entry runs)."""
    out: list[list[ScoreEntry]] = []
    cur: list[ScoreEntry] = []
    for e in entries:
        width = max([length(x) for x in cur] + [length(e)])
        if cur and (len(cur) >= batch or (len(cur) + 1) * width * vocab > LOGITS_BUDGET):
            out.append(cur)
            cur = []
        cur.append(e)
    if cur:
        out.append(cur)
    return out


def _forward(lab: "Lab", x: mx.array, caches: list, chunk: Sequence[ScoreEntry]
             ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """One pass of `x` through `caches`: the targets' log-probabilities (B, T-1) and
    the states at every layer the chunk's entries probe, as NumPy arrays."""
    layers = sorted({layer for e in chunk for layer, _, _ in e.probes})
    base.watch(lab.model, caches, layers)
    out = lab.model(x, cache=caches)
    tgt = _target_logprobs(out, x)
    hidden = base.captured(lab.model, caches, layers, out, lab.group)
    mx.eval(tgt, *hidden.values())
    return np.array(tgt), {layer: np.array(h) for layer, h in hidden.items()}


def _target_logprobs(out: mx.array, x: mx.array) -> mx.array:
    """log p(x[:, t+1] | ...) from logits `out` (B, T, V): (B, T-1), float32."""
    logits = out[:, :-1]
    picked = mx.take_along_axis(logits, x[:, 1:, None], axis=-1)[..., 0]
    return picked.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), axis=-1)


def score_passes(lab: "Lab", entries: Sequence[ScoreEntry], batch: int = METRIC_BATCH,
                 progress: Callable[[], None] | None = None) -> None:
    """Whole sequences through the model, up to `batch` at a time (left-padded;
    fewer when their logits would exceed `LOGITS_BUDGET` elements), each with its
    own steering.

    Fills `entry.out["nll"]` (mean NLL of the last `n_gen` tokens, if asked) and
    `entry.out[key]` (mean projection on the unit direction at a layer over the
    last `n_gen` positions) for every probe. Only the probed layers are captured,
    and only the targets' log-probabilities leave MLX.
    """
    for chunk in _chunks(entries, batch, _vocab(lab)):
        width = max(len(e.tokens) for e in chunk)
        pads = [width - len(e.tokens) for e in chunk]
        x = mx.array([[0] * p + e.tokens for p, e in zip(pads, chunk)])
        plans = base.build_plans([e.steers for e in chunk], [e.prompt_len for e in chunk])
        caches = base.make_caches(lab.model, plans, left_padding=pads)
        tgt_np, hid_np = _forward(lab, x, caches, chunk)
        for b, e in enumerate(chunk):
            n = e.n_gen
            if e.nll:
                e.out["nll"] = float(-tgt_np[b, width - 1 - n: width - 1].mean())
            _fill_probes(e, {layer: h[b, width - n:] for layer, h in hid_np.items()})
        if progress:
            progress()


def _fill_probes(e: ScoreEntry, hidden: dict[int, np.ndarray]) -> None:
    """Mean projection of the generated positions' states (n_gen, D) per probe."""
    for layer, unit, key in e.probes:
        e.out[key] = float((hidden[layer].astype(np.float64) @ unit).mean())


def shareable(e: ScoreEntry) -> bool:
    """An entry `score_shared` can score: unsteered, with a context of >= 2 tokens
    and at least one generated token."""
    return all(s.is_noop for s in e.steers) and e.prompt_len >= 2 and e.n_gen >= 1


def _prefill_context(lab: "Lab", context: Sequence[int]) -> list:
    """One-row batch caches holding `context` minus its last token (unsteered)."""
    caches = base.make_caches(lab.model, None, left_padding=[0])
    feed(lab.model, mx.array(list(context[:-1]))[None], caches)
    return caches


def score_shared(lab: "Lab", entries: Sequence[ScoreEntry], batch: int = METRIC_BATCH,
                 progress: Callable[[], None] | None = None) -> None:
    """Like :func:`score_passes` for unsteered entries (:func:`shareable`), computing
    each distinct context once.

    Per pass, every entry's context cache (its context but the last token) is
    forked to it, the caches of the pass's contexts are joined (left-padded), and
    the entries run [last context token] + their generated tokens, right-padded:
    the padding comes after every real position, so causal attention keeps it
    out of them. The log-probabilities of the generated tokens and the probed
    blocks' states at them come from that one pass.
    """
    by_context: dict[tuple[int, ...], list[ScoreEntry]] = {}
    for e in entries:
        by_context.setdefault(tuple(e.tokens[:e.prompt_len]), []).append(e)
    ordered = [e for group in by_context.values() for e in group]
    context_of = {id(e): ctx for ctx, group in by_context.items() for e in group}
    prefilled: dict[tuple[int, ...], list] = {}
    for chunk in _chunks(ordered, batch, _vocab(lab), lambda e: e.n_gen + 1):
        caches = None
        # grouped by context already: consecutive runs, in order
        for ctx, n in Counter(context_of[id(e)] for e in chunk).items():
            if ctx not in prefilled:
                prefilled[ctx] = _prefill_context(lab, ctx)
            caches = base.join_batch(caches, base.fork_rows(prefilled[ctx], n))
        width = max(e.n_gen for e in chunk) + 1
        x = mx.array([[e.tokens[e.prompt_len - 1]] + e.tokens[e.prompt_len:]
                      + [0] * (width - 1 - e.n_gen) for e in chunk])
        tgt_np, hid_np = _forward(lab, x, caches, chunk)
        for b, e in enumerate(chunk):
            n = e.n_gen
            if e.nll:
                e.out["nll"] = float(-tgt_np[b, :n].mean())
            _fill_probes(e, {layer: h[b, 1:n + 1] for layer, h in hid_np.items()})
        if progress:
            progress()


def score(lab: "Lab", entries: Sequence[ScoreEntry], batch: int = METRIC_BATCH,
          progress: Callable[[], None] | None = None, share: bool = True) -> None:
    """Score every entry: the shareable ones with :func:`score_shared`, the rest
    (steered ones) with :func:`score_passes`. `share=False`: all whole (for measuring)."""
    shared = [e for e in entries if share and shareable(e)]
    whole = [e for e in entries if not (share and shareable(e))]
    if shared:
        score_shared(lab, shared, batch, progress)
    if whole:
        score_passes(lab, sorted(whole, key=lambda e: len(e.tokens)), batch, progress)

