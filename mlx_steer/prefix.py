"""Which rows of a batch can share their prompt's prefill, and how far.

Rows with the same prompt tokens compute the same keys and values at every
position where their steering is still the same, so those positions can be
prefilled once and the cache forked. Steering "identical" here means the same
ordered list of (layer, delta, window) terms active at a position, term by
term, bit for bit: anything weaker could change float32 rounding.

Rows with the same prompt steered at different blocks (a layer sweep) share by
layer instead: up to the output of the first block it steers, a row computes
exactly what the unsteered model does (`layer_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .steer import Steer

MIN_SHARED = 2  # forking pays only for a prefix longer than one token


@dataclass(frozen=True)
class Group:
    """Rows `rows` (batch indices) share prompt positions `< shared`."""

    rows: tuple[int, ...]
    shared: int


def _terms(steers: Sequence[Steer], prompt_len: int) -> list[tuple]:
    """(layer, start, end, delta bytes) of each applied steer, in the row's order
    per layer (the order the layer plan adds them)."""
    out = []
    for s in steers:
        if s.strength == 0.0:
            continue
        start, end = s.window(prompt_len)
        if start < end:
            out.append((s.layer, start, end, s.delta.tobytes()))
    return sorted(out, key=lambda t: t[0])  # stable: keeps the order within a layer


def _active(terms: list[tuple], p: int) -> tuple:
    return tuple((layer, d) for layer, start, end, d in terms if start <= p < end)


def shared_length(rows: Sequence[Sequence[Steer]], prompt_len: int) -> int:
    """The first prompt position where the rows' steering differs (`prompt_len` if
    it never does): positions before it are computed identically by every row."""
    terms = [_terms(r, prompt_len) for r in rows]
    # The active terms change only where a window starts or ends.
    cuts = sorted({0} | {p for ts in terms for _, s, e, _ in ts for p in (s, e)
                         if p < prompt_len})
    for p in cuts:
        first = _active(terms[0], p)
        if any(_active(t, p) != first for t in terms[1:]):
            return p
    return prompt_len


def plan(toks: Sequence[Sequence[int]], rows: Sequence[Sequence[Steer]]
         ) -> tuple[list[Group], list[int]]:
    """Sharing groups (>= 2 rows with the same prompt and a shared prefix of at
    least MIN_SHARED tokens) and the remaining rows, prefilled as before."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(toks):
        by_prompt.setdefault(tuple(t), []).append(i)
    groups, solo = [], []
    for prompt, idx in by_prompt.items():
        k = shared_length([rows[i] for i in idx], len(prompt)) if len(idx) > 1 else 0
        if k >= MIN_SHARED:
            groups.append(Group(tuple(idx), k))
            continue
        # No common prefix worth sharing: rows steered identically over the whole
        # prompt (e.g. the baseline and a strength-0 row) still share all of it.
        same: dict[tuple, list[int]] = {}
        for i in idx:
            same.setdefault(_prompt_signature(rows[i], len(prompt)), []).append(i)
        for members in same.values():
            if len(members) > 1 and len(prompt) >= MIN_SHARED:
                groups.append(Group(tuple(members), len(prompt)))
            else:
                solo.extend(members)
    return groups, sorted(solo)


def _prompt_signature(steers: Sequence[Steer], prompt_len: int) -> tuple:
    """The steering a row applies inside its prompt: equal signatures, equal prefill."""
    terms = _terms(steers, prompt_len)
    return tuple((layer, max(start, 0), min(end, prompt_len), d)
                 for layer, start, end, d in terms if start < prompt_len)


# ---- sharing by layer -----------------------------------------------------------------


@dataclass(frozen=True)
class LayerGroup:
    """Rows `rows` (batch indices) with one prompt; row k's prompt positions are computed
    unsteered up to the output of block `diverge[k]` (None: through every block)."""

    rows: tuple[int, ...]
    diverge: tuple[int | None, ...]


def divergence(steers: Sequence[Steer], prompt_len: int) -> int | None:
    """The first block whose output, at some prompt position, differs from the unsteered
    model's for a row steered by `steers` (int layers); None when no term acts inside the
    prompt, -1 when the embedding is steered. A mid-block ablation at block L changes
    block L itself: the row then differs from block L's input, i.e. block L-1's output."""
    layers = []
    for s in steers:
        start, end = s.window(prompt_len)
        if not s.is_noop and start < min(end, prompt_len):
            layers.append(s.layer - 1 if s.mid else s.layer)
    return min(layers) if layers else None


def layer_plan(toks: Sequence[Sequence[int]], rows: Sequence[Sequence[Steer]],
               candidates: Sequence[int]) -> tuple[list[LayerGroup], list[int]]:
    """Groups of >= 2 `candidates` with the same prompt to prefill shared by layer, and
    the remaining candidates (rows steering the embedding, lone prompts, and groups none
    of whose rows is steered inside the prompt, which `plan` shares whole).

    A row steered from block d on is the unsteered prompt up to block d's output: one
    unsteered "trunk" row runs the blocks up to the last row's divergence, in the same
    batch as the rows that left it, and each row runs only the blocks after its own d.
    That is never more block-rows than every row running every block (the trunk's
    max(d) + 1 blocks against the sum of d + 1 that the rows skip; rows that never
    diverge ride on the trunk). A layer sweep of 8 blocks spread over 30, steering every
    position so that no prompt prefix is common, runs 140 block-rows instead of 240.
    """
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i in candidates:
        by_prompt.setdefault(tuple(toks[i]), []).append(i)
    groups, rest = [], []
    for prompt, idx in by_prompt.items():
        d = {i: divergence(rows[i], len(prompt)) for i in idx}
        members = [i for i in idx if d[i] is None or d[i] >= 0]
        rest.extend(i for i in idx if i not in members)
        div = [d[i] for i in members]
        if len(members) < 2 or all(x is None for x in div):
            rest.extend(members)  # all unsteered inside the prompt: plan() shares those
            continue
        groups.append(LayerGroup(tuple(members), tuple(div)))
    return groups, sorted(rest)

