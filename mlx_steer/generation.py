"""Token generation: one request through mlx-lm's `stream_generate`, or many rows
of different steering in one fixed-batch decode loop."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import prefix, threads
from .models import base
from .steer import Steer

PREFILL_STEP = 2048


def make_sampler(temperature: float, top_p: float = 1.0,
                 seed: int | None = None) -> Callable[[mx.array], mx.array]:
    """Greedy at temperature 0; else Gumbel-max sampling from a private key.

    The key belongs to the request, so concurrent requests and batch rows
    with the same seed draw the same numbers as a lone request would.
    """
    if temperature == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    from mlx_lm.sample_utils import apply_top_p

    state = [mx.random.key(seed if seed is not None else random.getrandbits(32))]

    def sample(logprobs: mx.array) -> mx.array:
        state[0], sub = mx.random.split(state[0])
        if top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        noise = mx.random.gumbel(shape=logprobs.shape, key=sub)
        return mx.argmax(logprobs * (1.0 / temperature) + noise, axis=-1)

    return sample


def stream(model: nn.Module, tokenizer, tokens: list[int], caches: list,
           max_tokens: int, temperature: float, top_p: float,
           seed: int | None, prefill_step_size: int = PREFILL_STEP) -> Iterator[str]:
    """Text pieces of one request; steering rides on `caches`."""
    from mlx_lm.generate import stream_generate

    threads.note_thread()  # a generator may be consumed on another thread than made it
    try:
        for r in stream_generate(model, tokenizer, mx.array(tokens), max_tokens=max_tokens,
                                 sampler=make_sampler(temperature, top_p, seed),
                                 prompt_cache=caches, prefill_step_size=prefill_step_size):
            if r.text:
                yield r.text
    finally:
        base.wait_for_generation()


def feed(model: nn.Module, x: mx.array, caches: list,
         prefill_step_size: int = PREFILL_STEP) -> None:
    """Run tokens `x` (B, T) into `caches` in chunks, without computing logits."""
    for start in range(0, x.shape[1], prefill_step_size):
        model(x[:, start:start + prefill_step_size], cache=caches)
        mx.eval([c.state for c in caches])


def prefill(model: nn.Module, x: mx.array, caches: list,
            prefill_step_size: int = PREFILL_STEP) -> mx.array:
    """Run prompt(s) `x` (B, T) into `caches`; the logits (B, vocab) after the last token.

    Like mlx-lm's generate_step: all but the last token in chunks, then the last one.
    """
    feed(model, x[:, :-1], caches, prefill_step_size)
    return model(x[:, -1:], cache=caches)[:, -1, :]


def _prefill_padded(model: nn.Module, toks: Sequence[list[int]],
                    rows: Sequence[Sequence[Steer]], prefill_step_size: int
                    ) -> tuple[list, mx.array]:
    """Rows prefilled together, left-padded: (batch caches, last logits)."""
    lens = [len(t) for t in toks]
    width = max(lens)
    pads = [width - n for n in lens]
    caches = base.make_caches(model, base.build_plans(rows, lens), left_padding=pads)
    x = mx.array([[0] * p + list(t) for p, t in zip(pads, toks)])
    return caches, prefill(model, x, caches, prefill_step_size)


def _prefill_shared(model: nn.Module, tokens: list[int], rows: Sequence[Sequence[Steer]],
                    shared: int, prefill_step_size: int) -> tuple[list, mx.array]:
    """Rows with one prompt whose steering agrees on positions < `shared`: those
    positions are prefilled once (with the first row's steering, the same for all
    there), the cache is forked, and the rest of the prompt runs for every row."""
    n, length = len(rows), len(tokens)
    x = mx.array(tokens)[None]
    caches = base.make_caches(model, base.build_plans(rows[:1], [length]), left_padding=[0])
    if shared >= length:
        logits = prefill(model, x, caches, prefill_step_size)
        return base.fork_rows(caches, n), mx.repeat(logits, n, axis=0)
    feed(model, x[:, :shared], caches, prefill_step_size)
    caches = base.fork_rows(caches, n)
    base.attach_plans(caches, base.build_plans(rows, [length] * n))
    return caches, prefill(model, mx.repeat(x[:, shared:], n, axis=0), caches,
                           prefill_step_size)


def _prefill_layered(model: nn.Module, tokens: list[int], rows: Sequence[Sequence[Steer]],
                     diverge: Sequence[int | None], prefill_step_size: int
                     ) -> tuple[list, mx.array]:
    """Rows with one prompt, each steered inside it from block `diverge[k]` on (None:
    not at all): the blocks before a row's first steered one run once, on an unsteered
    trunk row, and the row joins the batch there (`base.layer_shared_caches`)."""
    caches, members, out = base.layer_shared_caches(model, rows, diverge, len(tokens))
    logits = prefill(model, mx.array(tokens)[None], caches, prefill_step_size)
    caches = base.spread_rows(caches, members, diverge)
    pick = [out.index(base.TRUNK if d is None else k) for k, d in enumerate(diverge)]
    return caches, logits[mx.array(pick)]


def prefill_batch(model: nn.Module, toks: Sequence[list[int]],
                  rows: Sequence[Sequence[Steer]],
                  prefill_step_size: int = PREFILL_STEP,
                  share: bool = True) -> tuple[list, mx.array]:
    """Prefill a batch: (left-padded batch caches carrying the rows' plans, logits (B, vocab)).

    Rows with the same prompt share its prefill up to the first position where
    their steering differs (`prefix.plan`); rows with the same prompt steered from
    different blocks share the blocks before their first steered one
    (`prefix.layer_plan`); the others run left-padded together. `share=False`
    prefills every row (for measuring).
    """
    groups, solo = prefix.plan(toks, rows) if share else ([], [])
    layered: list[prefix.LayerGroup] = []
    if share and base.shares_layers(model):
        layered, solo = prefix.layer_plan(toks, rows, solo)
    if not groups and not layered:
        caches, logits = _prefill_padded(model, toks, rows, prefill_step_size)
    else:
        caches, logits = _prefill_parts(model, toks, rows, groups, layered, solo,
                                        prefill_step_size)
    base.share_offsets(caches)
    return caches, logits


def _prefill_parts(model: nn.Module, toks: Sequence[list[int]],
                   rows: Sequence[Sequence[Steer]], groups: list, layered: list,
                   solo: list[int], prefill_step_size: int) -> tuple[list, mx.array]:
    """`prefill_batch` with shared prefixes or layers: each part prefilled its way, joined
    and put back in the rows' order, with the rows' plans attached."""
    parts = []  # (batch rows, caches, logits)
    for lg in layered:
        parts.append((list(lg.rows), *_prefill_layered(
            model, list(toks[lg.rows[0]]), [rows[i] for i in lg.rows], lg.diverge,
            prefill_step_size)))
    if solo:
        parts.append((solo, *_prefill_padded(model, [toks[i] for i in solo],
                                             [rows[i] for i in solo], prefill_step_size)))
    for g in groups:
        parts.append((list(g.rows), *_prefill_shared(
            model, list(toks[g.rows[0]]), [rows[i] for i in g.rows], g.shared,
            prefill_step_size)))
    caches = None
    for _, c, _ in parts:
        caches = base.join_batch(caches, c)
    logits = mx.concatenate([lg for _, _, lg in parts])
    order = [i for idx, _, _ in parts for i in idx]
    where = [order.index(i) for i in range(len(toks))]  # row i is at where[i]
    if where != list(range(len(toks))):
        base.keep_rows(caches, where)
        logits = logits[mx.array(where)]
    base.attach_plans(caches, base.build_plans(rows, [len(t) for t in toks]))
    return caches, logits


def log_softmax(logits: mx.array) -> mx.array:
    """Log-probabilities over the last axis, as generate_step computes them."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def greedy_tokens(logits: mx.array) -> tuple[mx.array, mx.array]:
    """Per row, `argmax(log_softmax(logits))` taken as `argmax(logits)`, and whether the
    two are certain to be the same index (else use the log-softmax).

    `log_softmax` subtracts one float32 `c` per row, and rounding `x - c` to float32 is
    monotone in `x`: the largest logit stays largest, and stays the only largest unless
    rounding merges it with the runner-up. That needs the gap `g` between them to be at
    most the float32 spacing at `|x - c|`; both values lie within `g + D` of zero, with
    `D = |c - max|` at most log(V) plus the rounding of `c` (V: the vocabulary), and the
    spacing there is at most `(g + D) * 2**-23`. A row counts as certain when its max is
    finite (no NaN or infinity), its logits are float32, and `g > (log(V) + 1 + |max|)
    * 2**-20`, which is more than 8x that bound. Near-ties fall back to the full path.
    """
    y = mx.argmax(logits, axis=-1)
    if logits.dtype != mx.float32:
        return y, mx.zeros(y.shape, dtype=mx.bool_)
    top = mx.max(logits, axis=-1)  # NaN when the row holds one
    vocab = logits.shape[-1]
    rest = mx.where(mx.arange(vocab) == y[..., None], -mx.inf, logits)
    gap = top - mx.max(rest, axis=-1)
    margin = (math.log(vocab) + 1.0 + mx.abs(top)) * 2.0 ** -20
    return y, mx.isfinite(top) & (gap > margin)


def next_tokens(logits: mx.array, samplers: Sequence[Callable[[mx.array], mx.array]],
                greedy: bool = False) -> mx.array:
    """Each row's next token, evaluated: its sampler on the row's log-probabilities, or,
    when every row is `greedy` (temperature 0), `greedy_tokens` where that is certain."""
    if greedy:
        y, sure = greedy_tokens(logits)
        mx.eval(y, sure)
        if all(sure.tolist()):
            return y
    y = sample_rows(log_softmax(logits), samplers)
    mx.eval(y)
    return y


def sample_rows(logprobs: mx.array, samplers: Sequence[Callable[[mx.array], mx.array]]
                ) -> mx.array:
    """Each row's token from its own sampler (not evaluated)."""
    return mx.concatenate([s(logprobs[i:i + 1]) for i, s in enumerate(samplers)])


@dataclass
class RowResult:
    """One row of a batched generation."""

    text: str
    tokens: list[int]
    finish_reason: str
    first_logprobs: np.ndarray = field(repr=False)  # (vocab,) at the first generated token


# Written here on purpose rather than mlx-lm's BatchGenerator / batch_generate: those
# take one sampler for the whole batch and build the rows' KV caches themselves, while
# each row here keeps its own cache (made by models.base, carrying that row's steering
# plan) and its own seeded sampler, so a row decodes exactly as the lone request would.
def batch(model: nn.Module, tokenizer, toks: Sequence[list[int]],
          rows: Sequence[Sequence[Steer]], max_tokens: int, temperature: float,
          top_p: float, seed: int | Sequence[int | None] | None,
          progress: Callable[[int, int], None] | None = None,
          prefill_step_size: int = PREFILL_STEP) -> list[RowResult]:
    """Decode all rows together: left-padded, each with its own steering and sampler.

    Rows with the same prompt prefill it once, up to where their steering differs.

    `seed` is one seed for every row (each row then draws what a lone request
    with that seed would) or one seed per row.
    """
    B = len(toks)
    caches, logits = prefill_batch(model, toks, rows, prefill_step_size)

    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * B
    samplers = [make_sampler(temperature, top_p, s) for s in seeds]
    eos = set(tokenizer.eos_token_ids)
    detok = [tokenizer.detokenizer for _ in range(B)]
    out: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    active = [True] * B
    first = None
    for step in range(max_tokens):
        if first is None:
            logprobs = log_softmax(logits)
            y = sample_rows(logprobs, samplers)
            first = logprobs.astype(mx.float32)
            mx.eval(y, first)
        else:
            y = next_tokens(logits, samplers, greedy=temperature == 0)
        for i, t in enumerate(y.tolist()):
            if not active[i]:
                continue
            if t in eos:
                active[i], reasons[i] = False, "stop"
                continue
            out[i].append(t)
            detok[i].add_token(t)
        if progress:
            progress(step + 1, max_tokens)
        if not any(active) or step == max_tokens - 1:
            break
        logits = model(y[:, None], cache=caches)[:, -1, :]
    first_np = np.array(first)
    results = []
    for i in range(B):
        detok[i].finalize()
        results.append(RowResult(detok[i].text, out[i], reasons[i], first_np[i]))
    return results
