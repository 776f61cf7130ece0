"""Loading routes: local MLX folders (through mlx_lm.load), "auto", aliases offline."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_steer
from mlx_steer import Steer, errors, loading
from mlx_steer.models.base import SteerMixin
from tiny import tiny_model, tiny_tokenizer


@pytest.mark.parametrize("kind", ["mistral", "phi3"])
def test_local_mlx_folder_loads_and_steers(tmp_path, kind):
    model = tiny_model(kind)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    args = {k: v for k, v in vars(model.args).items() if not k.startswith("_")}
    (tmp_path / "config.json").write_text(json.dumps(args))
    tiny_tokenizer()._tokenizer.save_pretrained(str(tmp_path))

    lab = mlx_steer.load(str(tmp_path))
    assert all(isinstance(layer, SteerMixin) for layer in lab.model.layers)
    assert (lab.num_layers, lab.hidden_size) == (4, 64)
    ids = lab.encode("hello there")
    ref = np.array(model(mx.array(ids)[None])[0])
    np.testing.assert_allclose(lab.logits("hello there"), ref, atol=1e-5)
    v = np.ones(64, np.float32)
    assert not np.allclose(lab.logits("hello there", Steer(v, 1, 2.0)), ref)


def test_auto_falls_back_to_embedded_offline_and_says_why(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "is_cached", lambda repo: False)
    alias, reason = loading.choose_auto()
    assert alias is None
    assert "embedded" in reason and "mistral-7b" in reason and "phi-3-mini" in reason


def test_auto_picks_the_largest_model_that_fits(monkeypatch):
    monkeypatch.setattr(loading, "is_cached", lambda repo: True)
    monkeypatch.setattr(loading, "memory_gb", lambda: 64.0)
    assert loading.choose_auto()[0] == "mistral-7b"
    monkeypatch.setattr(loading, "memory_gb", lambda: 6.0)
    alias, reason = loading.choose_auto()
    assert alias == "phi-3-mini" and "mistral-7b needs" in reason
    monkeypatch.setattr(loading, "memory_gb", lambda: 2.0)
    assert loading.choose_auto()[0] is None


def test_alias_offline_and_uncached_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(errors.ModelNotFoundError, match="huggingface-cli download mlx-community"):
        mlx_steer.load("phi-3-mini")
