"""A disk cache of GGUF models expanded to float32, for a fast cold start.

Expanding SmolLM2's Q4_1 weights to float32 takes ~1.5 s of numpy work on
every start; the expanded copy, saved once as safetensors next to the
tokenizer data, loads in ~0.1 s. Entries live under
`$MLX_STEER_HOME/models/<key>/`, keyed by the GGUF file's path, size and
modification time, so an edited or replaced file is expanded afresh.
`MLX_STEER_WEIGHT_CACHE=0` turns the cache off. A damaged entry is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import mlx.core as mx

from . import config, gguf_model
from .config import home
from .fastpath import twins as fast_twins

FORMAT = "mlx-steer-expanded-gguf/2"
MAX_BYTES = 4 << 30  # larger models are expanded in memory but not written out
WEIGHTS, TOKENIZER = "model.safetensors", "tokenizer.json"


def enabled() -> bool:
    return config.flag("MLX_STEER_WEIGHT_CACHE")


def entry_dir(path: Path) -> Path:
    """The cache folder of a GGUF file (its resolved path, size and mtime)."""
    st = path.stat()
    key = f"{FORMAT}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{mx.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return home() / "models" / f"{path.stem[:40]}-{digest}"


def load_expanded(path: Path):
    """(model, tokenizer) of a GGUF file with float32 weights, cached on disk."""
    folder = entry_dir(path) if enabled() else None
    if folder is not None and (folder / WEIGHTS).exists():
        try:
            return _read(folder)
        except Exception as e:  # a damaged entry: rebuild it rather than fail
            warnings.warn(f"rebuilding the damaged model cache {folder.name}: {e}",
                          stacklevel=2)
    args, weights, meta = gguf_model.read(path, dequantize=True)
    spec = gguf_model.tokenizer_spec(meta)
    if folder is not None and sum(v.nbytes for v in weights.values()) <= MAX_BYTES:
        try:
            _write(folder, args, weights, spec)
        except OSError as e:  # a full or read-only disk only costs the speed-up
            warnings.warn(f"could not write the model cache: {e}", stacklevel=2)
    return _build(args, weights), gguf_model.tokenizer_from_spec(spec)


def _build(args, weights: dict):
    """The model, with its quantised twins registered with the fast path's shim."""
    twins = gguf_model.split_twins(weights)
    model = gguf_model.build_model(args, weights)
    fast_twins.attach(model, twins)
    return model


def _read(folder: Path):
    weights, meta = mx.load(str(folder / WEIGHTS), return_metadata=True)
    if meta.get("format") != FORMAT:
        raise ValueError(f"unknown format {meta.get('format')!r}")
    args = gguf_model.args_from_dict(json.loads(meta["args"]))
    spec = json.loads((folder / TOKENIZER).read_text())
    return _build(args, weights), gguf_model.tokenizer_from_spec(spec)


def _write(folder: Path, args, weights: dict, spec: dict) -> None:
    """Write the entry in a temporary folder, then rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        (tmp / TOKENIZER).write_text(json.dumps(spec))
        mx.save_safetensors(str(tmp / WEIGHTS), weights,
                            {"format": FORMAT, "args": json.dumps(dataclasses.asdict(args))})
        os.chmod(tmp, 0o755)
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
