"""Shared prompt prefixes: rows that share a prompt prefill it once and fork the cache;
every forked row still equals the same request run alone."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_steer import Steer, generation, prefix
from mlx_steer.models import base

PROMPT = "The meeting went on for a long time and nobody knew why"


def vec(n, seed, scale=2.0):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def test_shared_length_follows_the_steering_windows():
    v, w = vec(8, 1), vec(8, 2)
    L = 20
    assert prefix.shared_length([[], [Steer(v, 1, positions="generated")]], L) == L
    assert prefix.shared_length([[], [Steer(v, 1)]], L) == 1  # "all": position 0 only
    assert prefix.shared_length([[], [Steer(v, 1, positions=7)]], L) == 7
    assert prefix.shared_length([[Steer(v, 1, positions=9)], [Steer(v, 2, positions=4)]],
                                L) == 4
    # identical steering never differs; strength 0 is no steering
    assert prefix.shared_length([[Steer(v, 1)], [Steer(v, 1)]], L) == L
    assert prefix.shared_length([[], [Steer(v, 1, 0.0)]], L) == L
    # a common term does not end the shared part; a different one does
    assert prefix.shared_length([[Steer(v, 1, positions=3)],
                                 [Steer(v, 1, positions=3), Steer(w, 1, positions=12)]],
                                L) == 12
    # the same terms in another order may round differently: not shared
    assert prefix.shared_length([[Steer(v, 1, positions=3), Steer(w, 1, positions=3)],
                                 [Steer(w, 1, positions=3), Steer(v, 1, positions=3)]],
                                L) == 3
    # "prompt" steers 1..L-1 only: a row steered there differs from position 1
    assert prefix.shared_length([[], [Steer(v, 1, positions="prompt")]], L) == 1


def test_plan_groups_rows_by_prompt():
    v = vec(8, 1)
    toks = [[1, 2, 3, 4], [1, 2, 3, 4], [5, 6], [1, 2, 3, 4], [5, 6]]
    rows = [[], [Steer(v, 0, positions="generated")], [], [Steer(v, 2, positions=3)],
            [Steer(v, 1)]]
    groups, solo = prefix.plan(toks, rows)
    assert groups == [prefix.Group((0, 1, 3), 3)]
    assert solo == [2, 4]  # [5, 6] rows differ from position 1: nothing worth sharing


def test_divergence_is_the_first_block_steered_inside_the_prompt():
    v = vec(8, 1)
    L = 20
    assert prefix.divergence([], L) is None
    assert prefix.divergence([Steer(v, 5)], L) == 5
    assert prefix.divergence([Steer(v, 5), Steer(v, 2, 0.5)], L) == 2
    assert prefix.divergence([Steer(v, 2, 0.0), Steer(v, 7)], L) == 7  # strength 0: none
    assert prefix.divergence([Steer(v, 2, positions="generated"), Steer(v, 9)], L) == 9
    assert prefix.divergence([Steer(v, 2, positions=L)], L) is None  # after the prompt
    assert prefix.divergence([Steer(v, 2, positions=L - 1)], L) == 2
    assert prefix.divergence([Steer(v, -1)], L) == -1  # the embedding
    # a mid-block ablation changes its block from the attention on: the row differs
    # from that block's input, the previous block's output
    assert prefix.divergence([Steer(v, 4, op="ablate", mid=True)], L) == 3
    assert prefix.divergence([Steer(v, 4, op="ablate"), Steer(v, 6, op="cap")], L) == 4


def test_layer_plan_groups_rows_steered_from_different_blocks():
    v = vec(8, 1)
    toks = [[1, 2, 3]] * 5 + [[4, 5]] * 2 + [[6, 7]] * 2
    rows = [[], [Steer(v, 20)], [Steer(v, 10)], [Steer(v, -1)], [Steer(v, 25)],
            [Steer(v, 0)], [Steer(v, -1)], [Steer(v, 29)], [Steer(v, 28)]]
    groups, rest = prefix.layer_plan(toks, rows, range(9))
    assert groups == [prefix.LayerGroup((0, 1, 2, 4), (None, 20, 10, 25)),
                      prefix.LayerGroup((7, 8), (29, 28))]
    assert rest == [3, 5, 6]  # embedding-steered rows run every block; 5 is left alone
    # only the candidates are considered; rows unsteered in the prompt are left to plan()
    assert prefix.layer_plan(toks, rows, [1, 5]) == ([], [1, 5])
    assert prefix.layer_plan([[1, 2]] * 2, [[], []], [0, 1]) == ([], [0, 1])


def _alone_logprobs(lab, tokens, steers):
    alone = lab.trace(tokens, steers).logits[-1]
    return alone - np.log(np.exp(alone - alone.max()).sum()) - alone.max()


def _batched_equals_alone(tiny, rows, toks, steers):
    """`rows` as one batch (small prefill chunks, so that the shared part and the rest
    each take several); every row's text and first log-probabilities equal its lone
    request's. Returns the batch."""
    batched = generation.batch(tiny.model, tiny.tokenizer, toks, steers, 8, 0.0, 1.0, None,
                               prefill_step_size=4)
    for (prompt, steer), t, row in zip(rows, toks, batched):
        assert row.text == tiny.generate(prompt, steer, max_tokens=8)
        np.testing.assert_allclose(row.first_logprobs, _alone_logprobs(tiny, t, steer),
                                   atol=1e-4)
    return batched


@pytest.mark.parametrize("positions", ["generated", 6, "all"])
def test_forked_rows_equal_rows_prefilled_alone(tiny, positions):
    v, w = vec(tiny.hidden_size, 1), vec(tiny.hidden_size, 2)
    rows = [
        (PROMPT, None),
        (PROMPT, Steer(v, 1, 1.0, positions)),
        (PROMPT, Steer(w, 2, 1.5, positions)),
        ("Something else entirely", Steer(v, 0, 1.0)),
        (PROMPT, [Steer(v, 1, 1.0, positions), Steer(w, 3, 0.5, "generated")]),
        (PROMPT, Steer(v, 1, 0.0)),
    ]
    toks = [tiny.encode(p, chat=True) for p, _ in rows]
    steers = [[] if s is None else ([s] if isinstance(s, Steer) else s) for _, s in rows]
    groups, _ = prefix.plan(toks, steers)
    if positions == "all":
        # rows differ from position 1, but rows steered alike inside the prompt (the
        # unsteered 0 and 5; 1 and 4, whose second steer is for generated tokens only)
        # share all of it
        L = len(toks[0])
        assert groups == [prefix.Group((0, 5), L), prefix.Group((1, 4), L)]
    else:
        k = len(toks[0]) if positions == "generated" else 6
        assert groups == [prefix.Group((0, 1, 2, 4, 5), k)]
    batched = _batched_equals_alone(tiny, rows, toks, steers)
    assert batched[0].text == batched[5].text
    assert batched[0].text != batched[1].text


def test_rows_shared_by_layer_equal_rows_prefilled_alone(tiny):
    """A layer sweep steering every position: no prompt prefix is common, so the rows
    share the blocks before their first steered one; each equals its lone request."""
    v, w = vec(tiny.hidden_size, 1), vec(tiny.hidden_size, 2)
    rows = [
        (PROMPT, Steer(v, 2, 1.0)),
        (PROMPT, None),
        (PROMPT, Steer(w, 1, 1.5)),
        ("Something else entirely", Steer(v, 0, 1.0)),
        (PROMPT, [Steer(v, 3, 1.0), Steer(w, 2, 0.5)]),  # diverges at block 2
        (PROMPT, Steer(w, 3, op="ablate", mid=True)),  # from block 3's attention on
        (PROMPT, Steer(v, 2, 0.5, op="cap")),
        (PROMPT, Steer(v, -1, 0.5)),  # the embedding: prefilled with the padded rows
        (PROMPT, Steer(v, 3, 1.0, "generated")),  # unsteered inside the prompt
    ]
    toks = [tiny.encode(p, chat=True) for p, _ in rows]
    steers = [[] if s is None else ([s] if isinstance(s, Steer) else s) for _, s in rows]
    groups, solo = prefix.plan(toks, steers)
    layered, rest = prefix.layer_plan(toks, steers, solo)
    assert groups == [prefix.Group((1, 8), len(toks[1]))]
    assert layered == [prefix.LayerGroup((0, 2, 4, 5, 6), (2, 1, 2, 2, 2))]
    assert rest == [3, 7]
    batched = _batched_equals_alone(tiny, rows, toks, steers)
    assert len({r.text for r in batched}) > 2


def _same_keys(a: np.ndarray, b: np.ndarray) -> None:
    """Bit for bit on MLX's CPU. On a GPU a block's products over the trunk alone and over
    the trunk with a row grown from it are products of different row counts, which take
    different kernels and round differently (README, "How steering works"; on an H200
    these keys differed in their seventh digit): there, to float32 rounding."""
    if mx.default_device() == mx.cpu:
        assert np.array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_layer_shared_prefill_keeps_the_trunk_only_while_needed(tiny):
    v = vec(tiny.hidden_size, 3)
    tokens = tiny.encode(PROMPT, chat=True)
    rows = [[Steer(v, 2)], [Steer(v, 0)]]
    caches, members, out = base.layer_shared_caches(tiny.model, rows, [2, 0], len(tokens))
    T = base.TRUNK
    assert members == [[T], [T, 1], [T, 1], [1, 0]] and out == [1, 0]
    logits = generation.prefill(tiny.model, mx.array(tokens)[None], caches)
    assert [c.keys.shape[0] for c in caches] == [1, 2, 2, 2] and logits.shape[0] == 2
    caches = base.spread_rows(caches, members, [2, 0])
    assert [c.keys.shape[0] for c in caches] == [2, 2, 2, 2]
    keys = [np.array(c.keys_and_values()[0]) for c in caches]
    alone = []
    for steers in ([], rows[1]):
        c = base.make_caches(tiny.model, base.build_plans([steers], [len(tokens)]),
                             left_padding=[0])
        generation.prefill(tiny.model, mx.array(tokens)[None], c)
        alone.append([np.array(x.keys_and_values()[0]) for x in c])
    # row 0 reads the trunk's keys up to block 2 (it leaves after block 2): the unsteered
    # model's, bit for bit; row 1 its own from block 1 on
    for layer in range(3):
        _same_keys(keys[layer][0], alone[0][layer][0])
    _same_keys(keys[0][1], alone[0][0][0])
    for layer in (1, 2, 3):
        assert not np.array_equal(keys[layer][1], alone[0][layer][0])
        np.testing.assert_allclose(keys[layer][1], alone[1][layer][0], atol=1e-5)


def test_fork_rows_copies_the_cache(tiny):
    tokens = tiny.encode(PROMPT, chat=True)
    caches = base.make_caches(tiny.model, left_padding=[0])
    logits = generation.prefill(tiny.model, mx.array(tokens)[None], caches)
    forked = base.fork_rows(caches, 3)
    for c0, c in zip(caches, forked):
        k0, _ = c0.keys_and_values()
        k, _ = c.keys_and_values()
        assert k.shape[0] == 3 and np.array_equal(np.array(k[2:3]), np.array(k0))
        assert c.offset.tolist() == [len(tokens)] * 3
    y = mx.array([[7], [7], [9]])
    out = tiny.model(y, cache=forked)[:, -1, :]
    again = tiny.model(mx.array([[7]]), cache=caches)[:, -1, :]
    np.testing.assert_allclose(np.array(out[0]), np.array(again[0]), atol=1e-5)
    assert logits.shape[0] == 1


@pytest.mark.model
def test_forked_rows_equal_rows_alone_on_smollm(smollm):
    """A small layer sweep on the embedded model, steering the generated tokens: the
    prompt is prefilled once for all rows, and every row equals its lone request."""
    v = vec(smollm.hidden_size, 4, 1.0)
    v *= 60.0 / np.linalg.norm(v)
    prompt = "Tell me about your weekend."
    rows = [(prompt, None)] + [(prompt, Steer(v, layer, 1.0, "generated"))
                               for layer in (6, 14, 22)]
    toks = [smollm.encode(p, chat=True) for p, _ in rows]
    steers = [[] if s is None else [s] for _, s in rows]
    assert prefix.plan(toks, steers)[0] == [prefix.Group((0, 1, 2, 3), len(toks[0]))]
    batched = smollm.generate_batch_tokens(rows, max_tokens=6)
    for (p, s), row in zip(rows, batched):
        assert row.text == smollm.generate(p, s, max_tokens=6)
    assert len({r.text for r in batched}) > 1  # the steering mattered
