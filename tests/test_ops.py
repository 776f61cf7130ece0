"""Operations beyond addition: directional ablation and capping, layer ranges (tiny models)."""

import numpy as np
import pytest

from mlx_steer import Concept, Steer, errors
from tiny import tiny_lab

PROMPT = "The meeting went"
TOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "mistral", "phi3"])
def lab(request):
    return tiny_lab(request.param)


def vec(lab, seed=1):
    return np.random.default_rng(seed).standard_normal(lab.hidden_size).astype(np.float32)


def unit(v):
    return v / np.linalg.norm(v)


def along(hidden, v):
    return hidden @ unit(v)


def test_ablation_zeroes_the_component_at_steered_positions(lab):
    v = vec(lab)
    base = lab.hidden_states(PROMPT)
    h = lab.hidden_states(PROMPT, Steer(v, 2, op="ablate"))
    scale = np.abs(along(base[2], v)).max()
    assert scale > 1e-2  # there was something to remove
    assert np.abs(along(h[2, 1:], v)).max() < TOL * max(1.0, scale)
    # Position 0 (the attention sink) is not steered by "all"; upstream blocks are untouched.
    assert np.array_equal(h[2, 0], base[2, 0])
    assert np.array_equal(h[:2], base[:2])
    # positions=0 includes the first token.
    h0 = lab.hidden_states(PROMPT, Steer(v, 2, op="ablate", positions=0))
    assert abs(float(along(h0[2, 0], v))) < TOL * max(1.0, scale)
    # The rest of the state is kept: h - (h·v̂)v̂.
    expect = base[2] - np.outer(along(base[2], v), unit(v))
    np.testing.assert_allclose(h0[2], expect, atol=1e-4, rtol=1e-4)


def test_ablating_twice_equals_once(lab):
    v = vec(lab)
    once = lab.trace(PROMPT, Steer(v, 1, op="ablate"))
    twice = lab.trace(PROMPT, [Steer(v, 1, op="ablate"), Steer(3 * v, 1, op="ablate")])
    np.testing.assert_allclose(twice.hidden, once.hidden, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(twice.logits, once.logits, atol=1e-4, rtol=1e-4)
    every = lab.trace(PROMPT, Steer(v, "all", op="ablate"))
    again = lab.trace(PROMPT, [Steer(v, "all", op="ablate")] * 2)
    np.testing.assert_allclose(again.logits, every.logits, atol=1e-4, rtol=1e-4)


def test_ablation_strength_is_ignored(lab):
    v = vec(lab)
    a = lab.trace(PROMPT, Steer(v, 1, 0.0, op="ablate"))
    b = lab.trace(PROMPT, Steer(v, 1, 7.0, op="ablate"))
    assert np.array_equal(a.logits, b.logits)
    assert not np.allclose(a.logits, lab.logits(PROMPT))


def test_ablation_at_all_covers_every_block_and_the_embedding(lab):
    v = vec(lab)
    h = lab.hidden_states(PROMPT, Steer(v, "all", op="ablate", positions=0))
    norm = np.linalg.norm(h, axis=-1).max()
    assert np.abs(along(h, v)).max() < TOL * norm
    # "all" == the embedding output (-1) and each block, middle and output, one steer each.
    spelled = [Steer(v, -1, op="ablate", positions=0)] + [
        Steer(v, i, op="ablate", positions=0, mid=True) for i in range(lab.num_layers)]
    assert np.array_equal(lab.logits(PROMPT, spelled),
                          lab.logits(PROMPT, Steer(v, "all", op="ablate", positions=0)))
    # Leaving out the embedding output or the middle of the blocks changes the result.
    outputs = [Steer(v, -1, op="ablate", positions=0),
               Steer(v, (0, lab.num_layers), op="ablate", positions=0)]
    assert not np.allclose(lab.logits(PROMPT, outputs), lab.logits(PROMPT, spelled), atol=1e-4)
    assert not np.allclose(lab.logits(PROMPT, spelled[1:]), lab.logits(PROMPT, spelled),
                           atol=1e-4)


def test_mid_block_ablation_is_the_attention_output_projected(lab):
    v = vec(lab)
    base = lab.hidden_states(PROMPT)
    # At block 0 with an ablated input, mid ablation differs from output-only ablation.
    a = lab.hidden_states(PROMPT, [Steer(v, -1, op="ablate"), Steer(v, 0, op="ablate")])
    b = lab.hidden_states(PROMPT, [Steer(v, -1, op="ablate"),
                                   Steer(v, 0, op="ablate", mid=True)])
    assert not np.allclose(a[0], b[0], atol=1e-5)
    assert np.abs(along(b[0, 1:], v)).max() < TOL * np.abs(base[0]).max()
    with pytest.raises(errors.InvalidArgumentError, match="mid"):
        Steer(v, 1, 1.0, mid=True)
    with pytest.raises(errors.InvalidArgumentError, match="mid"):
        Steer(v, -1, op="ablate", mid=True)


def test_layer_range_expands_to_per_block_steers(lab):
    v = vec(lab)
    for op in ("add", "cap", "ablate"):
        rng = Steer(v, (1, 3), 0.5, op=op)
        assert [s.layer for s in rng.expand(lab.num_layers)] == [1, 2]
        each = [Steer(v, 1, 0.5, op=op), Steer(v, 2, 0.5, op=op)]
        assert np.array_equal(lab.logits(PROMPT, rng), lab.logits(PROMPT, each))
    assert [s.layer for s in Steer(v, "all").expand(4)] == [0, 1, 2, 3]
    with pytest.raises(errors.LayerOutOfRangeError, match="out of range"):
        lab.logits(PROMPT, Steer(v, (2, lab.num_layers + 1)))
    for bad in [(3, 3), (2, 1), (-1, 2), (1, 2, 3), "some", (1.0, 2)]:
        with pytest.raises(errors.LayerOutOfRangeError):
            Steer(v, bad)


def test_cap_clamps_the_component(lab):
    v = vec(lab, seed=3)
    base = lab.hidden_states(PROMPT)
    p = along(base[2, 1:], v)
    c = float(np.median(p))
    s = Steer(v, 2, c / float(np.linalg.norm(v)), op="cap")
    assert s.cap == pytest.approx(c, rel=1e-6)
    h = lab.hidden_states(PROMPT, s)
    q = along(h[2, 1:], v)
    assert q.max() <= c + 1e-4 * max(1.0, abs(c))
    margin = 1e-3 * max(1.0, abs(c))  # the median token itself sits on the cap
    low, high = p < c - margin, p > c + margin
    assert low.any() and high.any()
    # Tokens under the cap are bit-identical; those over it land on it.
    assert np.array_equal(h[2, 1:][low], base[2, 1:][low])
    np.testing.assert_allclose(q[high], c, atol=1e-4 * max(1.0, abs(c)))
    # Orthogonal to v̂ nothing moves.
    rest = lambda x: x - np.outer(along(x, v), unit(v))  # noqa: E731
    np.testing.assert_allclose(rest(h[2, 1:]), rest(base[2, 1:]), atol=1e-4, rtol=1e-4)
    # A cap above every projection changes nothing.
    high = Steer(v, 2, (p.max() + 1) / float(np.linalg.norm(v)), op="cap")
    assert np.array_equal(lab.logits(PROMPT, high), lab.logits(PROMPT))


def test_composition_order_adds_then_caps_then_ablates(lab):
    v, w = vec(lab, 1), vec(lab, 2)
    add, abl = Steer(v, 1, 2.0), Steer(v, 1, op="ablate")
    a = lab.hidden_states(PROMPT, [abl, add])
    b = lab.hidden_states(PROMPT, [add, abl])
    assert np.array_equal(a, b)
    assert np.abs(along(a[1, 1:], v)).max() < TOL * np.linalg.norm(a[1], axis=-1).max()
    cap = Steer(w, 1, 0.0, op="cap")
    c1 = lab.hidden_states(PROMPT, [cap, Steer(w, 1, 5.0)])
    assert along(c1[1, 1:], w).max() <= 1e-4


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_batched_rows_with_different_ops_equal_rows_alone(lab, temperature):
    v, w = vec(lab, 1), vec(lab, 2)
    rows = [
        (PROMPT, None),
        (PROMPT, Steer(v, 1, 1.5)),
        (PROMPT, Steer(v, 1, op="ablate")),
        ("Another prompt here", Steer(w, 2, 0.1, op="cap", positions="generated")),
        (PROMPT, [Steer(v, "all", op="ablate"), Steer(w, 2, 2.0)]),
        ("Hi", Steer(w, (0, 3), 0.5, op="cap", positions=0)),
    ]
    batched = lab.generate_batch_tokens(rows, max_tokens=8, temperature=temperature, seed=4)
    for (prompt, steer), row in zip(rows, batched):
        alone = lab.generate_batch_tokens([(prompt, steer)], max_tokens=8,
                                          temperature=temperature, seed=4)[0]
        assert row.tokens == alone.tokens
        np.testing.assert_allclose(row.first_logprobs, alone.first_logprobs,
                                   atol=1e-4, rtol=1e-4)
        if temperature == 0.0:
            assert lab.generate(prompt, steer, max_tokens=8) == row.text
    # The ops do something different from one another.
    firsts = [r.first_logprobs for r in batched[:3]]
    assert not np.allclose(firsts[0], firsts[1]) and not np.allclose(firsts[0], firsts[2])


def test_cached_generation_equals_full_forward_with_ablation(lab):
    v = vec(lab)
    s = [Steer(v, "all", op="ablate"), Steer(v, 2, 0.5, op="cap")]
    r = lab.generate_batch_tokens([(PROMPT, s)], max_tokens=6, chat=False)[0]
    toks = lab.encode(PROMPT) + r.tokens
    full = lab.logits(toks, s)
    assert [int(np.argmax(x)) for x in full[len(toks) - len(r.tokens) - 1:-1]] == r.tokens


def test_bad_ops_are_typed_errors(lab):
    v = vec(lab)
    with pytest.raises(errors.InvalidArgumentError, match="op must be"):
        Steer(v, 1, op="multiply")
    for op in ("ablate", "cap"):
        with pytest.raises(errors.VectorShapeError, match="non-zero"):
            Steer(np.zeros(lab.hidden_size), 1, op=op)
    assert Steer(np.zeros(lab.hidden_size), 1).op == "add"  # zero addition is fine


def concept_of(lab, seed=5):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((lab.num_layers, lab.hidden_size)).astype(np.float32)
    norms = np.linspace(2.0, 5.0, lab.num_layers).astype(np.float32)
    return Concept("probe", vectors, norms, layer=2, strength=0.3,
                   model_fingerprint=lab.fingerprint)


def test_concept_ops(lab):
    c = concept_of(lab)
    s = c.steer(1, 0.2, op="cap")
    assert s.op == "cap" and s.layer == 1
    assert s.cap == pytest.approx(0.2 * float(c.norms[1]), rel=1e-5)
    a = c.steer(1, op="ablate")
    assert a.op == "ablate" and np.array_equal(a.vector, c.vectors[1])
    ab = c.ablate()
    assert ab.layer == "all" and ab.op == "ablate"
    assert np.array_equal(ab.vector, c.vectors[c.layer])
    assert c.ablate(3).layer == 3
    per_block = c.steer("all", 0.1)
    assert [x.layer for x in per_block] == list(range(lab.num_layers))
    for x in per_block:  # one direction, each block's own relative conversion
        assert np.array_equal(x.vector, c.vectors[c.layer])
        assert np.linalg.norm(x.delta) == pytest.approx(0.1 * c.norms[x.layer], rel=1e-5)
    caps = c.steer((1, 3), 0.1, op="cap")
    assert [x.cap for x in caps] == pytest.approx([0.1 * c.norms[1], 0.1 * c.norms[2]])
    lab.generate(PROMPT, [ab] + caps, max_tokens=2)
    with pytest.raises(errors.LayerOutOfRangeError):
        c.steer((2, lab.num_layers + 2), 0.1)


@pytest.mark.model
def test_smollm_ablation_cap_and_batched_ops(smollm):
    rng = np.random.default_rng(0)
    v = rng.standard_normal(smollm.hidden_size).astype(np.float32)
    text = "The weather today is"
    base = smollm.hidden_states(text)
    h = smollm.hidden_states(text, Steer(v, "all", op="ablate", positions=0))
    assert np.abs(along(h, v)).max() < 1e-4 * np.linalg.norm(h, axis=-1).max()
    once = smollm.logits(text, Steer(v, 12, op="ablate"))
    twice = smollm.logits(text, [Steer(v, 12, op="ablate")] * 2)
    np.testing.assert_allclose(twice, once, atol=1e-3, rtol=1e-4)
    c = float(np.median(along(base[12, 1:], v)))
    capped = smollm.hidden_states(text, Steer(v, 12, c / np.linalg.norm(v), op="cap"))
    assert along(capped[12, 1:], v).max() <= c + 1e-3 * abs(c) + 1e-4
    rows = [("Tell me a story.", None), ("Tell me a story.", Steer(v, 12, op="ablate")),
            ("Hello!", Steer(v, 10, 4.0)), ("Hello!", Steer(v, "all", op="ablate"))]
    batched = smollm.generate_batch_tokens(rows, max_tokens=4)
    for (prompt, steer), row in zip(rows, batched):
        alone = smollm.generate_batch_tokens([(prompt, steer)], max_tokens=4)[0]
        assert row.tokens == alone.tokens
        np.testing.assert_allclose(row.first_logprobs, alone.first_logprobs, atol=2e-3)


def test_experiment_rows_with_ops_are_scored(lab):
    from mlx_steer import experiments as ex

    c = concept_of(lab)
    rows = [ex.steered_variant(PROMPT, c, op="ablate"),
            ex.steered_variant(PROMPT, c, 2, 0.0, op="cap"),
            ex.steered_variant(PROMPT, c, 2, 0.3)]
    recs = ex.run(lab, rows, max_tokens=4)
    base, abl, cap, add = recs
    assert base["is_baseline"] and not cap["is_baseline"]  # a cap at 0 is not a no-op
    assert [r["op"] for r in recs[1:]] == ["ablate", "cap", "add"]
    assert abs(abl["projection"]) < 1e-4 * max(1.0, abs(abl["projection_baseline"]))
    assert cap["projection"] <= 1e-4
    assert add["projection"] > add["projection_baseline"]


def test_hidden_states_batch_with_ranges_equals_single(lab):
    v = vec(lab)
    s = [Steer(v, "all", op="ablate"), Steer(v, (1, 3), 0.2, op="cap")]
    batch = lab.hidden_states_batch([PROMPT, "Hi there"], steer=s)
    for text, h in zip([PROMPT, "Hi there"], batch):
        np.testing.assert_allclose(h, lab.hidden_states(text, s), atol=1e-5, rtol=1e-5)
