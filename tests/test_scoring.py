"""Shared-prompt scoring and layer-shared prefill compute what the whole passes do."""

import copy
import functools

import numpy as np
import pytest

from mlx_steer import Steer, calibrate, experiments, generation, prefix, scoring
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


def test_first_block_and_layered_groups():
    v = np.ones(8, np.float32)
    L = 6
    assert prefix.first_block([], 10, L) == L
    assert prefix.first_block([Steer(v, 3, 1.0), Steer(v, 4, 1.0)], 10, L) == 3
    assert prefix.first_block([Steer(v, 2, 1.0, positions="generated")], 10, L) == L
    assert prefix.first_block([Steer(v, -1, 1.0)], 10, L) == 0  # the embedding
    assert prefix.first_block([Steer(v, 2, 0.0)], 10, L) == L  # strength 0: no steering
    toks = [[1, 2, 3]] * 4 + [[4, 5]]
    rows = [[], [Steer(v, 3, 1.0)], [Steer(v, -1, 1.0)], [Steer(v, 5, 1.0)],
            [Steer(v, 2, 1.0)]]
    groups, rest = prefix.layered(toks, rows, range(5), L)
    assert groups == [prefix.Layered((0, 1, 3), (6, 3, 5))]
    assert rest == [2, 4]
    # not worth it: the skipped blocks add up to less than one prefill
    assert prefix.layered(toks[:2], [[Steer(v, 1, 1.0)], [Steer(v, 2, 1.0)]],
                          range(2), L) == ([], [0, 1])


@pytest.mark.parametrize("kind", ["mistral", "phi3"])
def test_layer_shared_prefill_equals_rows_prefilled_apart(kind):
    lab = tiny_lab(kind, layers=6)
    D = lab.hidden_size
    v, w = _unit(D, 1).astype(np.float32) * 3, _unit(D, 2).astype(np.float32) * 3
    prompt = "The meeting went on for a long time and nobody knew why"
    rows = [[], [Steer(v, 2, 1.0)], [Steer(w, 4, 1.5)], [Steer(v, 4, 1.0), Steer(w, 5, 1.0)],
            [Steer(v, 3, op="ablate", mid=True)], [Steer(v, 1, 0.5, op="cap")],
            [Steer(v, -1, 1.0)], [Steer(v, 3, 1.0, positions="generated")]]
    toks = [lab.encode(prompt, True)] * len(rows) + [lab.encode("Hello there", True)]
    rows = rows + [[Steer(w, 3, 1.0)]]
    groups, solo = prefix.plan(toks, rows)
    layered, _ = prefix.layered(toks, rows, solo, 6)
    assert layered and len(layered[0].rows) >= 5  # the layered path is what is tested
    args = (lab.model, lab.tokenizer, toks, rows, 6, 0.0, 1.0, None)
    step = 5  # the prompt prefills in several chunks
    shared = generation.batch(*args, prefill_step_size=step)
    orig = generation.prefill_batch
    try:
        generation.prefill_batch = functools.partial(orig, share=False)
        apart = generation.batch(*args, prefill_step_size=step)
    finally:
        generation.prefill_batch = orig
    for a, b in zip(shared, apart):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.first_logprobs, b.first_logprobs, rtol=1e-5, atol=1e-5)


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
