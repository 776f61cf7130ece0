"""The batch loop's greedy shortcut: argmax of the logits stands in for argmax of the
log-probabilities only where the two are provably the same index."""

import mlx.core as mx
import numpy as np

from mlx_steer import Steer, generation


def _full(logits: mx.array) -> np.ndarray:
    """mlx-lm's greedy token: argmax of the log-softmax."""
    return np.array(mx.argmax(generation.log_softmax(logits), axis=-1))


def test_certain_rows_agree_with_the_log_softmax():
    rng = np.random.default_rng(0)
    V = 49152
    rows = [rng.standard_normal(V).astype(np.float32) * s for s in (1, 5, 30, 1e3, 1e5)]
    for scale in (0.5, 3.0, 700.0, 3e4):  # near-ties: the top two 1..64 spacings apart
        for k in (1, 2, 8, 64):
            x = (rng.random(V) * scale * 0.01 + scale * 0.9).astype(np.float32)
            x[7] = np.float32(scale)
            top = x[7]
            for _ in range(k):
                top = np.nextafter(top, np.float32(np.inf), dtype=np.float32)
            x[rng.integers(8, V)] = top  # the runner-up (index 7) sits before the max
            rows.append(x)
    logits = mx.array(np.stack(rows))
    y, sure = generation.greedy_tokens(logits)
    y, sure, full = np.array(y), np.array(sure), _full(logits)
    np.testing.assert_array_equal(y[sure], full[sure])
    assert sure[:5].all()  # well-separated rows take the shortcut
    assert not sure[5:].all()  # some near-ties fall back


def test_rounding_can_merge_the_top_two():
    """Why the check exists: many logits near the top push the log-sum-exp ~log(V) away,
    where float32 spacing exceeds a one-spacing gap at 0.5; the log-softmax then ties the
    top two and argmax takes the first, not the logits' argmax."""
    V = 49152
    x = np.full(V, 0.49, np.float32)
    x[0] = 0.5
    x[5] = np.nextafter(np.float32(0.5), np.float32(1), dtype=np.float32)
    logits = mx.array(x[None])
    y, sure = generation.greedy_tokens(logits)
    assert int(y[0]) == 5 and _full(logits)[0] == 0
    assert not bool(sure[0])


def test_non_finite_and_other_dtypes_fall_back():
    x = np.zeros((3, 16), np.float32)
    x[:, 3] = 1.0
    x[1, 9] = np.nan
    x[2, 4] = np.inf
    _, sure = generation.greedy_tokens(mx.array(x))
    assert np.array(sure).tolist() == [True, False, False]
    _, sure = generation.greedy_tokens(mx.array(x[:1]).astype(mx.bfloat16))
    assert not bool(sure[0])


def test_batch_with_and_without_the_shortcut(tiny, monkeypatch):
    v = np.random.default_rng(1).standard_normal(tiny.hidden_size).astype(np.float32)
    prompts = ["The meeting went on for a long time", "Name a colour"]
    toks = [tiny.encode(p) for p in prompts]
    steers = [[], [Steer(v * 2.0, 1, 1.0)]]
    fast = generation.batch(tiny.model, tiny.tokenizer, toks, steers, 8, 0.0, 1.0, None)
    monkeypatch.setattr(generation, "greedy_tokens",
                        lambda lg: (mx.argmax(lg, -1), mx.zeros(lg.shape[:1], mx.bool_)))
    full = generation.batch(tiny.model, tiny.tokenizer, toks, steers, 8, 0.0, 1.0, None)
    assert [r.tokens for r in fast] == [r.tokens for r in full]
    for a, b in zip(fast, full):
        np.testing.assert_array_equal(a.first_logprobs, b.first_logprobs)
