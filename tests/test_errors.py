"""Bad input raises a typed error from mlx_steer.errors with an actionable message."""

import math

import numpy as np
import pytest

import mlx_steer
from mlx_steer import Steer, errors
from mlx_steer.gguf_model import check_tensor_types
from tiny import tiny_lab


@pytest.fixture(scope="module")
def lab():
    return tiny_lab("mistral")


def v(n=64):
    return np.ones(n, np.float32)


def test_unknown_model_names():
    with pytest.raises(errors.ModelNotFoundError, match="unknown model"):
        mlx_steer.load("no such model")
    with pytest.raises(errors.ModelNotFoundError, match="huggingface-cli download"):
        mlx_steer.load("nobody-here/not-a-real-model-xyz")
    with pytest.raises(errors.ModelNotFoundError, match="no GGUF file"):
        mlx_steer.load("missing/file.gguf")


def _write_gguf(path, qtype, shape_bytes):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("blk.0.attn_q.weight", np.zeros(shape_bytes, np.uint8),
                 raw_shape=None, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_gguf_type_is_named(tmp_path):
    import gguf

    path = tmp_path / "k.gguf"
    _write_gguf(path, gguf.GGMLQuantizationType.Q4_K, (4, 144))
    with pytest.raises(errors.UnsupportedGGUFTypeError, match="Q4_K"):
        check_tensor_types(path)
    with pytest.raises(errors.UnsupportedGGUFTypeError, match="Q4_K"):
        mlx_steer.load(str(path))


def test_corrupt_gguf(tmp_path):
    import gguf

    good = tmp_path / "ok.gguf"
    _write_gguf(good, gguf.GGMLQuantizationType.Q8_0, (4, 34))
    check_tensor_types(good)
    data = good.read_bytes()
    for name, blob in [("trunc.gguf", data[:40]), ("junk.gguf", b"not a gguf at all"),
                       ("empty.gguf", b"")]:
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(errors.CorruptFileError):
            mlx_steer.load(str(p))


def test_layer_out_of_range(lab):
    with pytest.raises(errors.LayerOutOfRangeError, match=r"0 … 3"):
        lab.logits("hello", Steer(v(), 4))
    with pytest.raises(errors.LayerOutOfRangeError):
        Steer(v(), -2)  # -1 is the embedding output
    with pytest.raises(errors.LayerOutOfRangeError):
        Steer(v(), 1.5)


def test_wrong_vector_size(lab):
    with pytest.raises(errors.VectorShapeError, match="hidden size is 64"):
        lab.generate("hello", Steer(v(65), 1), max_tokens=2)
    with pytest.raises(errors.VectorShapeError):
        Steer(np.ones((2, 64)), 1)
    with pytest.raises(errors.VectorShapeError):
        Steer(np.array([1.0, math.nan]), 1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "strong", None])
def test_bad_strength(bad):
    with pytest.raises(errors.InvalidStrengthError):
        Steer(v(), 1, bad)


def test_overflowing_strength():
    with pytest.raises(errors.InvalidStrengthError):
        Steer(np.full(4, 1e30, np.float32), 0, 1e30)


def test_bad_positions():
    for bad in ("some", -1, 2.5):
        with pytest.raises(errors.InvalidPositionsError):
            Steer(v(), 1, 1.0, bad)


def test_vector_from_another_model(lab):
    other = Steer(v(), 1, 1.0, model_fingerprint="0" * 64)
    with pytest.raises(errors.ModelMismatchError, match="another model"):
        lab.logits("hello", other)
    lab.logits("hello", Steer(v(), 1, 1.0, model_fingerprint=lab.fingerprint))


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(lab, prompt):
    with pytest.raises(errors.EmptyPromptError):
        lab.generate(prompt, max_tokens=2)
    with pytest.raises(errors.EmptyPromptError):
        lab.hidden_states(prompt)


def test_prompt_longer_than_context(lab):
    with pytest.raises(errors.PromptTooLongError, match="context of 256"):
        lab.logits("word " * 300)
    with pytest.raises(errors.PromptTooLongError):
        lab.generate("word " * 120, max_tokens=200)


def test_bad_generation_options(lab):
    for kw in ({"max_tokens": 0}, {"temperature": -1}, {"temperature": math.nan},
               {"top_p": 0}):
        with pytest.raises(errors.InvalidArgumentError):
            lab.generate("hello", **{"max_tokens": 2, **kw})


def test_errors_share_a_base_class():
    for name in ("ModelNotFoundError", "UnsupportedGGUFTypeError", "LayerOutOfRangeError",
                 "VectorShapeError", "InvalidStrengthError", "EmptyPromptError",
                 "PromptTooLongError", "ModelMismatchError", "CorruptFileError"):
        assert issubclass(getattr(errors, name), errors.MlxSteerError)
