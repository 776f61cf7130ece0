"""The concept library: per-model folders of safetensors vectors + JSON metadata.

Layout: `<home>/concepts/<model>-<fingerprint[:12]>/<name>.json` names its
vectors file `<name>.<digest>.safetensors`. A save writes the new vectors file
first, then replaces the JSON atomically, then removes the old vectors file, so
a crash at any point leaves every concept readable (the old or the new one).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path

import numpy as np

from .concept import SCHEMA_VERSION, Concept
from .errors import (ConceptNotFoundError, CorruptFileError, InvalidNameError,
                     ModelMismatchError)

_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
BUILTINS = ("happy", "sad", "angry", "fearful", "excited", "calm", "formal", "casual",
            "poetic", "technical", "pirate", "shakespeare", "enthusiastic", "pessimistic",
            "confident", "brief", "verbose")


def home() -> Path:
    """Root of mlx-steer's user data: $MLX_STEER_HOME or ~/.cache/mlx-steer."""
    return Path(os.environ.get("MLX_STEER_HOME") or Path.home() / ".cache" / "mlx-steer")


def validate_name(name: str) -> str:
    """Lower-cased name of 1–64 letters, digits, '_' or '-' (no paths, no dots)."""
    if not isinstance(name, str):
        raise InvalidNameError(f"a concept name must be text, got {type(name).__name__}")
    clean = name.strip().lower()
    if not _NAME.match(clean):
        raise InvalidNameError(
            f"invalid concept name {name!r}: use 1–64 letters, digits, '_' or '-', "
            "starting with a letter or digit (no spaces, dots or slashes)")
    return clean


def builtin_spec(name: str) -> dict:
    """The packaged JSON spec of a built-in concept."""
    path = resources.files("mlx_steer").joinpath(f"data/concepts/{name}.json")
    return json.loads(path.read_text())


def spec_digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Library:
    """Concepts saved for one model (identified by its fingerprint)."""

    def __init__(self, fingerprint: str, model_name: str, root: Path | None = None,
                 sub: str = ""):
        slug = re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-")[:40] or "model"
        self.fingerprint = fingerprint
        self.dir = (root or home()) / "concepts" / f"{slug}-{fingerprint[:12]}"
        if sub:
            self.dir = self.dir / sub

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.json") if _NAME.match(p.stem))

    def __contains__(self, name: str) -> bool:
        return (self.dir / f"{validate_name(name)}.json").is_file()

    def save(self, concept: Concept) -> Path:
        from safetensors.numpy import save

        name = validate_name(concept.name)
        if concept.model_fingerprint != self.fingerprint:
            raise ModelMismatchError(
                f"concept {name!r} was made for another model; it cannot be saved in "
                "this model's library")
        self.dir.mkdir(parents=True, exist_ok=True)
        blob = save({"vectors": concept.vectors, "norms": concept.norms})
        digest = hashlib.sha256(blob).hexdigest()[:16]
        vec_path = self.dir / f"{name}.{digest}.safetensors"
        _atomic_write(vec_path, blob)
        meta = {k: v for k, v in asdict(concept).items() if k not in ("vectors", "norms")}
        meta.update(name=name, schema_version=SCHEMA_VERSION, vectors_file=vec_path.name,
                    sha256=digest, hidden_size=concept.hidden_size,
                    num_layers=concept.num_layers, saved=time.time())
        meta_path = self.dir / f"{name}.json"
        old = self._vectors_file(meta_path)
        _atomic_write(meta_path, json.dumps(meta, indent=1).encode())
        if old is not None and old != vec_path and old.exists():
            old.unlink()
        return meta_path

    def _vectors_file(self, meta_path: Path) -> Path | None:
        try:
            return self.dir / json.loads(meta_path.read_text())["vectors_file"]
        except Exception:
            return None

    def load(self, name: str) -> Concept:
        from safetensors.numpy import load

        name = validate_name(name)
        meta_path = self.dir / f"{name}.json"
        if not meta_path.is_file():
            raise ConceptNotFoundError(f"no concept {name!r} in {self.dir}")
        try:
            meta = json.loads(meta_path.read_text())
            vec_path = self.dir / Path(meta["vectors_file"]).name
            blob = vec_path.read_bytes()
            if hashlib.sha256(blob).hexdigest()[:16] != meta["sha256"]:
                raise ValueError("vectors file does not match its checksum")
            arrays = load(blob)
            fields = {k: meta[k] for k in Concept.__dataclass_fields__
                      if k in meta and k not in ("vectors", "norms")}
            fields["pairs"] = [tuple(p) for p in fields.get("pairs", [])]
            concept = Concept(vectors=arrays["vectors"], norms=arrays["norms"], **fields)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptFileError(
                f"concept {name!r} cannot be read ({type(e).__name__}: {e}); delete it with "
                "`mlx-steer concepts delete` or lab.delete_concept and extract it again"
            ) from None
        if concept.model_fingerprint != self.fingerprint:
            raise ModelMismatchError(f"concept {name!r} on disk belongs to another model")
        return concept

    def delete(self, name: str) -> None:
        name = validate_name(name)
        meta_path = self.dir / f"{name}.json"
        if not meta_path.exists():
            raise ConceptNotFoundError(f"no concept {name!r} to delete")
        vec = self._vectors_file(meta_path)
        meta_path.unlink()
        for p in [vec, *self.dir.glob(f"{name}.*.safetensors")]:
            if p is not None and p.exists():
                p.unlink()
