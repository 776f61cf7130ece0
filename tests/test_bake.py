"""Steering baked into weights: plain mlx-lm loads the folder and matches runtime steering."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_steer import Steer, errors
from mlx_steer.bake import NOTE
from tiny import tiny_lab

PROMPT = "The meeting went"


def vec(lab, seed=1):
    return np.random.default_rng(seed).standard_normal(lab.hidden_size).astype(np.float32)


def plain_load_logits(path, tokens):
    """Logits of the folder opened by mlx-lm alone (no mlx-steer class, no steering)."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(path))
    assert "mlx_steer" not in type(model.layers[0]).__module__
    out = model(mx.array(tokens)[None])
    return np.array(out[0].astype(mx.float32)), model, tokenizer


def orthogonal(lab):
    v, w = vec(lab, 1), vec(lab, 2)
    w = w - (w @ v) / (v @ v) * v
    return v, w.astype(np.float32)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_baked_ablation_and_addition_equal_runtime(kind, tmp_path):
    lab = tiny_lab(kind)
    v, w = orthogonal(lab)
    steers = [Steer(v, "all", op="ablate", positions=0), Steer(w, "all", op="ablate", positions=0),
              Steer(vec(lab, 3), 2, 0.7, positions=0), Steer(v, 1, 2.0, positions=0)]
    tokens = lab.encode(PROMPT)
    runtime = lab.logits(tokens, steers)
    assert not np.allclose(runtime, lab.logits(tokens), atol=1e-3)
    out = lab.bake(steers, tmp_path / "baked")
    baked, model, tok = plain_load_logits(out, tokens)
    np.testing.assert_allclose(baked, runtime, atol=2e-4, rtol=1e-4)
    note = json.loads((out / NOTE).read_text())
    assert [o["op"] for o in note["operations"]] == ["ablate", "ablate", "add", "add"]
    assert note["source_fingerprint"] == lab.fingerprint
    assert (out / "README.md").exists()
    assert tok.encode(PROMPT) == tokens
    # The loaded model is unchanged by baking.
    assert np.array_equal(lab.logits(tokens, steers), runtime)
    if kind == "llama":  # tied output head: untied with the original embedding
        assert not model.args.tie_word_embeddings


def test_baked_ablation_on_phi3_and_addition_refused(tmp_path):
    lab = tiny_lab("phi3")
    v = vec(lab)
    tokens = lab.encode(PROMPT)
    out = lab.bake(Steer(v, "all", op="ablate"), tmp_path / "phi")
    baked, _, _ = plain_load_logits(out, tokens)
    runtime = lab.logits(tokens, Steer(v, "all", op="ablate", positions=0))
    np.testing.assert_allclose(baked, runtime, atol=2e-4, rtol=1e-4)
    # positions="all" differs from the baked model only through position 0.
    skip0 = lab.logits(tokens, Steer(v, "all", op="ablate"))
    assert not np.allclose(skip0, baked, atol=1e-6)
    with pytest.raises(errors.UnsupportedModelError, match="no MLP bias"):
        lab.bake(Steer(v, 1, 1.0), tmp_path / "phi-add")
    assert not (tmp_path / "phi-add").exists()


def test_what_cannot_be_baked_is_refused(tmp_path):
    lab = tiny_lab("mistral")
    v, w = vec(lab, 1), vec(lab, 2)
    bad = [
        (Steer(v, 1, op="ablate"), "every block"),
        (Steer(v, "all", op="cap"), "cap"),
        (Steer(v, 1, op="cap"), "cap"),
        (Steer(v, 1, positions="generated"), "positions"),
        (Steer(v, (0, 2), 1.0), "one int block"),
        (Steer(v, -1, 1.0), "one int block"),
        ([Steer(v, "all", op="ablate"), Steer(w, "all", op="ablate")], "orthogonal"),
        ([], "nothing to bake"),
    ]
    for steer, msg in bad:
        with pytest.raises(errors.InvalidArgumentError, match=msg):
            lab.bake(steer, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(errors.VectorShapeError):
        lab.bake(Steer(np.ones(65), 1), tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(errors.InvalidArgumentError, match="not empty"):
        lab.bake(Steer(v, 1, 1.0), tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


@pytest.mark.model
def test_smollm_baked_equals_runtime(smollm, tmp_path):
    v = np.random.default_rng(0).standard_normal(smollm.hidden_size).astype(np.float32)
    steers = [Steer(v, "all", op="ablate", positions=0),
              Steer(np.random.default_rng(1).standard_normal(smollm.hidden_size), 12, 1.5,
                    positions=0)]
    tokens = smollm.encode("Tell me about the sea.", chat=True)
    runtime = smollm.logits(tokens, steers)
    out = smollm.bake(steers, tmp_path / "smol")
    baked, model, tok = plain_load_logits(out, tokens)
    scale = np.abs(runtime).max()
    np.testing.assert_allclose(baked, runtime, atol=2e-4 * scale, rtol=1e-3)
    assert np.array_equal(np.argmax(baked, -1), np.argmax(runtime, -1))
    assert tok.apply_chat_template([{"role": "user", "content": "Tell me about the sea."}],
                                   add_generation_prompt=True) == tokens


def test_quantised_weights_are_refused(tmp_path):
    import mlx.nn as nn

    lab = tiny_lab("mistral")
    nn.quantize(lab.model, group_size=32, bits=8,
                class_predicate=lambda p, m: isinstance(m, nn.Linear) and "q_proj" in p)
    with pytest.raises(errors.UnsupportedModelError, match="quantised"):
        lab.bake(Steer(vec(lab), "all", op="ablate"), tmp_path / "q")
    assert not (tmp_path / "q").exists()
