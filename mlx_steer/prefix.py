"""Which rows of a batch can share their prompt's prefill, and how far.

Rows with the same prompt tokens compute the same keys and values at every
position where their steering is still the same, so those positions can be
prefilled once and the cache forked. And every block below the first one a
row steers inside its prompt computes what the unsteered model does, at every
position: rows of one prompt steered from different positions on (usually
from position 1) still share those blocks (`layered`). Steering "identical" here means the same
ordered list of (layer, delta, window) terms active at a position, term by
term, bit for bit: anything weaker could change float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .steer import Steer

MIN_SHARED = 2  # forking pays only for a prefix longer than one token


@dataclass(frozen=True)
class Layered:
    """Rows `rows` of one prompt: row rows[i] runs the prompt unsteered through
    blocks < depths[i] (the blocks the unsteered one-row prefill can give it)."""

    rows: tuple[int, ...]
    depths: tuple[int, ...]


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


def first_block(steers: Sequence[Steer], prompt_len: int, num_layers: int) -> int:
    """The lowest block a row's steering changes inside its prompt (`num_layers` when
    none does): blocks below it compute the prompt as the unsteered model does.

    A steer at block l changes block l's output (an ablation in the middle of the
    block, block l itself); the embedding (-1) changes block 0's input."""
    first = num_layers
    for s in steers:
        if s.is_noop:
            continue
        start, end = s.window(prompt_len)
        if start < min(end, prompt_len):
            first = min(first, max(min(s.layers(num_layers)), 0))
    return first


def layered(toks: Sequence[Sequence[int]], rows: Sequence[Sequence[Steer]],
            candidates: Sequence[int], num_layers: int) -> tuple[list[Layered], list[int]]:
    """Rows of `candidates` that share the prompt's lower blocks (`Layered` groups:
    one prompt, >= 2 rows, and the blocks they skip add up to at least one whole
    prefill, what the shared one costs) and the rest."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i in candidates:
        by_prompt.setdefault(tuple(toks[i]), []).append(i)
    groups, rest = [], []
    for prompt, idx in by_prompt.items():
        depths = {i: first_block(rows[i], len(prompt), num_layers) for i in idx}
        share = [i for i in idx if depths[i] > 0]
        if (len(share) >= 2 and len(prompt) >= MIN_SHARED
                and sum(depths[i] for i in share) >= num_layers):
            groups.append(Layered(tuple(share), tuple(depths[i] for i in share)))
            rest.extend(i for i in idx if depths[i] == 0)
        else:
            rest.extend(idx)
    return groups, sorted(rest)
