"""Experiments: batched rows equal lone requests, each layer's own vector, metrics."""

import math

import numpy as np
import pytest
from tiny import tiny_lab

from mlx_steer import Concept, Steer
from mlx_steer import experiments as X
from mlx_steer import metrics as M
from mlx_steer.errors import InvalidArgumentError, LayerOutOfRangeError

PROMPT = "hello there"


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_STEER_HOME", str(tmp_path))


@pytest.fixture(scope="module")
def lab():
    return tiny_lab("mistral")


def fake_concept(lab, name="happy", seed=0):
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(lab.num_layers, lab.hidden_size)).astype(np.float32)
    vecs *= np.arange(1, lab.num_layers + 1, dtype=np.float32)[:, None]  # distinct norms
    return Concept(name, vecs, np.full(lab.num_layers, 8.0, np.float32), 2, 0.5,
                   lab.fingerprint)


def by_kind(records, kind):
    return [r for r in records if r["kind"] == kind]


# ---- batched rows equal lone requests -----------------------------------------------------


def test_strength_sweep_rows_equal_one_by_one(lab):
    c = fake_concept(lab)
    recs = X.strength_explorer(lab, PROMPT, c, [0.3, 1.0, 2.0], layer=1, max_tokens=8)
    assert [r["strength"] for r in recs] == [0.0, 0.3, 1.0, 2.0]  # 0 added, first
    assert recs[0]["is_baseline"] and sum(r["is_baseline"] for r in recs) == 1
    for r in recs:
        alone = lab.generate(PROMPT, c.steer(1, r["strength"]), max_tokens=8)
        assert r["text"] == alone
        assert r["raw_strength"] == pytest.approx(c.relative_to_raw(1, r["strength"]))
    assert recs[0]["text"] == lab.generate(PROMPT, max_tokens=8)


def test_raw_strengths(lab):
    c = fake_concept(lab)
    recs = X.strength_explorer(lab, PROMPT, c, [0, 1.5], layer=2, relative=False,
                               max_tokens=4, score=False)
    assert recs[1]["raw_strength"] == 1.5
    assert recs[1]["strength"] == pytest.approx(c.raw_to_relative(2, 1.5))
    assert recs[1]["text"] == lab.generate(PROMPT, Steer(c.vectors[2], 2, 1.5), max_tokens=4)


def test_layer_analysis_uses_each_layers_own_vector(lab):
    c = fake_concept(lab)
    variants = X.layer_variants(PROMPT, c, [0, 1, 3], strength=0.5)
    for v in variants:
        (s,) = v.steers
        assert s.layer == v.layer
        np.testing.assert_array_equal(s.vector, c.vectors[v.layer])
        assert s.strength == pytest.approx(c.relative_to_raw(v.layer, 0.5))
    recs = X.layer_analysis(lab, PROMPT, c, [0, 1, 3], 0.5, max_tokens=6)
    assert recs[0]["kind"] == "baseline" and recs[0]["layer"] is None
    assert [r["layer"] for r in by_kind(recs, "layer")] == [0, 1, 3]
    for r in by_kind(recs, "layer"):
        raw = c.relative_to_raw(r["layer"], 0.5)
        assert r["raw_strength"] == pytest.approx(raw)
        steer = Steer(c.vectors[r["layer"]], r["layer"], raw)
        assert r["text"] == lab.generate(PROMPT, steer, max_tokens=6)
        assert r["stage"] in ("early", "middle-early", "middle-late", "late")
    assert X.default_layers(30, 14) == [0, 3, 6, 9, 12, 14, 15, 18, 21, 24, 27]


def test_compare_is_two_rows_and_prompts_may_differ(lab):
    c = fake_concept(lab)
    recs = X.compare(lab, [PROMPT, "a b c"], c, 1, 1.0, max_tokens=5)
    assert [(r["kind"], r["prompt"]) for r in recs] == [
        ("baseline", PROMPT), ("baseline", "a b c"), ("compare", PROMPT), ("compare", "a b c")]
    alone = X.compare(lab, "a b c", c, 1, 1.0, max_tokens=5)
    assert len(alone) == 2
    for a, b in zip(alone, [recs[1], recs[3]]):
        assert a["text"] == b["text"]
        assert a["kl_divergence"] == pytest.approx(b["kl_divergence"], abs=1e-5)
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)
    # A lone baseline has the concept and layer of the single steered row (strength 0).
    assert alone[0]["concept"] == "happy" and alone[0]["layer"] == 1
    assert alone[0]["strength"] == 0.0 and alone[0]["projection"] is not None


# ---- metrics --------------------------------------------------------------------------------


def test_model_metrics_match_lone_passes(lab):
    c = fake_concept(lab)
    recs = X.strength_explorer(lab, PROMPT, c, [0.8], layer=2, max_tokens=8)
    base, row = recs
    outs = lab.generate_batch_tokens([(PROMPT, None), (PROMPT, c.steer(2, 0.8))],
                                     max_tokens=8)
    assert base["kl_divergence"] == 0.0
    assert row["kl_divergence"] == pytest.approx(
        M.kl_divergence(outs[0].first_logprobs, outs[1].first_logprobs), rel=1e-6)
    prompt = lab.encode(PROMPT, chat=True)
    unit = c.vectors[2] / np.linalg.norm(c.vectors[2])
    for rec, out, steer in ((base, outs[0], None), (row, outs[1], c.steer(2, 0.8))):
        toks = prompt + out.tokens
        plain = lab.trace(toks)
        ppl = M.perplexity(plain.logits[len(prompt) - 1:-1], np.array(out.tokens))
        assert rec["perplexity"] == pytest.approx(ppl, rel=1e-3)
        steered = lab.trace(toks, steer, prompt_len=len(prompt))
        proj = float((steered.hidden[2, len(prompt):] @ unit).mean())
        assert rec["projection"] == pytest.approx(proj, rel=1e-3, abs=1e-3)
        text_proj = float((plain.hidden[2, len(prompt):] @ unit).mean())
        assert rec["text_projection"] == pytest.approx(text_proj, rel=1e-3, abs=1e-3)
        assert rec["projection_baseline"] == pytest.approx(base["projection"])
    # At the steered block the state is exactly unsteered + raw·v on every generated token.
    assert row["projection"] - row["text_projection"] == pytest.approx(
        row["raw_strength"] * np.linalg.norm(c.vectors[2]), rel=1e-3)


def test_projection_of_rows_steered_upstream_uses_a_steered_pass(lab):
    c = fake_concept(lab)
    steers = [Steer(c.vectors[0], 0, 0.7), c.steer(2, 0.5, positions="generated")]
    v = X.Variant(PROMPT, steers, "custom", c, 2, 0.5, steers[1].strength)
    base, rec = X.run(lab, [v], max_tokens=6)
    out = lab.generate_batch_tokens([(PROMPT, steers)], max_tokens=6)[0]
    assert rec["text"] == out.text
    prompt = lab.encode(PROMPT, chat=True)
    tr = lab.trace(prompt + out.tokens, steers, prompt_len=len(prompt))
    unit = c.vectors[2] / np.linalg.norm(c.vectors[2])
    want = float((tr.hidden[2, len(prompt):] @ unit).mean())
    assert rec["projection"] == pytest.approx(want, rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("positions", ["prompt", "generated", "late"])
def test_projection_follows_the_positions_rule(lab, positions):
    c = fake_concept(lab)
    prompt = lab.encode(PROMPT, chat=True)
    pos = len(prompt) + 3 if positions == "late" else positions
    v = X.steered_variant(PROMPT, c, 2, 0.8, positions=pos)
    base, rec = X.run(lab, [v], max_tokens=6)
    out = lab.generate_batch_tokens([(PROMPT, v.steers)], max_tokens=6)[0]
    tr = lab.trace(prompt + out.tokens, v.steers, prompt_len=len(prompt))
    unit = c.vectors[2] / np.linalg.norm(c.vectors[2])
    want = float((tr.hidden[2, len(prompt):] @ unit).mean())
    assert rec["projection"] == pytest.approx(want, rel=1e-3, abs=1e-3)


def test_text_metrics_known_values():
    m = X.text_metrics("I am happy and joyful", ["happy", "joyful"])
    assert m["marker_rate"] == pytest.approx(2 / 5)
    assert m["words"] == 5 and m["repetition_rate"] == 0.0 and m["distinct_2"] == 1.0
    assert m["sentiment"] == pytest.approx(M.sentiment("I am happy and joyful")) and \
        m["sentiment"] > 0.5
    loop = X.text_metrics("a b c a b c a b c")
    assert loop["repetition_rate"] == pytest.approx(1 - 3 / 7)
    assert loop["distinct_2"] == pytest.approx(3 / 8) and loop["marker_rate"] == 0.0
    assert X.text_metrics("")["words"] == 0
    assert X.concept_score({"kind": "sentiment", "direction": -1}, m) == -m["sentiment"]
    assert X.concept_score({"kind": "markers"}, m) == m["marker_rate"]
    assert X.concept_score({"kind": "length", "direction": -1}, m) == -5
    lex = {"kind": "lexicon", "direction": 1, "categories": ["joy"]}
    score = X.concept_score(lex, {**m, "text": "I am happy and joyful"})
    assert score == pytest.approx(M.lexicon_rate("I am happy and joyful", ["joy"])) and score > 0
    assert X.concept_score(None, m) is None


def test_builtin_markers_and_eval_rules(lab):
    c = fake_concept(lab, "pirate")
    assert "matey" in X.concept_markers(c) and X.concept_eval(c) == {"kind": "markers"}
    own = fake_concept(lab, "mine")
    assert X.concept_markers(own) == [] and X.concept_eval(own) is None
    own.extra["markers"] = ["zap"]
    assert X.concept_markers(own) == ["zap"]


def test_records_are_tidy_and_json_ready(lab):
    import json

    recs = X.strength_explorer(lab, PROMPT, fake_concept(lab), [0.5], max_tokens=3)
    keys = set(recs[0])
    assert all(set(r) == keys for r in recs)
    assert {"kind", "prompt", "concept", "layer", "strength", "raw_strength", "text",
            "sentiment", "marker_rate", "perplexity", "repetition_rate", "kl_divergence",
            "projection"} <= keys
    json.dumps(recs, allow_nan=False)


def test_summarize_deltas():
    recs = [
        {"kind": "baseline", "is_baseline": True, "prompt": "p", "concept": None,
         "layer": None, "strength": 0.0, "sentiment": 0.1, "perplexity": 3.0},
        {"kind": "eval", "is_baseline": False, "prompt": "p", "concept": "happy", "layer": 1,
         "strength": 0.5, "sentiment": 0.7, "perplexity": 5.0, "marker_rate": 0.2,
         "marker_rate_baseline": 0.05, "concept_score": 0.7, "concept_score_baseline": 0.1},
    ]
    s = X.summarize(recs, by=("kind", "concept"))
    assert s[0]["n"] == 1 and "sentiment_delta" not in s[0]
    assert s[1]["sentiment_delta"] == pytest.approx(0.6)
    assert s[1]["perplexity_delta"] == pytest.approx(2.0)
    assert s[1]["marker_rate_delta"] == pytest.approx(0.15)
    assert s[1]["concept_score_delta"] == pytest.approx(0.6)


# ---- mixing, evaluation, progress, errors ---------------------------------------------------


def test_mix_generates_and_saves(lab, tmp_path):
    a, b = fake_concept(lab, "happy", 1), fake_concept(lab, "excited", 2)
    a.layer, b.layer, b.strength = 1, 3, 0.3
    mixed, recs = X.mix(lab, PROMPT, [(a, 0.7), (b, 0.3)], max_tokens=4, save=True)
    assert mixed.name == "mix-happy70-excited30"
    assert mixed.layer == 1 and mixed.strength == pytest.approx(0.7 * 0.5 + 0.3 * 0.3)
    assert [r["kind"] for r in recs] == ["baseline", "component", "component", "mix"]
    assert all(r["layer"] == 1 for r in recs[1:])
    assert recs[-1]["text"] == lab.generate(PROMPT, mixed.steer(), max_tokens=4)
    assert recs[-1]["saved"] and lab.concept(mixed.name).extra["mix"] == [
        ["happy", 0.7], ["excited", 0.3]]
    raw, _ = X.mix(lab, PROMPT, [(a, 1.0), (b, -1.0)], normalize=False, max_tokens=2,
                   include_parts=False, name="diff")
    np.testing.assert_allclose(raw.vectors, a.vectors - b.vectors, rtol=1e-6)


def test_evaluate_and_progress(lab):
    c = fake_concept(lab)
    seen = []
    recs = X.evaluate(lab, [c], ["one", "two"], max_tokens=4,
                      progress=lambda d, t: seen.append((d, t)))
    assert [r["kind"] for r in recs] == ["baseline", "baseline", "eval", "eval"]
    total = seen[-1][1]
    assert seen[-1][0] == total and all(d <= t for d, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_errors(lab):
    c = fake_concept(lab)
    with pytest.raises(InvalidArgumentError):
        X.strength_explorer(lab, PROMPT, c, [], max_tokens=2)
    with pytest.raises(InvalidArgumentError):
        X.compare(lab, [], c, max_tokens=2)
    with pytest.raises(LayerOutOfRangeError):
        X.layer_analysis(lab, PROMPT, c, [0, 9], max_tokens=2)
    with pytest.raises(InvalidArgumentError):
        X.mix(lab, PROMPT, [], max_tokens=2)


def test_sampled_rows_share_the_seed(lab):
    c = fake_concept(lab)
    recs = X.strength_explorer(lab, PROMPT, c, [0.0], max_tokens=6, temperature=1.0, seed=3,
                               score=False)
    again = X.run(lab, [X.Variant(PROMPT), X.Variant(PROMPT)], max_tokens=6, temperature=1.0,
                  seed=3, score=False)
    assert again[0]["text"] == again[1]["text"] == recs[0]["text"]
    assert math.isclose(again[1]["kl_divergence"], 0.0, abs_tol=1e-9)


# ---- the embedded model ---------------------------------------------------------------------


@pytest.mark.model
def test_smollm_sweep_rows_equal_one_by_one(smollm):
    from mlx_steer.extract import extract
    from mlx_steer.catalogue import builtin_spec

    c = extract(smollm, "happy", builtin_spec("happy")["pairs"][:4], calibrate=False)
    prompt = "Tell me about your weekend."
    recs = X.strength_explorer(smollm, prompt, c, [0.2, 0.5], layer=14, max_tokens=8)
    for r in recs:
        assert r["text"] == smollm.generate(prompt, c.steer(14, r["strength"]), max_tokens=8)
        assert r["perplexity"] > 1 and math.isfinite(r["perplexity"])
    assert recs[2]["kl_divergence"] > recs[1]["kl_divergence"] > 0
    assert recs[2]["projection"] > recs[1]["projection"] > recs[0]["projection"]
    assert "happy" in X.concept_markers(c)
