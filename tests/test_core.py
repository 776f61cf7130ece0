"""Exactness of per-request steering on tiny real mlx-lm models (Mistral, Phi-3, generic)."""

import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import generate as mlx_generate
from mlx_lm.models.cache import make_prompt_cache

from mlx_steer import Steer, generation
from mlx_steer.models import base, install, uninstall
from mlx_steer.models.llama import SteeredLlamaBlock
from mlx_steer.models.phi3 import SteeredPhi3Block
from tiny import param_names, tiny_lab

PROMPT = "The meeting went"


def vec(lab, seed=1, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(lab.hidden_size) * scale).astype(
        np.float32)


def plain_logits(lab, tokens):
    """Logits from the model with mlx-lm's own block classes."""
    uninstall(lab.model)
    try:
        out = lab.model(mx.array(tokens)[None], cache=make_prompt_cache(lab.model))
        return np.array(out[0].astype(mx.float32))
    finally:
        install(lab.model)


def test_install_keeps_names_classes_and_loading(tiny):
    model = tiny.model
    expected = SteeredLlamaBlock if tiny.model_type == "mistral" else SteeredPhi3Block
    assert all(type(layer) is expected for layer in model.layers)
    assert all(isinstance(layer.self_attn, base.SteerAttentionMixin) for layer in model.layers)
    names = param_names(model)
    uninstall(model)
    assert param_names(model) == names
    assert not any(isinstance(layer, base.SteerMixin) for layer in model.layers)
    assert not any(isinstance(layer.self_attn, base.SteerAttentionMixin)
                   for layer in model.layers)
    assert all(type(layer.self_attn.rope) is nn.RoPE for layer in model.layers)
    norms = [m for m in model.modules() if isinstance(m, nn.RMSNorm)]
    assert len(norms) == 2 * tiny.num_layers + 1 and all(type(m) is nn.RMSNorm for m in norms)
    install(model)
    install(model)  # idempotent
    assert all(type(layer) is expected for layer in model.layers)
    assert all(type(layer.self_attn.rope) is base.SharedRoPE for layer in model.layers)
    fused = base.FusedRMSNorm if base._EXACT_FUSION else nn.RMSNorm
    assert all(type(m) is fused for m in norms)
    model.load_weights(list(zip(names, [v for _, v in _flat(model)])), strict=True)
    assert len(make_prompt_cache(model)) == tiny.num_layers


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def test_strength_zero_is_bit_identical_to_plain_mlx_lm(tiny):
    tokens = tiny.encode(PROMPT)
    plain = plain_logits(tiny, tokens)
    assert np.array_equal(tiny.logits(PROMPT), plain)
    assert np.array_equal(tiny.logits(PROMPT, Steer(vec(tiny), 1, 0.0)), plain)
    uninstall(tiny.model)
    try:
        ref = mlx_generate(tiny.model, tiny.tokenizer, tiny.encode(PROMPT, chat=True),
                           max_tokens=12)
    finally:
        install(tiny.model)
    assert tiny.generate(PROMPT, max_tokens=12) == ref
    assert tiny.generate(PROMPT, Steer(vec(tiny), 2, 0.0), max_tokens=12) == ref


@pytest.mark.usefixtures("on_cpu")  # the shared tables are the CPU path
def test_batch_blocks_share_one_offset_and_one_rope_table(tiny, monkeypatch):
    """After a batch prefill every block's cache holds one offset array, and each decode
    step advances them to one array again, so SharedRoPE builds one table per step, not
    one per block; tokens and logits are those of unshared caches, bit for bit."""
    v = np.random.default_rng(2).standard_normal(tiny.hidden_size).astype(np.float32)
    toks = [tiny.encode("The meeting went on for a long time"), tiny.encode("Name a colour")]
    steers = [[], [Steer(v * 2.0, 1, 1.0)]]  # different lengths: left padding
    share = base.share_offsets
    ropes = [type(layer.self_attn.rope) for layer in tiny.model.layers]

    def decode(shared: bool):
        monkeypatch.setattr(base, "share_offsets", share if shared else lambda c: False)
        caches, logits = generation.prefill_batch(tiny.model, toks, steers)
        outs, tables = [logits], []
        for _ in range(4):
            base._rope_memo().clear()
            logits = tiny.model(mx.argmax(logits, -1)[:, None], cache=caches)[:, -1, :]
            mx.eval(logits)
            tables.append(len(base._rope_memo()))
            outs.append(logits)
        return caches, np.array(mx.stack(outs)), tables

    caches, got, tables = decode(True)
    _, want, unshared = decode(False)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert len({id(c.offset) for c in caches}) == 1
    if all(r is base.SharedRoPE for r in ropes):
        assert tables == [1] * 4 and unshared == [len(ropes)] * 4
    # unequal offsets are not shared
    caches[0].offset = caches[0].offset + 1
    assert not share(caches)


@pytest.mark.usefixtures("on_cpu")  # the shared tables are the CPU path
@pytest.mark.parametrize("traditional", [True, False])
def test_shared_rope_equals_mlx_rope_bit_for_bit(traditional):
    """SharedRoPE's tables come from mx.fast.rope on a probe and are applied with the CPU
    fallback's operations: the same bits as nn.RoPE for every offset form, length, rotated
    width, dtype, base and scale; one table serves every call at the same offset."""
    rng = np.random.default_rng(0)
    cases = [(1, 1, 0), (1, 1, 57), (1, 7, 300), (3, 1, mx.array([5, -2, 40])),
             (3, 5, mx.array([0, 1, 2])), (2, 3, mx.array(9))]
    for dims, width, rope_base, scale in ((64, 64, 10000.0, 1.0), (32, 64, 500000.0, 0.5),
                                          (96, 96, 130000.0, 1.0)):
        for dtype in (mx.float32, mx.float16):
            for B, T, offset in cases:
                x = mx.array(rng.standard_normal((B, 4, T, width)).astype(np.float32))
                x = x.astype(dtype)
                rope = nn.RoPE(dims, traditional=traditional, base=rope_base, scale=scale)
                want = np.array(rope(x, offset=offset).astype(mx.float32))
                rope.__class__ = base.SharedRoPE
                for _ in range(2):  # the second call reads the table the first one built
                    got = np.array(rope(x, offset=offset).astype(mx.float32))
                    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), \
                        (dims, width, dtype, B, T, offset)
    assert base._rope_memo()  # tables were shared through the memo


def test_strength_scales_vector_exactly(tiny):
    v = vec(tiny)
    a = tiny.trace(PROMPT, Steer(v, 1, 2.0))
    b = tiny.trace(PROMPT, Steer(2 * v, 1, 1.0))
    assert np.array_equal(a.hidden, b.hidden)
    assert np.array_equal(a.logits, b.logits)
    assert not np.array_equal(a.logits, tiny.logits(PROMPT))


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_hidden_state_is_unsteered_plus_alpha_v(tiny, layer):
    v, alpha = vec(tiny), 1.5
    h0 = tiny.hidden_states(PROMPT)
    h1 = tiny.hidden_states(PROMPT, Steer(v, layer, alpha))
    assert h0.shape == (tiny.num_layers, len(tiny.encode(PROMPT)), tiny.hidden_size)
    assert np.array_equal(h1[:layer], h0[:layer])  # blocks before L unchanged
    expected = h0[layer].copy()
    expected[1:] = expected[1:] + np.float32(alpha) * v  # position 0 is not steered
    assert np.array_equal(h1[layer], expected)
    if layer + 1 < tiny.num_layers:
        assert not np.allclose(h1[layer + 1:], h0[layer + 1:])


def test_position_rules(tiny):
    v = vec(tiny)
    T = len(tiny.encode(PROMPT))
    h0 = tiny.hidden_states(PROMPT)[1]

    def steered_positions(positions, prompt_len=None):
        h = tiny.trace(PROMPT, Steer(v, 1, 1.0, positions), prompt_len=prompt_len).hidden[1]
        return [t for t in range(T) if not np.array_equal(h[t], h0[t])]

    assert steered_positions("all") == list(range(1, T))
    assert steered_positions(0) == list(range(T))
    assert steered_positions(3) == list(range(3, T))
    assert steered_positions("prompt", prompt_len=4) == [1, 2, 3]
    assert steered_positions("generated", prompt_len=4) == list(range(4, T))
    assert steered_positions("generated") == []


def test_several_steers_sum(tiny):
    v, w = vec(tiny, 1), vec(tiny, 2)
    both = tiny.hidden_states(PROMPT, [Steer(v, 1, 1.0), Steer(w, 1, 0.5), Steer(w, 3, 2.0)])
    h0 = tiny.hidden_states(PROMPT)
    assert np.array_equal(both[1, 1:], (h0[1, 1:] + v) + np.float32(0.5) * w)
    assert np.array_equal(both[0], h0[0])


@pytest.mark.parametrize("positions", ["all", "generated", 5])
def test_cached_generation_equals_full_forward(tiny, positions):
    steer = Steer(vec(tiny, scale=2.0), 1, 1.0, positions)
    prompt = tiny.encode(PROMPT, chat=True)
    out = tiny.generate_batch_tokens([(PROMPT, steer)], max_tokens=10)[0]
    text = tiny.generate(PROMPT, steer, max_tokens=10)
    assert text == out.text
    full = tiny.trace(prompt + out.tokens, steer, prompt_len=len(prompt)).logits
    greedy = full[len(prompt) - 1:-1].argmax(-1).tolist()
    assert greedy[: len(out.tokens)] == out.tokens
    # Step-by-step logits equal the full forward's, position by position.
    plans = base.build_plans([[steer]], [len(prompt)])
    caches = base.make_caches(tiny.model, plans)
    seq = prompt + out.tokens
    tiny.model(mx.array(seq[:3])[None], cache=caches)
    for t in range(3, len(seq)):
        step = tiny.model(mx.array(seq[t:t + 1])[None], cache=caches)[0, -1]
        np.testing.assert_allclose(np.array(step), full[t], atol=1e-4, rtol=1e-4)


def test_prefill_chunking_changes_nothing(tiny):
    steer = Steer(vec(tiny, scale=2.0), 2, 1.0)
    tokens = tiny.encode("A longer prompt so that chunked prefill has several chunks.",
                         chat=True)
    outs = []
    for step in (2048, 7, 3):
        caches = base.make_caches(tiny.model, base.build_plans([[steer]], [len(tokens)]))
        outs.append("".join(generation.stream(tiny.model, tiny.tokenizer, tokens, caches, 12,
                                              0.0, 1.0, None, prefill_step_size=step)))
    assert outs[0] == outs[1] == outs[2]


def test_batched_rows_equal_rows_alone(tiny):
    v, w = vec(tiny, 1, 2.0), vec(tiny, 2, 2.0)
    rows = [
        (PROMPT, None),
        (PROMPT, Steer(v, 1, 1.0)),
        ("A much longer prompt about the weather today", [Steer(v, 0, 0.5), Steer(w, 3, 1.0)]),
        ("Hi", Steer(w, 2, 1.5, "generated")),
        (PROMPT, Steer(v, 1, 0.0)),
    ]
    batched = tiny.generate_batch_tokens(rows, max_tokens=8)
    for (prompt, steer), row in zip(rows, batched):
        assert row.text == tiny.generate(prompt, steer, max_tokens=8)
        tokens = tiny.encode(prompt, chat=True)
        alone = tiny.trace(tokens, steer).logits[-1]
        alone = alone - np.log(np.exp(alone - alone.max()).sum()) - alone.max()
        np.testing.assert_allclose(row.first_logprobs, alone, atol=1e-4)
    assert batched[0].text == batched[4].text
    assert batched[0].text != batched[1].text


def test_batched_sampling_rows_equal_rows_alone(tiny):
    steer = Steer(vec(tiny, 3, 2.0), 1, 1.0)
    rows = [(PROMPT, None), (PROMPT, steer), ("Other words", None)]
    batched = tiny.generate_batch(rows, max_tokens=8, temperature=0.8, seed=7)
    alone = [tiny.generate(p, s, max_tokens=8, temperature=0.8, seed=7) for p, s in rows]
    assert batched == alone
    assert batched != tiny.generate_batch(rows, max_tokens=8, temperature=0.8, seed=8)


def test_threads_do_not_leak_steering(tiny):
    steers = [None, Steer(vec(tiny, 4, 3.0), 1, 1.0), Steer(vec(tiny, 5, 3.0), 2, 1.0)]
    expected = [tiny.generate(PROMPT, s, max_tokens=10) for s in steers]
    assert len(set(expected)) == 3
    results: dict[tuple[int, int], str] = {}

    def work(i, rep):
        results[(i, rep)] = tiny.generate(PROMPT, steers[i], max_tokens=10)

    threads = [threading.Thread(target=work, args=(i, r)) for r in range(3) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (i, _), text in results.items():
        assert text == expected[i]


def test_interleaved_generators_do_not_leak_steering(tiny):
    steer = Steer(vec(tiny, 6, 3.0), 1, 1.0)
    plain_alone = tiny.generate(PROMPT, max_tokens=10)
    steered_alone = tiny.generate(PROMPT, steer, max_tokens=10)
    a = tiny.stream(PROMPT, max_tokens=10)
    b = tiny.stream(PROMPT, steer, max_tokens=10)
    pa, pb = [], []
    live = {"a": True, "b": True}
    while any(live.values()):
        for key, gen, out in (("a", a, pa), ("b", b, pb)):
            if live[key]:
                piece = next(gen, None)
                if piece is None:
                    live[key] = False
                else:
                    out.append(piece)
    assert "".join(pa) == plain_alone
    assert "".join(pb) == steered_alone
    assert plain_alone != steered_alone


def test_hidden_states_batch_equals_single(tiny):
    texts = [PROMPT, "A somewhat longer sentence for padding", "Hi"]
    batch = tiny.hidden_states_batch(texts)
    for t, h in zip(texts, batch):
        np.testing.assert_allclose(h, tiny.hidden_states(t), atol=1e-4, rtol=1e-4)


def test_generic_route_steers_other_architectures():
    lab = tiny_lab("qwen2")
    assert all(isinstance(layer, base.SteerMixin) for layer in lab.model.layers)
    v = vec(lab)
    h0 = lab.hidden_states(PROMPT)
    h1 = lab.hidden_states(PROMPT, Steer(v, 1, 1.0))
    assert np.array_equal(h1[1, 1:], h0[1, 1:] + v)
    assert np.array_equal(lab.logits(PROMPT, Steer(v, 1, 0.0)), lab.logits(PROMPT))


def test_vector_is_cast_to_stream_dtype():
    lab = tiny_lab("mistral")
    lab.model.set_dtype(mx.float16)
    h = lab.hidden_states(PROMPT, Steer(vec(lab), 1, 1.0))
    caches = base.make_caches(lab.model, base.build_plans([[Steer(vec(lab), 1, 1.0)]], [4]),
                              capture=True)
    lab.model(mx.array(lab.encode(PROMPT))[None], cache=caches)
    assert all(c.capture[0].dtype == mx.float16 for c in caches)
    assert caches[3].keys.dtype == mx.float16
    assert np.isfinite(h).all()


@pytest.mark.usefixtures("on_cpu")  # the fused norm is the CPU path
def test_fused_rms_norm_equals_mlx_bit_for_bit():
    """FusedRMSNorm gives nn.RMSNorm's bits for every dtype, rank and batch shape, one
    compiled function serving them all in turn, on extreme values too; where fusion is
    exact it really is one fused kernel."""
    import io

    rng = np.random.default_rng(3)
    D = 48
    special = np.array([0.0, -0.0, 1e-30, -1e-38, 3e38, -3e38, 1e-7, 65504.0, 1.0, -2.5],
                       np.float32)
    for eps in (1e-5, 1e-6):
        for dtype in (mx.float32, mx.float16, mx.bfloat16):
            plain = nn.RMSNorm(D, eps=eps)
            plain.weight = mx.array(rng.standard_normal(D).astype(np.float32)).astype(dtype)
            fused = nn.RMSNorm(D, eps=eps)
            fused.weight = plain.weight
            fused.__class__ = base.FusedRMSNorm
            for shape in [(1, 1, D), (8, 1, D), (1, 43, D), (5, D), (2, 3, 4, D), (1, 1, D)]:
                x = rng.standard_normal(shape).astype(np.float32) * 10.0 ** rng.integers(-3, 4)
                x.reshape(-1, D)[0] = 0.0  # a row of zeros: rsqrt(eps)
                x.reshape(-1, D)[-1, :len(special)] = special
                xa = mx.array(x).astype(dtype)
                want, got = plain(xa), fused(xa)
                assert got.dtype == want.dtype and got.shape == want.shape
                assert np.array_equal(np.array(got.astype(mx.float32)).view(np.uint32),
                                      np.array(want.astype(mx.float32)).view(np.uint32)), \
                    (eps, dtype, shape)
    dot = io.StringIO()
    mx.export_to_dot(dot, fused(xa))
    assert ("Compiled" in dot.getvalue()) == base._EXACT_FUSION
