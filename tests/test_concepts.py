"""Concepts: one-pass extraction at every layer, defaults, the library, GGUF control vectors."""

import json
import os

import numpy as np
import pytest

from mlx_steer import Concept, Steer, errors
from mlx_steer.catalogue import BUILTINS, builtin_spec
from mlx_steer.concept import validate_name
from mlx_steer.library import Library
from tiny import PAIRS, tiny_home, tiny_lab  # noqa: F401 - tiny_home: autouse

@pytest.fixture(scope="module")
def lab():
    return tiny_lab("mistral")


@pytest.fixture
def concept(lab):
    return lab.extract("joy", PAIRS, calibrate=False)


def test_extraction_covers_every_layer_in_one_batched_pass(lab, monkeypatch):
    calls = []
    original = type(lab).hidden_states_batch

    def counting(self, texts, *a, **k):
        calls.append(len(texts))
        return original(self, texts, *a, **k)

    monkeypatch.setattr(type(lab), "hidden_states_batch", counting)
    c = lab.extract("joy", PAIRS, calibrate=False)
    assert calls == [2 * len(PAIRS)]
    assert c.vectors.shape == (lab.num_layers, lab.hidden_size)
    assert c.vectors.dtype == np.float32 and c.norms.shape == (lab.num_layers,)
    assert np.all(np.linalg.norm(c.vectors, axis=1) > 0)


def test_mean_method_is_mean_of_last_token_differences(lab, concept):
    expected = np.mean([lab.hidden_states(p)[:, -1] - lab.hidden_states(n)[:, -1]
                        for p, n in PAIRS], axis=0)
    np.testing.assert_allclose(concept.vectors, expected, atol=1e-4, rtol=1e-4)


def test_classic_method_is_the_first_pair_only(lab):
    c = lab.extract("joy", PAIRS, method="classic", calibrate=False)
    p, n = PAIRS[0]
    expected = lab.hidden_states(p)[:, -1] - lab.hidden_states(n)[:, -1]
    np.testing.assert_allclose(c.vectors, expected, atol=1e-4, rtol=1e-4)


def test_pca_sign_makes_positives_project_higher(lab):
    c = lab.extract("joy", PAIRS, method="pca", calibrate=False)
    diffs = np.stack([lab.hidden_states(p)[:, -1] - lab.hidden_states(n)[:, -1]
                      for p, n in PAIRS])
    for layer in range(lab.num_layers):
        proj = diffs[:, layer] @ c.vectors[layer]
        assert proj.mean() > 0
        # the first principal direction of the differences, up to scale
        _, _, vt = np.linalg.svd(diffs[:, layer].astype(np.float64))
        cos = abs(vt[0] @ c.vectors[layer]) / np.linalg.norm(c.vectors[layer])
        assert cos > 0.999


def test_mean_read_never_pools_position_zero(lab):
    c = lab.extract("joy", PAIRS[:1], read="mean", calibrate=False)
    hp, hn = lab.hidden_states(PAIRS[0][0]), lab.hidden_states(PAIRS[0][1])
    expected = hp[:, 1:].mean(axis=1) - hn[:, 1:].mean(axis=1)
    np.testing.assert_allclose(c.vectors, expected, atol=1e-4, rtol=1e-4)


def test_norms_are_median_token_norms_without_position_zero(lab, concept):
    texts = [p for p, _ in PAIRS] + [n for _, n in PAIRS]
    norms = np.concatenate([np.linalg.norm(lab.hidden_states(t)[:, 1:], axis=-1)
                            for t in texts], axis=1)
    np.testing.assert_allclose(concept.norms, np.median(norms, axis=1), rtol=1e-4)


def test_extraction_is_deterministic(lab):
    a = lab.extract("joy", PAIRS, method="pca")
    b = lab.extract("joy", PAIRS, method="pca")
    assert np.array_equal(a.vectors, b.vectors) and np.array_equal(a.norms, b.norms)
    assert (a.layer, a.strength) == (b.layer, b.strength)


def test_recommended_defaults_are_measured(lab):
    from mlx_steer import calibrate

    c = lab.extract("joy", PAIRS)
    lo, hi = round(0.3 * lab.num_layers), round(0.7 * lab.num_layers)
    assert lo <= c.extra["fisher_layer"] <= max(hi, lo + 1)
    grid = c.extra["calibration"]["grid"]
    assert (c.layer, c.strength) in [(g["layer"], g["strength"]) for g in grid]
    assert c.strength in calibrate.ALPHAS
    assert len({g["ppl_ratio"] for g in grid}) > 1  # measured, not constant
    s = c.steer()
    assert s.layer == c.layer
    assert np.isclose(np.linalg.norm(s.delta), c.strength * c.norms[c.layer], rtol=1e-5)


def test_relative_and_raw_strength(concept):
    s = concept.steer(2, 0.25)
    assert np.isclose(np.linalg.norm(s.delta) / concept.norms[2], 0.25, rtol=1e-5)
    raw = concept.steer(2, 3.0, relative=False)
    assert raw.strength == 3.0 and np.array_equal(raw.vector, concept.vectors[2])
    assert np.isclose(concept.raw_to_relative(2, concept.relative_to_raw(2, 0.4)), 0.4)
    assert [s.layer for s in concept.steers([0, 1, 3])] == [0, 1, 3]
    with pytest.raises(errors.LayerOutOfRangeError):
        concept.steer(concept.num_layers)
    with pytest.raises(errors.InvalidStrengthError):
        concept.steer(1, float("nan"))


def test_bad_extraction_input(lab):
    with pytest.raises(errors.InvalidArgumentError):
        lab.extract("x", [], calibrate=False)
    with pytest.raises(errors.InvalidArgumentError):
        lab.extract("x", [("", "neg")], calibrate=False)
    with pytest.raises(errors.InvalidArgumentError):
        lab.extract("x", PAIRS, method="magic", calibrate=False)
    with pytest.raises(errors.InvalidNameError):
        lab.extract("../evil", PAIRS, calibrate=False)


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "..", ".hidden", "x" * 65, "a b",
                                 "a\\b", "name.json", None])
def test_unsafe_names_are_refused(bad):
    with pytest.raises(errors.InvalidNameError):
        validate_name(bad)


def test_library_round_trip(lab, concept):
    lab.save_concept(concept)
    assert "joy" in lab.concepts.names() and set(BUILTINS) <= set(lab.concepts.names())
    back = lab.concept("joy")
    assert np.array_equal(back.vectors, concept.vectors)
    assert np.array_equal(back.norms, concept.norms)
    assert back.pairs == concept.pairs and back.layer == concept.layer
    assert back.model_fingerprint == lab.fingerprint
    meta = json.loads((lab.library.dir / "joy.json").read_text())
    for key in ("name", "method", "pairs", "norms", "layer", "strength", "model_fingerprint",
                "hidden_size", "num_layers", "schema_version", "created"):
        assert key in meta or key == "norms"
    lab.concepts.delete("joy")
    assert "joy" not in lab.concepts.names() and list(lab.library.dir.iterdir()) == []
    with pytest.raises(errors.ConceptNotFoundError):
        lab.concept("joy")


def test_another_models_concept_is_refused(lab, concept):
    other = tiny_lab("mistral", seed=1)  # same sizes, different weights
    assert other.fingerprint != lab.fingerprint
    with pytest.raises(errors.ModelMismatchError):
        other.save_concept(concept)
    with pytest.raises(errors.ModelMismatchError):
        other.generate("hello", concept.steer(1, 0.2), max_tokens=2)
    lab.save_concept(concept)
    # Copy the files into the other model's folder: loading is still refused.
    other.library.dir.mkdir(parents=True)
    for f in lab.library.dir.iterdir():
        (other.library.dir / f.name).write_bytes(f.read_bytes())
    with pytest.raises(errors.ModelMismatchError):
        other.concept("joy")


def test_corrupt_files_give_typed_errors_and_spare_the_rest(lab, concept):
    lab.save_concept(concept)
    second = lab.extract("calmness", PAIRS[:2], calibrate=False)
    lab.save_concept(second)
    meta = json.loads((lab.library.dir / "joy.json").read_text())
    vec = lab.library.dir / meta["vectors_file"]
    vec.write_bytes(vec.read_bytes()[:50])
    with pytest.raises(errors.CorruptFileError, match="joy"):
        lab.concept("joy")
    assert np.array_equal(lab.concept("calmness").vectors, second.vectors)
    (lab.library.dir / "calmness.json").write_text("{not json")
    with pytest.raises(errors.CorruptFileError):
        lab.concept("calmness")
    assert {"joy", "calmness"} <= set(lab.concepts.names())


def test_crash_mid_save_keeps_the_previous_version(lab, concept, monkeypatch):
    lab.save_concept(concept)
    import mlx_steer.library as libmod

    real = os.replace

    def crash(src, dst):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt("power cut")
        real(src, dst)

    monkeypatch.setattr(libmod.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        lab.save_concept(Concept.mix([(concept, 2.0)], normalize=False, name="joy"))
    monkeypatch.setattr(libmod.os, "replace", real)
    assert np.array_equal(lab.concept("joy").vectors, concept.vectors)
    assert lab.library.names() == ["joy"]


def test_arithmetic_and_mixes(lab, concept):
    other = lab.extract("other", [(n, p) for p, n in PAIRS], calibrate=False)
    assert np.allclose((concept + other).vectors, concept.vectors + other.vectors)
    assert np.allclose((concept - other).vectors, concept.vectors - other.vectors)
    assert np.allclose((2 * concept).vectors, 2 * concept.vectors)
    assert np.allclose((-concept).vectors, -concept.vectors)
    raw = Concept.mix([(concept, 0.7), (other, 0.3)], normalize=False, name="mixed")
    assert np.allclose(raw.vectors, 0.7 * concept.vectors + 0.3 * other.vectors, atol=1e-6)
    norm = Concept.mix([(concept, 0.5), (concept, 0.5)], normalize=True)
    np.testing.assert_allclose(norm.vectors, concept.vectors, rtol=1e-5, atol=1e-6)
    lab.save_concept(raw)
    assert np.allclose(lab.concept("mixed").vectors, raw.vectors)
    stranger = tiny_lab("mistral", seed=2).extract("s", PAIRS, calibrate=False)
    with pytest.raises(errors.ModelMismatchError):
        concept + stranger


def test_gguf_control_vector_round_trip(lab, concept, tmp_path):
    import gguf

    path = concept.to_gguf(tmp_path / "joy.gguf", layers="all")
    reader = gguf.GGUFReader(str(path))
    names = sorted(t.name for t in reader.tensors)
    assert names == sorted(f"direction.{i}" for i in range(1, lab.num_layers))
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1
    fields = reader.fields
    arch = fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    count = fields["controlvector.layer_count"]
    assert count.types[0] == gguf.GGUFValueType.UINT32
    assert int(count.parts[count.data[0]][0]) == lab.num_layers
    hint = fields["controlvector.model_hint"]
    assert bytes(hint.parts[hint.data[0]]).decode() == "mistral"

    back = Concept.from_gguf(path, lab)
    assert np.array_equal(back.vectors[1:], concept.vectors[1:])
    assert not back.vectors[0].any()
    assert back.model_fingerprint == lab.fingerprint


def test_default_gguf_export_reproduces_the_default_steer(lab, concept, tmp_path):
    c = concept
    c.layer, c.strength = 2, 0.3
    back = Concept.from_gguf(c.to_gguf(tmp_path / "d.gguf"), lab)
    assert back.layer == 2
    np.testing.assert_allclose(back.steer(2, 1.0, relative=False).delta, c.steer().delta,
                               rtol=1e-6)


def test_bad_control_vectors(lab, tmp_path):
    import gguf

    wide = tmp_path / "wide.gguf"
    w = gguf.GGUFWriter(str(wide), "controlvector")
    w.add_tensor("direction.1", np.ones(lab.hidden_size + 1, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(errors.VectorShapeError, match="another model"):
        Concept.from_gguf(wide, lab)
    extra = tmp_path / "extra.gguf"
    w = gguf.GGUFWriter(str(extra), "controlvector")
    w.add_tensor("direction.1", np.ones(lab.hidden_size, np.float32))
    w.add_tensor("bias.1", np.ones(lab.hidden_size, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(errors.CorruptFileError, match="bias.1"):
        Concept.from_gguf(extra, lab)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(errors.CorruptFileError):
        Concept.from_gguf(junk, lab)


def test_builtins_are_data_with_many_pairs():
    for name in BUILTINS:
        spec = builtin_spec(name)
        assert spec["name"] == name and len(spec["pairs"]) >= 8


def test_builtin_is_extracted_once_then_read_from_cache(lab, monkeypatch):
    first = lab.concept("pirate")
    assert first.extra.get("builtin") and first.category == "personality"

    def boom(*a, **k):
        raise AssertionError("extracted again")

    monkeypatch.setattr(type(lab.concepts), "extract", boom)  # what makes built-ins
    again = lab.concept("pirate")
    assert np.array_equal(again.vectors, first.vectors)
    assert "pirate" not in lab.library.names()  # built-in cache is separate


@pytest.mark.model
def test_happy_and_sad_defaults_move_sentiment_apart_on_smollm(smollm):
    """At their calibrated defaults: happy raises VADER over the unsteered rows, sad
    lowers it, and the two end up far apart (docs/CONCEPTS_EVAL.md)."""
    from mlx_steer.metrics import sentiment

    prompts = ["Describe a rainy Monday morning.", "Write about waiting at the bus stop.",
               "What happened at work today?"]
    happy, sad = smollm.concept("happy"), smollm.concept("sad")
    rows = [(p, s) for s in (None, happy.steer(), sad.steer()) for p in prompts]
    out = smollm.generate_batch(rows, max_tokens=30)
    base, up, down = np.array([sentiment(t) for t in out]).reshape(3, len(prompts)).mean(axis=1)
    assert up > base + 0.2, out
    assert down < base, out
    assert down < up - 0.4, out
