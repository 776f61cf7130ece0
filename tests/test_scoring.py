"""Shared-prompt scoring computes what the whole passes do."""

import copy
import functools

import numpy as np
import pytest

from mlx_steer import Steer, calibrate, experiments, generation, scoring
from mlx_steer.prompts import with_instruction
from tiny import PAIRS, tiny_home, tiny_lab  # noqa: F401 - tiny_home: autouse

PROMPTS = ["Tell me about your morning.", "Describe a kitchen table."]


def _unit(n, seed):
    v = np.random.default_rng(seed).standard_normal(n)
    return v / np.linalg.norm(v)


def _entries(lab):
    rng = np.random.default_rng(0)
    out = []
    for p in PROMPTS:
        for ctx in (lab.encode(p, True), lab.encode(with_instruction(p, "Be happy."), True)):
            for n in (1, 3, 7, 7, 5):
                gen = [int(t) for t in rng.integers(3, 250, n)]
                e = scoring.ScoreEntry(ctx + gen, len(ctx), [], n, nll=True)
                e.probes = [(1, _unit(lab.hidden_size, n), "a"),
                            (3, _unit(lab.hidden_size, n + 1), "b")]
                out.append(e)
    return out


@pytest.mark.parametrize("kind", ["mistral", "phi3"])
def test_shared_scoring_equals_whole_passes(kind):
    lab = tiny_lab(kind, layers=4)
    shared, whole = _entries(lab), _entries(lab)
    assert all(scoring.shareable(e) for e in shared)
    scoring.score(lab, shared, batch=6)  # several passes, contexts split across them
    scoring.score_passes(lab, whole, batch=6)
    for s, w in zip(shared, whole):
        assert set(s.out) == {"nll", "a", "b"}
        for k in s.out:
            assert s.out[k] == pytest.approx(w.out[k], rel=1e-5, abs=1e-6), k
    # a steered entry is not shareable and goes through a whole pass
    st = copy.deepcopy(whole[0])
    st.steers = [Steer(_unit(lab.hidden_size, 9).astype(np.float32), 1, 2.0)]
    st.out = {}
    assert not scoring.shareable(st)
    scoring.score(lab, [st], batch=6)
    assert st.out["nll"] != pytest.approx(whole[0].out["nll"], abs=1e-6)


def test_calibration_scores_equal_the_unshared_computation(monkeypatch):
    lab = tiny_lab("mistral", layers=6)
    c = lab.extract("joy", PAIRS, calibrate=False)
    kw = dict(blocks=[2, 3, 4], alphas=[0.1, 0.3], max_tokens=6, progress=lambda d, t: None)
    fast = calibrate.calibrate(lab, c, **kw)
    again = calibrate.calibrate(lab, c, **kw)
    assert fast.to_dict() == again.to_dict()  # deterministic
    monkeypatch.setattr(experiments, "score", functools.partial(scoring.score, share=False))
    monkeypatch.setattr(generation, "prefill_batch",
                        functools.partial(generation.prefill_batch, share=False))
    slow = calibrate.calibrate(lab, c, **kw)
    assert (fast.layer, fast.strength, fast.steers) == (slow.layer, slow.strength, slow.steers)
    for f, s in zip(fast.grid + [fast.baseline], slow.grid + [slow.baseline]):
        assert f.keys() == s.keys()
        for k in f:
            if isinstance(f[k], float):
                assert f[k] == pytest.approx(s[k], abs=2e-4), k
            else:
                assert f[k] == s[k], k
