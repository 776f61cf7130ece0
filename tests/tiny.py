"""Tiny randomly initialised mlx-lm models (real classes) and a byte-level tokenizer."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_steer import Lab

# A few "happy" contrast pairs for extraction tests on tiny models.
PAIRS = [("I feel wonderful and joyful today!", "I feel neutral today."),
         ("What a delightful, happy morning.", "It is a morning."),
         ("We laughed with joy all evening.", "We talked all evening.")]


@pytest.fixture(autouse=True)
def tiny_home(request, tmp_path, monkeypatch):
    """Import into a test module: an empty library per tiny-model test, while model
    tests share the run's cache."""
    if request.node.get_closest_marker("model") is None:
        monkeypatch.setenv("MLX_STEER_HOME", str(tmp_path / "home"))


SPECIALS = ["<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_tokenizer():
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 additional_special_tokens=SPECIALS[2:], chat_template=CHAT)
    return TokenizerWrapper(hf, BPEStreamingDetokenizer)


VOCAB = 256 + len(SPECIALS)


def tiny_model(kind: str, seed: int = 0, layers: int = 4, hidden: int = 64):
    """A real mlx-lm model ("llama" (tied embeddings), "mistral", "phi3" or "qwen2")
    with tiny random weights."""
    mx.random.seed(seed)
    common = dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  vocab_size=VOCAB, max_position_embeddings=512)
    if kind in ("mistral", "llama"):
        from mlx_lm.models import llama

        model = llama.Model(llama.ModelArgs(model_type=kind,
                                            tie_word_embeddings=kind == "llama", **common))
    elif kind == "phi3":
        from mlx_lm.models import phi3

        model = phi3.Model(phi3.ModelArgs(model_type="phi3", **common))
    elif kind == "qwen2":
        from mlx_lm.models import qwen2

        model = qwen2.Model(qwen2.ModelArgs(model_type="qwen2", tie_word_embeddings=True,
                                            **common))
    else:
        raise ValueError(kind)
    # Larger embeddings than the default init so logits are far from uniform.
    model.model.embed_tokens.weight = model.model.embed_tokens.weight * 4
    mx.eval(model.parameters())
    return model


def tiny_lab(kind: str, seed: int = 0, **kw) -> Lab:
    return Lab(tiny_model(kind, seed, **kw), tiny_tokenizer(), f"tiny-{kind}",
               context_length=256)


def param_names(model) -> list[str]:
    return [k for k, _ in tree_flatten(model.parameters())]


def save_tiny(path, kind: str = "mistral", seed: int = 0, **kw):
    """Write a tiny model as an MLX model folder (config, safetensors, tokenizer), so
    separate processes (e.g. the ranks of `mlx.launch`) load the same weights."""
    import dataclasses
    from pathlib import Path

    from mlx_lm.utils import save_config, save_model

    path = Path(path)
    model = tiny_model(kind, seed, **kw)
    save_model(path, model)
    save_config(dataclasses.asdict(model.args), path / "config.json")
    tiny_tokenizer().save_pretrained(str(path))
    return path
