"""The float32 model cache gives the same model and tokenizer as expanding the GGUF."""

import os
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_steer import Steer, load, model_cache
from mlx_steer.loading import embedded_gguf

TEXTS = ["Hello, world!", "Ahoy matey 1234 — naïve café 🏴‍☠️", "  two  spaces\nand a line"]


def _logits(lab, steer=None):
    return np.asarray(lab.logits("Tell me about the sea.", steer))


@pytest.fixture
def gguf_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_STEER_HOME", str(tmp_path / "home"))
    path = tmp_path / "model.gguf"
    shutil.copyfile(embedded_gguf(), path)
    return path


def test_cached_model_equals_the_expanded_gguf(gguf_copy, monkeypatch, smollm):
    first = load(str(gguf_copy))  # expands and writes the entry
    entry = model_cache.entry_dir(gguf_copy)
    assert (entry / model_cache.WEIGHTS).stat().st_size > 400e6
    cached = load(str(gguf_copy))  # reads the entry
    monkeypatch.setenv("MLX_STEER_WEIGHT_CACHE", "0")
    plain = load(str(gguf_copy))
    steer = Steer(np.linspace(-1, 1, plain.hidden_size).astype(np.float32), 12, 2.0)
    for lab in (first, cached):
        assert np.array_equal(_logits(lab), _logits(plain))
        assert np.array_equal(_logits(lab, steer), _logits(plain, steer))
        for t in TEXTS:
            assert lab.encode(t) == plain.encode(t)
            assert lab.encode(t, chat=True) == plain.encode(t, chat=True)
        assert lab.tokenizer.eos_token_ids == plain.tokenizer.eos_token_ids
        assert lab.fingerprint == smollm.fingerprint
    for name, w in cached.model.parameters()["model"]["layers"][3]["mlp"].items():
        assert mx.array_equal(w["weight"], plain.model.parameters()["model"]["layers"][3]
                              ["mlp"][name]["weight"]).item()
    assert cached.generate("Name a colour.", None, max_tokens=8) == \
        plain.generate("Name a colour.", None, max_tokens=8)


def test_damaged_entry_is_rebuilt(gguf_copy):
    good = _logits(load(str(gguf_copy)))
    weights = model_cache.entry_dir(gguf_copy) / model_cache.WEIGHTS
    with open(weights, "r+b") as f:
        f.truncate(1000)
    with pytest.warns(UserWarning, match="rebuilding"):
        again = load(str(gguf_copy))
    assert np.array_equal(_logits(again), good)
    assert weights.stat().st_size > 400e6


def test_changed_file_gets_a_new_entry(gguf_copy):
    before = model_cache.entry_dir(gguf_copy)
    st = gguf_copy.stat()
    os.utime(gguf_copy, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert model_cache.entry_dir(gguf_copy) != before


def test_cache_can_be_turned_off(gguf_copy, monkeypatch):
    monkeypatch.setenv("MLX_STEER_WEIGHT_CACHE", "0")
    load(str(gguf_copy))
    assert not model_cache.entry_dir(gguf_copy).exists()
