"""Trained steering vectors: a bi-directional preference objective (BiPO-style).

The concept's pairs are used as completions of one shared prompt (`PROMPT`,
through the chat template). With the vector v added at block `layer` (every
token but position 0, like `Steer(positions="all")`), the frozen model should
prefer the positive completion over the negative one, and with −v the reverse:

    r±(d) = log p_{d·v}(y±) − log p(y±)                  (summed over the completion)
    loss  = −½ Σ_d log σ(d · β · (r+(d) − r−(d)))        d ∈ {+1, −1}

(Cao et al. 2024, "Personalized Steering of LLMs via Bi-directional Preference
Optimization", who draw d at random per step; here both directions go into every
step as rows of one batch, which gives the same expected gradient with less
noise.) Gradients come from MLX autodiff through the real forward pass; only v
is trained. v starts from the mean difference, rescaled to the norm bound
‖v‖ ≤ `ALPHA_BOUND` × the median residual norm at that block, and is projected
back onto that ball after each Adam step, so it lives in the same relative units
as mean-difference vectors. Each step uses a minibatch of at most `MINIBATCH`
pairs drawn with `seed` (the same seed gives the same vector). Training stops
after `MAX_STEPS` or when a moving average of the loss has not improved by
`MIN_DELTA` for `PATIENCE` steps.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Sequence

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from .errors import InvalidArgumentError
from .models import base

if TYPE_CHECKING:
    from .lab import Lab

PROMPT = "Say something."
ALPHA_BOUND = 0.25
BETA = 0.1
MAX_STEPS = 20
PATIENCE = 4
MIN_DELTA = 1e-3
MINIBATCH = 4
SMOOTHING = 0.7  # weight of the past in the loss average used for early stopping
LR = 0.05  # Adam step per coordinate, as a fraction of bound / sqrt(hidden)


def _batch(lab: "Lab", pairs: Sequence[tuple[str, str]], prompt: str):
    """Right-padded token ids (2N, T) and a (2N, T-1) mask of completion targets:
    rows 0…N-1 are the positives, N…2N-1 the negatives."""
    head = lab.encode(prompt, chat=True)
    rows, spans = [], []
    for text in [p for p, _ in pairs] + [n for _, n in pairs]:
        tail = list(lab.tokenizer.encode(text, add_special_tokens=False))
        if not tail:
            raise InvalidArgumentError(f"the completion {text!r} encodes to no tokens")
        rows.append(head + tail)
        spans.append((len(head), len(head) + len(tail)))
    width = max(map(len, rows))
    # Right padding: causal attention keeps the padding out of every real position.
    x = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width - 1), np.float32)
    for i, (r, (a, b)) in enumerate(zip(rows, spans)):
        x[i, :len(r)] = r
        mask[i, a - 1:b - 1] = 1.0  # logits at t predict token t+1
    return mx.array(x), mx.array(mask)


def _completion_logprobs(lab: "Lab", x: mx.array, mask: mx.array, layer: int,
                         delta: mx.array | None) -> mx.array:
    """log p(completion) per row, with `delta` added at `layer` (None: unsteered)."""
    caches = (base.make_caches(lab.model) if delta is None
              else base.addition_caches(lab.model, layer, delta))
    logits = lab.model(x, cache=caches)[:, :-1].astype(mx.float32)
    picked = mx.take_along_axis(logits, x[:, 1:, None], axis=-1)[..., 0]
    logp = picked - mx.logsumexp(logits, axis=-1)
    return (logp * mask).sum(axis=1)


def train_vector(lab: "Lab", pairs: Sequence[tuple[str, str]], layer: int,
                 init: np.ndarray, residual_norm: float, *, seed: int = 0,
                 steps: int | None = None, prompt: str = PROMPT,
                 progress: Callable[[int, int], None] | None = None
                 ) -> tuple[np.ndarray, dict]:
    """The trained (hidden,) vector at `layer` and a record of the run.

    Shows a tqdm bar with the loss unless `progress(done, total)` is given.
    """
    steps = MAX_STEPS if steps is None else int(steps)
    if not pairs or steps < 1:
        raise InvalidArgumentError("training needs at least one pair and one step")
    if not float(np.linalg.norm(init)) > 0 or not residual_norm > 0:
        raise InvalidArgumentError("the starting vector (mean difference) is zero")
    x, mask = _batch(lab, pairs, prompt)
    n = len(pairs)
    ref = _completion_logprobs(lab, x, mask, layer, None)
    mx.eval(ref)
    bound = ALPHA_BOUND * float(residual_norm)
    v = mx.array((init / np.linalg.norm(init) * bound).astype(np.float32))
    opt = optim.Adam(learning_rate=LR * bound / np.sqrt(v.shape[0]))
    rng = np.random.default_rng(seed)

    def loss_fn(vec: mx.array, idx: mx.array) -> mx.array:
        rows = mx.concatenate([idx, idx + n])  # the minibatch's positives, then negatives
        xb, mb, rb = x[rows], mask[rows], ref[rows]
        k = idx.shape[0]
        # +v and −v as two halves of one batch.
        sign = mx.concatenate([mx.ones((2 * k, 1)), -mx.ones((2 * k, 1))])
        logp = _completion_logprobs(lab, mx.concatenate([xb, xb]),
                                    mx.concatenate([mb, mb]), layer, sign * vec[None])
        r = logp - mx.concatenate([rb, rb])
        up = BETA * (r[:k] - r[k:2 * k])              # +v: positives over negatives
        down = -BETA * (r[2 * k:3 * k] - r[3 * k:])   # −v: negatives over positives
        return -0.5 * (mx.mean(_log_sigmoid(up)) + mx.mean(_log_sigmoid(down)))

    grad_fn = mx.value_and_grad(loss_fn)
    bar = None
    if progress is None:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"training at block {layer}", unit="step")
    losses, best, stale, avg, t0 = [], np.inf, 0, None, time.perf_counter()
    for step in range(steps):
        idx = np.sort(rng.permutation(n)[:MINIBATCH]) if n > MINIBATCH else np.arange(n)
        loss, g = grad_fn(v, mx.array(idx))
        v = opt.apply_gradients({"v": g}, {"v": v})["v"]
        norm = mx.linalg.norm(v)
        v = mx.where(norm > bound, v * (bound / norm), v)
        mx.eval(v, loss)
        losses.append(float(loss))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        else:
            progress(step + 1, steps)
        avg = losses[-1] if avg is None else SMOOTHING * avg + (1 - SMOOTHING) * losses[-1]
        if avg < best - MIN_DELTA:
            best, stale = avg, 0
        else:
            stale += 1
            if stale >= PATIENCE:
                break
    if bar is not None:
        bar.close()
    out = np.array(v, dtype=np.float32)
    info = {"layer": int(layer), "steps": len(losses),
            "losses": [round(x, 5) for x in losses], "seed": int(seed), "prompt": prompt,
            "beta": BETA, "alpha_bound": ALPHA_BOUND, "minibatch": min(n, MINIBATCH),
            "seconds": round(time.perf_counter() - t0, 2),
            "cosine_to_mean": round(float(out @ init / (np.linalg.norm(out)
                                                        * np.linalg.norm(init))), 4)}
    return out, info


def _log_sigmoid(z: mx.array) -> mx.array:
    return -mx.logaddexp(mx.zeros_like(z), -z)  # log σ(z), stable for large |z|
