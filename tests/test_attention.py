"""models/attention: MLX's CPU attention with a vectorised softmax, bit for bit."""

import itertools

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import base as mlx_base
from mlx_lm.models import llama as mlx_llama

from mlx_steer import fastpath
from mlx_steer.models import attention, base, install, uninstall
from tiny import tiny_lab

pytestmark = [pytest.mark.skipif(not attention._SEQUENTIAL_FLOATS,
                                 reason="bit-identity holds where MLX has no float SIMD types"),
              pytest.mark.usefixtures("on_cpu")]


def bits(a: mx.array) -> np.ndarray:
    return np.array(a).view(np.uint32)


def test_softmax_equals_mlx_bit_for_bit():
    rng = np.random.default_rng(0)
    for trial in range(200):
        rows, n = int(rng.integers(1, 12)), int(rng.integers(1, 400))
        x = (rng.standard_normal((rows, n)) * 10 ** rng.uniform(-3, 3)).astype(np.float32)
        if trial % 3 == 0:  # masked scores, whole masked rows, the float32 extremes
            x[rng.random(x.shape) < 0.4] = -np.inf
            x[0] = np.finfo(np.float32).min
            x[-1, 0] = np.finfo(np.float32).max
        xm = mx.array(x)
        assert np.array_equal(bits(attention.softmax(xm)),
                              bits(mx.softmax(xm, axis=-1, precise=True))), trial
    x = mx.array(np.array([[1.0, np.nan, 2.0], [np.inf, 1.0, 0.0], [-np.inf] * 3],
                          np.float32))
    want, got = np.array(mx.softmax(x, axis=-1, precise=True)), np.array(attention.softmax(x))
    assert np.array_equal(np.isnan(want), np.isnan(got))
    assert np.array_equal(np.nan_to_num(want), np.nan_to_num(got))


def masks(rng, B, H, L, S):
    return {"none": None, "causal": "causal" if L <= S else None,
            "bool": mx.array(rng.random((B, 1, L, S)) < 0.8),
            "additive": mx.array(np.where(rng.random((1, H, L, S)) < 0.8, 0.0,
                                          -np.inf).astype(np.float32)),
            "additive16": mx.array(rng.standard_normal((L, S)).astype(np.float16)),
            "per-head bool": mx.array(rng.random((H, L, S)) < 0.5)}


def test_attention_equals_mlx_bit_for_bit(monkeypatch):
    """Every batch, head grouping, query count, context and mask form gives MLX's bits
    (with the fast path's shim the head groups' queries share products: still the same)."""
    monkeypatch.setattr(attention, "MIN_SCORES", 0)
    rng = np.random.default_rng(1)
    checked = 0
    for B, (H, kv), L, S in itertools.product((1, 3, 8), ((9, 3), (4, 4), (8, 2)), (1, 5),
                                              (1, 7, 60, 300)):
        q = mx.array(rng.standard_normal((B, H, L, 64)).astype(np.float32))
        k = mx.array(rng.standard_normal((B, kv, S, 64)).astype(np.float32))
        v = mx.array(rng.standard_normal((B, kv, S, 48)).astype(np.float32))
        for name, mask in masks(rng, B, H, L, S).items():
            assert attention.applies(q, k, v, mask), name
            want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
            got = attention.attention(q, k, v, 0.125, mask)
            assert got.shape == want.shape and np.array_equal(bits(got), bits(want)), \
                (B, H, kv, L, S, name)
            checked += 1
    assert checked == 3 * 3 * 2 * 4 * 6


def test_head_groups_share_products_only_with_the_shim():
    """With the shim loaded a head group's queries go into one product; without, one per
    head (elsewhere the BLAS could give a row of several other bits than the row alone)."""
    if fastpath.loaded()["shim"]:
        assert fastpath.rows_alone(3) >= 300 * 64 and fastpath.rows_alone(13) == 0
    else:
        assert fastpath.rows_alone(3) == 0


def test_applies_only_where_exact_and_worth_it():
    q = mx.zeros((8, 9, 1, 64))
    k = v = mx.zeros((8, 3, 60, 64))
    assert attention.applies(q, k, v, None)
    assert not attention.applies(q[:1], k[:1], v[:1], None)  # one row: MLX's own is faster
    assert not attention.applies(q.astype(mx.float16), k, v, None)
    assert not attention.applies(q, k, v, "sliding")
    assert not attention.applies(q, k, v, mx.zeros((8, 3, 1, 60)))  # not per head nor 1
    assert not attention.applies(q, k, v, mx.zeros((1, 60), mx.int32))  # MLX refuses it


def test_steered_attention_calls_attend_and_leaves_mlx_lm_alone():
    lab = tiny_lab("mistral")
    attn = lab.model.layers[0].self_attn
    assert isinstance(attn, base.SteerAttentionMixin) and type(attn)._attend_call is not None
    assert type(attn)._attend_call.__globals__["scaled_dot_product_attention"] is base._attend
    # mlx-lm's module still calls its own function; plain models are untouched
    assert mlx_llama.scaled_dot_product_attention is mlx_base.scaled_dot_product_attention
    uninstall(lab.model)
    try:
        assert type(lab.model.layers[0].self_attn) is mlx_llama.Attention
    finally:
        install(lab.model)


def test_attend_falls_back_to_mlx_lm(monkeypatch):
    """Where `attention` does not apply, mlx-lm's own function runs, unchanged."""
    calls = []
    real = mlx_base.scaled_dot_product_attention
    monkeypatch.setattr(mlx_base, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = mx.zeros((1, 4, 1, 16))
    k = v = mx.zeros((1, 4, 3, 16))
    base._attend(q, k, v, None, 0.25, None)
    assert calls == [1]
    base._attend(q, k, v, None, 0.25, None, sinks=mx.zeros((4,)))
    assert calls == [1, 1]
