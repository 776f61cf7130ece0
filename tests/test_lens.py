"""mlx_steer.lens: analyses behind the Learn and Visualizer pages (tiny models, exact checks)."""

import numpy as np
import pytest

from mlx_steer import Steer, activations, lens, metrics
from mlx_steer.errors import InvalidArgumentError
from tiny import tiny_lab


@pytest.fixture(scope="module")
def lab():
    return tiny_lab("mistral", layers=6)


@pytest.fixture(scope="module")
def tied():
    return tiny_lab("qwen2", layers=4)


TEXT = "the cat sat on the mat"


def test_depth_bands_cover_every_layer_once():
    for n in (4, 6, 30, 32):
        bands = lens.depth_bands(n)
        covered = [i for b in bands for i in range(b["first"], b["last"] + 1)]
        assert covered == list(range(n))
        assert [b["key"] for b in bands] == ["early", "middle-early", "middle-late", "late"]
    assert lens.layer_stage(20, 30)["recommended"]
    assert not lens.layer_stage(2, 30)["recommended"]
    with pytest.raises(ValueError):
        lens.layer_stage(30, 30)


def test_residual_norms_exclude_position_zero(lab):
    n = activations.residual_norms(lab, [TEXT, "a dog ran"], chat=False)
    assert n.shape == (lab.num_layers,) and np.all(n > 0)
    hs = lab.hidden_states_batch([TEXT, "a dog ran"])
    for layer in (0, lab.num_layers - 1):
        rows = np.concatenate([h[layer, 1:] for h in hs]).astype(np.float64)
        assert n[layer] == pytest.approx(np.median(np.linalg.norm(rows, axis=-1)), rel=1e-6)
    with pytest.raises(InvalidArgumentError):
        activations.residual_norms(lab, [])


@pytest.mark.parametrize("which", ["lab", "tied"])
def test_logit_lens_last_layer_is_the_models_prediction(which, request):
    lab = request.getfixturevalue(which)
    k = 4
    recs = lens.logit_lens(lab, TEXT, k=k)
    assert len(recs) == lab.num_layers * k
    assert {r["layer"] for r in recs} == set(range(lab.num_layers))
    p = np.exp(metrics.log_softmax(lab.logits(TEXT)[-1]))
    last = [r for r in recs if r["layer"] == lab.num_layers - 1]
    assert [r["token_id"] for r in last] == list(np.argsort(-p)[:k])
    for r in last:
        assert r["prob"] == pytest.approx(p[r["token_id"]], rel=1e-4, abs=1e-6)
    for layer in range(lab.num_layers):
        probs = [r["prob"] for r in recs if r["layer"] == layer]
        assert probs == sorted(probs, reverse=True)


def test_logit_lens_sees_steering(lab):
    v = np.random.default_rng(0).standard_normal(lab.hidden_size).astype(np.float32)
    plain = lens.logit_lens(lab, TEXT, k=3)
    steered = lens.logit_lens(lab, TEXT, k=3, steer=Steer(v, 2, 20.0))
    assert [r for r in plain if r["layer"] < 2] == [r for r in steered if r["layer"] < 2]
    assert [r["token_id"] for r in plain if r["layer"] >= 2] != \
        [r["token_id"] for r in steered if r["layer"] >= 2]


def test_vector_lens_ranks_promoted_and_suppressed(lab):
    v = np.random.default_rng(1).standard_normal(lab.hidden_size)
    recs = lens.vector_lens(lab, v, k=5)
    up = [r["score"] for r in recs if r["direction"] == "promotes"]
    down = [r["score"] for r in recs if r["direction"] == "suppresses"]
    assert len(up) == len(down) == 5
    assert up == sorted(up, reverse=True) and down == sorted(down)
    assert min(up) > max(down)
    # Scale-free: the direction matters, not its length.
    again = lens.vector_lens(lab, 7 * v, k=5)
    assert [r["token_id"] for r in again] == [r["token_id"] for r in recs]
    with pytest.raises(ValueError):
        lens.vector_lens(lab, np.zeros(lab.hidden_size))


def test_embedding_identical_activation_not(lab):
    out = lens.embedding_vs_activation(lab, "cat", "the cat sat", "my big cat ran", layer=3)
    assert out["embedding_identical"] and out["embedding_cosine"] == pytest.approx(1.0)
    assert out["activation_cosine"] < 0.999
    assert out["positions"] == (len("the c") - 1 + 2, len("my big c") - 1 + 2)  # byte tokens
    assert [r["layer"] for r in out["records"]] == list(range(-1, lab.num_layers))
    with pytest.raises(ValueError, match="does not occur"):
        lens.embedding_vs_activation(lab, "dog", "the cat sat", "a cat ran")


def test_replace_steers_set_the_block_output_exactly(lab):
    layer = 3
    tokens = lab.encode(TEXT)
    h = lab.trace(tokens).hidden[layer]
    target = np.random.default_rng(2).standard_normal(lab.hidden_size).astype(np.float32)
    out = lab.trace(tokens, lens.replace_steers(h, target, layer)).hidden
    np.testing.assert_allclose(out[layer, 1:], np.broadcast_to(target, out[layer, 1:].shape),
                               atol=1e-3)
    np.testing.assert_array_equal(out[layer, 0], h[0])
    np.testing.assert_array_equal(out[:layer], lab.trace(tokens).hidden[:layer])


def test_add_vs_replace(lab):
    v = np.random.default_rng(3).standard_normal(lab.hidden_size).astype(np.float32)
    out = lens.add_vs_replace(lab, TEXT, v, layer=2, alpha=0.3, max_tokens=4, k=3)
    assert out["baseline"]["kl"] == 0.0
    assert out["replace"]["kl"] > out["add"]["kl"] >= 0.0
    assert out["baseline"]["text"] == lab.generate(TEXT, max_tokens=4)
    add = Steer(v / np.linalg.norm(v) * out["injected_norm"], 2, 1.0)
    assert out["add"]["text"] == lab.generate(TEXT, add, max_tokens=4)
    assert out["injected_norm"] == pytest.approx(0.3 * out["norm"], rel=1e-5)
    assert {r["mode"] for r in out["records"]} == {"baseline", "add", "replace"}


def test_projection_run_same_tokens_after_injection(lab):
    layer, strength = 2, 3.0
    v = np.random.default_rng(4).standard_normal(lab.hidden_size).astype(np.float32)
    steer = Steer(v, layer, strength)
    run = lens.projection_run(lab, TEXT, steer, v, max_tokens=5)
    assert run.tokens[:run.prompt_len] == lab.encode(TEXT, chat=True)
    assert run.steered_text == lab.generate(TEXT, steer, max_tokens=5)
    assert run.baseline_text == lab.generate(TEXT, max_tokens=5)
    assert run.baseline.shape == run.steered.shape == (lab.num_layers, len(run.tokens))
    assert np.all(np.isnan(run.baseline[:, 0]))
    d = run.diff[:, 1:]
    np.testing.assert_array_equal(d[:layer], 0.0)  # same tokens, nothing injected yet
    # measured after injection: the injected block moves by exactly strength·‖v‖
    np.testing.assert_allclose(d[layer], strength * np.linalg.norm(v), rtol=1e-4)
    assert run.first_shown >= 1 and run.labels[run.first_shown:]
    recs = run.records()
    assert {"layer", "position", "token", "baseline", "steered", "diff"} <= set(recs[0])
    with pytest.raises(ValueError):
        lens.projection_run(lab, TEXT, None, v)


def test_concept_space():
    rng = np.random.default_rng(5)
    vecs = {n: rng.standard_normal(16) for n in "abcd"}
    vecs["a2"] = 3 * vecs["a"]
    out = lens.concept_space(vecs)
    assert out["names"] == list(vecs)
    assert out["points"].shape == (5, 2)
    np.testing.assert_allclose(out["points"][0], out["points"][4], atol=1e-9)  # scale-free
    assert out["cosine"][0, 4] == pytest.approx(1.0)
    assert np.allclose(np.diag(out["cosine"]), 1.0)
    assert 0 < sum(out["explained"]) <= 1.0 + 1e-9
    with pytest.raises(ValueError):
        lens.concept_space({"a": vecs["a"]})
