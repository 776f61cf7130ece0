"""Calibration: defaults chosen from generated text; the prompting baseline; the cache key."""

import numpy as np
import pytest

from mlx_steer import Concept
from mlx_steer import calibrate as C
from mlx_steer import experiments as X
from mlx_steer.prompts import default_instruction, prompt_set, with_instruction
from tiny import PAIRS, tiny_home, tiny_lab  # noqa: F401 - tiny_home: autouse

@pytest.fixture(scope="module")
def lab():
    return tiny_lab("mistral")


def _g(layer, a, expression, projection=0.02, coherent=True):
    return {"layer": layer, "strength": a, "expression": expression,
            "projection": projection, "coherent": coherent}


def test_choose_takes_the_coherent_expressing_candidate_that_moves_the_activations_most():
    grid = [_g(4, 0.1, 0.2, projection=0.01), _g(4, 0.2, 0.5, projection=0.02),
            _g(4, 0.3, 0.9, projection=0.09, coherent=False), _g(6, 0.1, 0.3, projection=0.03),
            _g(6, 0.2, 0.05, projection=0.08)]  # expression under the minimum: not expressing
    assert C.choose(grid, 5, 0.1) == (6, 0.1, True)
    # Equal projection: the weaker strength.
    assert C.choose([_g(4, 0.3, 0.5), _g(6, 0.1, 0.2)], 5, 0.1) == (6, 0.1, True)


def test_choose_reports_not_steering():
    # Expressive only where incoherent, or the activations do not move: not steering.
    grid = [_g(4, 0.1, 0.02), _g(4, 0.2, 0.6, coherent=False), _g(6, 0.1, 0.4, projection=0.0)]
    layer, alpha, steers = C.choose(grid, 5, 0.1)
    assert not steers and (layer, alpha) == (6, 0.1)
    assert C.choose([_g(4, 0.1, 1.0, coherent=False)], 5, 0.1) == (5, 0.1, False)


def test_candidate_blocks():
    assert C.candidate_blocks(30) == [12, 15, 18]
    assert C.candidate_blocks(4, (0.0, 0.5, 1.0)) == [0, 2, 3]


def test_prompt_sets_are_disjoint_and_instructions_default():
    cal, ev = prompt_set("calibration"), prompt_set("evaluation")
    assert len(ev) >= 24 and len(cal) >= C.N_PROMPTS and not set(cal) & set(ev)
    assert default_instruction("very_cheerful") == "Answer in a very cheerful way."
    assert with_instruction("Hi.", "Be brief.") == "Hi. Be brief."


def test_calibration_is_deterministic_and_recorded(lab):
    c = lab.extract("joy", PAIRS, calibrate=False)
    a = C.calibrate(lab, c, blocks=[1, 2], alphas=[0.1, 0.3], max_tokens=4,
                    progress=lambda d, t: None)
    b = C.calibrate(lab, c, blocks=[1, 2], alphas=[0.1, 0.3], max_tokens=4,
                    progress=lambda d, t: None)
    assert a.to_dict() == b.to_dict()
    assert [(g["layer"], g["strength"]) for g in a.grid] == [(1, 0.1), (1, 0.3), (2, 0.1),
                                                            (2, 0.3)]
    assert a.instruction == default_instruction("joy")
    chosen = [g for g in a.grid if (g["layer"], g["strength"]) == (a.layer, a.strength)]
    assert chosen and (chosen[0]["coherent"] or not any(g["coherent"] for g in a.grid))
    C.apply(c, a)
    assert (c.layer, c.strength) == (a.layer, a.strength)
    assert c.extra["calibration"]["grid"] == a.grid and c.extra["steers"] == a.steers


def test_extract_calibrates_by_default(lab):
    seen = []
    c = lab.extract("joy", PAIRS, instruction="Answer joyfully.",
                    progress=lambda d, t: seen.append((d, t)))
    cal = c.extra["calibration"]
    assert cal["version"] == C.CALIBRATION_VERSION and cal["instruction"] == "Answer joyfully."
    assert c.layer in C.candidate_blocks(lab.num_layers) and c.strength in C.ALPHAS
    assert len(cal["grid"]) == len(C.candidate_blocks(lab.num_layers)) * len(C.ALPHAS)
    assert seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert isinstance(c.extra["fisher_layer"], int)


def test_prompted_rows_are_unsteered_with_the_instruction(lab):
    c = lab.extract("joy", PAIRS, calibrate=False)
    recs = X.compare(lab, "Tell me a story.", c, prompted=True, max_tokens=5,
                     expression=True)
    kinds = [r["kind"] for r in recs]
    assert kinds == ["baseline", "compare", "prompted"]
    p = recs[2]
    assert not p["is_baseline"] and p["instruction"] == default_instruction("joy")
    alone = lab.generate(with_instruction("Tell me a story.", p["instruction"]), max_tokens=5)
    assert p["text"] == alone and p["prompt"] == "Tell me a story."
    for r in recs:
        assert r["expression"] is not None and r["expression_baseline"] is not None
    assert recs[0]["expression"] == pytest.approx(recs[0]["expression_baseline"])


def test_calibration_version_is_part_of_the_builtin_cache_key(lab, monkeypatch):
    first = lab.concept("calm")
    calls = []
    original = type(lab.concepts).extract  # built-ins are extracted by lab.concepts

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(type(lab.concepts), "extract", counting)
    lab.concept("calm")
    assert calls == []  # cached
    monkeypatch.setattr(C, "CALIBRATION_VERSION", C.CALIBRATION_VERSION + 1)
    again = lab.concept("calm")
    assert calls == [1] and np.array_equal(again.vectors, first.vectors)


# ---- the embedded model ---------------------------------------------------------------


@pytest.mark.model
@pytest.mark.parametrize("name", ["happy", "sad"])
def test_smollm_defaults_lie_in_the_coherent_region(smollm, name):
    c = smollm.concept(name)
    cal = c.extra["calibration"]
    chosen = [g for g in cal["grid"] if (g["layer"], g["strength"]) == (c.layer, c.strength)]
    assert len(chosen) == 1 and chosen[0]["coherent"], cal["grid"]
    assert chosen[0]["ppl_ratio"] <= C.PPL_LIMIT
    assert chosen[0]["distinct2_ratio"] >= C.DISTINCT_LIMIT
    assert c.extra["steers"], cal["grid"]


@pytest.mark.model
def test_smollm_random_vectors_are_reported_as_not_steering(smollm):
    happy = smollm.concept("happy")
    v = np.random.default_rng(0).standard_normal(happy.vectors.shape).astype(np.float32)
    v *= (np.linalg.norm(happy.vectors, axis=1) / np.linalg.norm(v, axis=1))[:, None]
    noise = Concept(name="noise", vectors=v, norms=happy.norms, layer=happy.layer,
                    strength=happy.strength, model_fingerprint=smollm.fingerprint)
    cal = C.calibrate(smollm, noise, instruction=happy.extra["instruction"],
                      progress=lambda d, t: None)
    assert not cal.steers, cal.grid
