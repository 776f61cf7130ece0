"""Uploads: a llama.cpp control vector saved as a concept. (Pair files are parsed by
`mlx_steer.pairs`, the CLI's parser.)"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlx_steer
from mlx_steer.concept import validate_name

from . import state

MAX_PAIRS = 512  # pairs one extraction in the lab takes
MAX_GGUF = 16 * 2**20  # a 32-layer × 8192-wide float32 control vector is 1 MiB


def import_control_vector(lab: mlx_steer.Lab, filename: str, data: bytes,
                          name: str | None = None) -> mlx_steer.Concept:
    """Validate an uploaded llama.cpp control vector and save it as a concept.

    Refuses files over `MAX_GGUF`, unsafe names, corrupt files and vectors of another
    model's size or depth (typed errors from `Concept.from_gguf`)."""
    if len(data) > MAX_GGUF:
        raise ValueError(f"{filename} is {len(data) / 2**20:.1f} MiB; the limit is "
                         f"{MAX_GGUF // 2**20} MiB")
    nm = validate_name(name or Path(filename).stem.replace(".", "_"))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "upload.gguf"
        path.write_bytes(data)
        with state.model_lock():
            concept = mlx_steer.Concept.from_gguf(path, lab, name=nm)
    lab.save_concept(concept)
    return concept
