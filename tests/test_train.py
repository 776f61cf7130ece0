"""Trained vectors (bi-directional preference objective) on a tiny model."""

import numpy as np
import pytest

from mlx_steer import errors, train
from tiny import tiny_lab

PAIRS = [(f"yes good fine {i} wow", f"no bad poor {i} hmm") for i in range(10)]


@pytest.fixture(scope="module")
def lab():
    return tiny_lab("mistral")


def init_vector(lab, layer=2):
    h = lab.hidden_states_batch([p for p, _ in PAIRS] + [n for _, n in PAIRS])
    n = len(PAIRS)
    return np.mean([h[i][layer, -1] - h[i + n][layer, -1] for i in range(n)], axis=0)


def margins(lab, v, layer=2):
    """Mean log-prob preference of positives over negatives with +v and with −v."""
    x, mask = train._batch(lab, PAIRS, train.PROMPT)
    import mlx.core as mx

    out = []
    for sign in (1.0, -1.0):
        lp = np.array(train._completion_logprobs(lab, x, mask, layer,
                                                 mx.array(sign * v)))
        out.append(float(np.mean(lp[:len(PAIRS)] - lp[len(PAIRS):])))
    return out


def test_training_is_seeded_bounded_and_lowers_the_loss(lab):
    init = init_vector(lab)
    calls = []
    v, info = train.train_vector(lab, PAIRS, 2, init, 4.0, seed=1, steps=12,
                                 progress=lambda d, t: calls.append((d, t)))
    again, _ = train.train_vector(lab, PAIRS, 2, init, 4.0, seed=1, steps=12,
                                  progress=lambda d, t: None)
    other, _ = train.train_vector(lab, PAIRS, 2, init, 4.0, seed=2, steps=12,
                                  progress=lambda d, t: None)
    assert np.array_equal(v, again)
    assert not np.array_equal(v, other)  # 10 pairs > MINIBATCH: the seed picks minibatches
    assert np.linalg.norm(v) <= train.ALPHA_BOUND * 4.0 * (1 + 1e-5)
    assert info["losses"][-1] < info["losses"][0]
    assert calls[-1] == (info["steps"], 12) and len(calls) == info["steps"]
    # The objective it was trained for: +v prefers positives, −v negatives, more than at start.
    start = init / np.linalg.norm(init) * train.ALPHA_BOUND * 4.0
    up0, down0 = margins(lab, start)
    up, down = margins(lab, v)
    assert up - down > up0 - down0


def test_training_stops_on_a_plateau(lab, monkeypatch):
    monkeypatch.setattr(train, "LR", 0.0)  # nothing moves: the loss is flat at once
    v, info = train.train_vector(lab, PAIRS[:3], 2, init_vector(lab), 4.0, steps=50,
                                 progress=lambda d, t: None)
    assert info["steps"] == train.PATIENCE + 1


def test_extract_trained_stores_the_vector_at_its_layer(lab):
    mean = lab.extract("probe", PAIRS[:4], method="mean", calibrate=False)
    c = lab.extract("probe", PAIRS[:4], method="trained", layer=1, calibrate=False,
                    progress=lambda d, t: None)
    assert c.method == "trained" and c.layer == 1
    assert c.extra["trained"]["layer"] == 1 and c.extra["trained"]["steps"] >= 1
    assert not np.allclose(c.vectors[1], mean.vectors[1])
    others = [i for i in range(lab.num_layers) if i != 1]
    np.testing.assert_allclose(c.vectors[others], mean.vectors[others], rtol=1e-5, atol=1e-6)
    lab.generate("hello", c.steer(strength=0.2), max_tokens=2)
    with pytest.raises(errors.InvalidArgumentError, match="layer"):
        lab.extract("probe", PAIRS[:4], method="trained", layer=lab.num_layers)


@pytest.mark.parametrize("op", ["add", "ablate"])
def test_method_comparison_rows_in_one_batch(lab, monkeypatch, op):
    from mlx_steer import experiments as ex

    monkeypatch.setattr(train, "MAX_STEPS", 3)
    c = lab.extract("probe", PAIRS[:4], method="mean", calibrate=False)
    ticks = []
    recs = ex.method_comparison(lab, "hello", c, ("mean", "pca", "trained"), 0.3, op=op,
                                max_tokens=3, score=False,
                                extract_progress=lambda d, t: ticks.append((d, t)))
    assert [r["label"] for r in recs if not r["is_baseline"]] == ["mean", "pca", "trained"]
    assert sum(r["is_baseline"] for r in recs) == 1
    assert {r["op"] for r in recs if not r["is_baseline"]} == {op}
    assert ticks and ticks[-1][0] == ticks[-1][1]
    # The mean row equals the same steer run alone.
    alone = lab.generate("hello", c.ablate() if op == "ablate" else c.steer(c.layer, 0.3),
                         max_tokens=3)
    assert next(r for r in recs if r["label"] == "mean")["text"] == alone
