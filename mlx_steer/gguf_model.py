"""Load a llama-architecture GGUF file as an mlx-lm model and tokenizer.

Hand-written on purpose: mlx-lm 0.32 writes GGUF files (`mlx_lm.gguf`) but does not
read them, so the tensors are mapped here onto mlx-lm's llama model, and the
byte-level BPE tokenizer is rebuilt from the file's own metadata with `tokenizers`
(no Hugging Face download, so the embedded model works offline).

`mx.load` reads only some GGUF tensor types correctly (Q4_0, Q4_1, Q8_0, F16,
F32); every other type is refused with a clear error before anything loads.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import CorruptFileError, UnsupportedGGUFTypeError, UnsupportedModelError

SUPPORTED_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
GROUP_SIZE = 32

_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def tensor_types(path: Path) -> dict[str, str]:
    """Name → GGML type name of every tensor, read from the GGUF header alone.

    `gguf.GGUFReader` parses every metadata value in Python (seconds for a
    49k-token vocabulary); this scan skips values and reads only tensor infos.
    """
    import struct

    import gguf

    def read(f, fmt):
        size = struct.calcsize(fmt)
        b = f.read(size)
        if len(b) != size:
            raise CorruptFileError(f"{path.name} is truncated (GGUF header ends early)")
        return struct.unpack(fmt, b)

    def skip_value(f, vtype):
        if vtype == _STRING:
            f.seek(read(f, "<Q")[0], 1)
        elif vtype == _ARRAY:
            etype, n = read(f, "<IQ")
            if etype in _SCALAR:
                f.seek(_SCALAR[etype] * n, 1)
            else:
                for _ in range(n):
                    skip_value(f, etype)
        elif vtype in _SCALAR:
            f.seek(_SCALAR[vtype], 1)
        else:
            raise CorruptFileError(f"{path.name}: unknown GGUF value type {vtype}")

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CorruptFileError(f"{path.name} is not a GGUF file (bad magic bytes)")
        version, n_tensors, n_kv = read(f, "<IQQ")
        if version < 2 or n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise CorruptFileError(f"{path.name}: unsupported or corrupt GGUF header")
        for _ in range(n_kv):
            f.seek(read(f, "<Q")[0], 1)
            skip_value(f, read(f, "<I")[0])
        out = {}
        for _ in range(n_tensors):
            name = f.read(read(f, "<Q")[0]).decode("utf-8", "replace")
            f.seek(8 * read(f, "<I")[0], 1)
            ttype = read(f, "<I")[0]
            f.seek(8, 1)
            try:
                out[name] = gguf.GGMLQuantizationType(ttype).name
            except ValueError:
                out[name] = f"type {ttype}"
    return out


def check_tensor_types(path: Path) -> None:
    """Raise `UnsupportedGGUFTypeError` naming any tensor type MLX would corrupt."""
    bad = sorted(set(tensor_types(path).values()) - set(SUPPORTED_TYPES))
    if bad:
        raise UnsupportedGGUFTypeError(
            f"{path.name} uses GGUF tensor type(s) {', '.join(bad)}, which MLX does not "
            f"read correctly; use a {' / '.join(SUPPORTED_TYPES)} file (e.g. a Q4_0 or "
            "Q8_0 conversion of the same model)"
        )


def _meta(meta: dict, key: str, default=None):
    v = meta.get(key, default)
    if isinstance(v, mx.array):
        return v.item() if v.ndim == 0 else v.tolist()
    return v


def _rename(name: str) -> str:
    stem, _, suffix = name.rpartition(".")
    if stem.startswith("blk."):
        _, idx, part = stem.split(".", 2)
        if part not in _NAMES:
            raise UnsupportedModelError(f"unexpected GGUF tensor {name}")
        return f"model.layers.{idx}.{_NAMES[part]}.{suffix}"
    if stem not in _TOP:
        raise UnsupportedModelError(f"unexpected GGUF tensor {name}")
    return f"{_TOP[stem]}.{suffix}"


def model_args(meta: dict, vocab_size: int, tied: bool):
    from mlx_lm.models import llama

    arch = _meta(meta, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; mlx-steer reads llama-"
            "architecture GGUF files (Llama, Mistral, SmolLM); load other models "
            "from an MLX folder or Hugging Face repo instead"
        )
    p = "llama."
    heads = int(_meta(meta, p + "attention.head_count"))
    hidden = int(_meta(meta, p + "embedding_length"))
    return llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=int(_meta(meta, p + "block_count")),
        intermediate_size=int(_meta(meta, p + "feed_forward_length")),
        num_attention_heads=heads,
        num_key_value_heads=int(_meta(meta, p + "attention.head_count_kv", heads)),
        head_dim=int(_meta(meta, p + "attention.key_length", hidden // heads)),
        rms_norm_eps=float(_meta(meta, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        vocab_size=vocab_size,
        rope_theta=float(_meta(meta, p + "rope.freq_base", 10000.0)),
        # llama GGUFs store Q/K rows permuted for interleaved RoPE.
        rope_traditional=True,
        max_position_embeddings=int(_meta(meta, p + "context_length", 4096)),
        tie_word_embeddings=tied,
    )


def args_from_dict(d: dict):
    """llama `ModelArgs` from the dict `dataclasses.asdict` made of them."""
    from mlx_lm.models import llama

    return llama.ModelArgs.from_dict(d)


def dequantize_np(w: mx.array, scales: mx.array, biases: mx.array) -> np.ndarray:
    """float32 weights of an MLX affine-quantised (group 32) 4- or 8-bit matrix.

    Done in numpy: MLX's CPU `dequantize` has no vector kernel and takes
    seconds for a 135M model; this takes a fraction of that.
    """
    packed = np.asarray(w).view(np.uint8)  # little-endian: low bits first
    bits = w.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    elif bits == 8:
        q = packed
    else:
        raise UnsupportedGGUFTypeError(f"unexpected {bits}-bit quantisation")
    rows, cols = q.shape
    q = q.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE).astype(np.float32)
    s = np.asarray(scales.astype(mx.float32))[..., None]
    b = np.asarray(biases.astype(mx.float32))[..., None]
    return (q * s + b).reshape(rows, cols)


def read(path: Path, dequantize: bool = False):
    """Model args, weights (MLX names) and metadata of a GGUF file.

    With `dequantize`, quantised matrices come back as float32 and their
    quantised form is kept as `<name>.twin_q` / `.twin_scales` / `.twin_biases`
    (uint8 bytes, float32 per group of 32) for the fast CPU path; otherwise each
    quantised matrix comes with its `.scales` and `.biases`.
    """
    check_tensor_types(path)
    try:
        raw, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise CorruptFileError(f"MLX could not read {path.name}: {e}") from None
    weights = {_rename(k): v for k, v in raw.items()}
    tied = "lm_head.weight" not in weights
    vocab = len(_meta(meta, "tokenizer.ggml.tokens", []) or []) or int(
        weights["model.embed_tokens.weight"].shape[0])
    args = model_args(meta, vocab, tied)
    if dequantize:
        twins = {}
        for p in [k[: -len(".scales")] for k in weights if k.endswith(".scales")]:
            w, s, b = (weights.pop(f"{p}.{x}") for x in ("weight", "scales", "biases"))
            weights[f"{p}.weight"] = mx.array(dequantize_np(w, s, b))
            twins[f"{p}.twin_q"] = mx.array(np.asarray(w).view(np.uint8))
            twins[f"{p}.twin_scales"] = s.astype(mx.float32)
            twins[f"{p}.twin_biases"] = b.astype(mx.float32)
        weights = {k: v.astype(mx.float32) for k, v in weights.items()}
        weights.update(twins)
    return args, weights, meta


def split_twins(weights: dict[str, mx.array]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Remove the `.twin_*` entries of `weights`: {matrix name: (bytes, scales, biases)}."""
    out = {}
    for k in [k for k in weights if k.endswith(".twin_q")]:
        p = k[: -len(".twin_q")]
        out[f"{p}.weight"] = tuple(np.asarray(weights.pop(f"{p}.twin_{x}"))
                                   for x in ("q", "scales", "biases"))
    return out


def build_model(args, weights: dict[str, mx.array]):
    """An mlx-lm llama `Model` holding `weights` (quantised layers where `.scales` exist)."""
    from mlx_lm.models import llama

    model = llama.Model(args)
    quantized = {k[: -len(".scales")]: v for k, v in weights.items() if k.endswith(".scales")}
    if quantized:
        def predicate(p, m):
            if p not in quantized:
                return False
            w = weights[f"{p}.weight"]
            return {"group_size": GROUP_SIZE,
                    "bits": w.shape[-1] * 32 // (quantized[p].shape[-1] * GROUP_SIZE)}
        nn.quantize(model, group_size=GROUP_SIZE, bits=4, class_predicate=predicate)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def load_model(path: Path, dequantize: bool = False):
    """Build an mlx-lm llama `Model` from a GGUF file. Returns (model, metadata)."""
    args, weights, meta = read(path, dequantize)
    split_twins(weights)
    return build_model(args, weights), meta


def tokenizer_spec(meta: dict) -> dict:
    """The GGUF metadata a tokenizer is built from, as plain JSON-able data."""
    kind = _meta(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' is)")
    tokens = list(_meta(meta, "tokenizer.ggml.tokens"))
    types = _meta(meta, "tokenizer.ggml.token_type", None)
    ids = {k: _meta(meta, f"tokenizer.ggml.{k}_token_id")
           for k in ("bos", "eos", "unknown", "padding")}
    return {
        "tokens": tokens,
        "merges": list(_meta(meta, "tokenizer.ggml.merges")),
        "special": [int(i) for i in np.flatnonzero(np.asarray(types) == 3)] if types else [],
        "ids": {k: int(v) for k, v in ids.items() if v is not None and int(v) < len(tokens)},
        "chat_template": _meta(meta, "tokenizer.chat_template"),
    }


def tokenizer_from_spec(spec: dict):
    """An mlx-lm `TokenizerWrapper` (byte-level BPE) built from `tokenizer_spec` data."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = spec["tokens"]
    merges = [tuple(m.split(" ", 1)) for m in spec["merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    bpe.decoder = decoders.ByteLevel()
    named = {k: tokens[i] for k, i in spec["ids"].items()}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=named.get("bos"), eos_token=named.get("eos"),
        unk_token=named.get("unknown"), pad_token=named.get("padding"),
        additional_special_tokens=[tokens[i] for i in spec["special"]
                                   if tokens[i] not in named.values()],
        chat_template=spec["chat_template"],
    )
    eos = spec["ids"].get("eos")
    return TokenizerWrapper(hf, BPEStreamingDetokenizer,
                            eos_token_ids=[eos] if eos is not None else None)


def load_tokenizer(meta: dict):
    """An mlx-lm `TokenizerWrapper` built from the GGUF metadata (byte-level BPE)."""
    return tokenizer_from_spec(tokenizer_spec(meta))
