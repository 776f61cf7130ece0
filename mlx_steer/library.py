"""The concept library: per-model folders of safetensors vectors + JSON metadata.

Layout: `<home>/concepts/<model>-<fingerprint[:12]>/<name>.json` names its
vectors file `<name>.<digest>-<random>.safetensors` (a fresh name on every save,
so a file name is never re-used once dropped). A save writes the new vectors
file first, then replaces the JSON atomically, so a crash at any point leaves
every concept readable (the old or the new one). The old vectors file is left in
place for readers that read the old JSON a moment ago: `collect()` removes
vectors files no JSON names and leftover `.tmp` files once they are older than
`GRACE_S` (run after every save and delete).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import time
from dataclasses import asdict
from pathlib import Path


from .concept import NAME_PATTERN, SCHEMA_VERSION, Concept, validate_name
from .config import home
from .errors import (ConceptNotFoundError, CorruptFileError, ModelMismatchError,
                     MlxSteerError, StorageError)
from .files import atomic_write, read_json

_VECTORS = re.compile(r"^([a-z0-9][a-z0-9_\-]{0,63})\.[0-9a-f]{16}(-[0-9a-f]{8})?\.safetensors$")
_TMP = re.compile(r"^\..*\.tmp$")
GRACE_S = 600.0  # unreferenced files younger than this may still be read: kept
MAX_META_BYTES = 16 << 20  # a concept's JSON holds pairs and scores: a few hundred KiB


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
        return sorted(p.stem for p in self.dir.glob("*.json") if NAME_PATTERN.match(p.stem))

    def __contains__(self, name: str) -> bool:
        return (self.dir / f"{validate_name(name)}.json").is_file()

    def save(self, concept: Concept) -> Path:
        from safetensors.numpy import save

        name = validate_name(concept.name)
        if concept.model_fingerprint != self.fingerprint:
            raise ModelMismatchError(
                f"concept {name!r} was made for another model; it cannot be saved in "
                "this model's library")
        concept.validate()
        meta = {k: v for k, v in asdict(concept).items() if k not in ("vectors", "norms")}
        try:
            text = json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise CorruptFileError(f"concept {name!r} has metadata that cannot be saved as "
                                   f"JSON: {e}") from None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create the library folder {self.dir}: "
                               f"{e.strerror or e}") from None
        blob = save({"vectors": concept.vectors, "norms": concept.norms})
        digest = hashlib.sha256(blob).hexdigest()[:16]
        vec_path = self.dir / f"{name}.{digest}-{secrets.token_hex(4)}.safetensors"
        try:
            atomic_write(vec_path, blob)
            meta = json.loads(text)
            meta.update(name=name, schema_version=SCHEMA_VERSION, vectors_file=vec_path.name,
                        sha256=digest, hidden_size=concept.hidden_size,
                        num_layers=concept.num_layers, saved=time.time())
            meta_path = self.dir / f"{name}.json"
            old = self._vectors_file(meta_path)
            atomic_write(meta_path, json.dumps(meta, indent=1).encode())
        except StorageError as e:
            _unlink(vec_path)
            raise StorageError(f"concept {name!r} was not saved ({e}); what was saved "
                               "before is unchanged") from None
        if old is not None and old != vec_path:
            _touch(old)  # unreferenced from now: collected once GRACE_S has passed
        self.collect()
        return meta_path

    def _vectors_file(self, meta_path: Path) -> Path | None:
        try:
            return self.dir / Path(read_json(meta_path.read_bytes(), "")["vectors_file"]).name
        except Exception:  # noqa: BLE001 - an unreadable JSON names no file
            return None

    def collect(self, grace_s: float | None = None) -> list[str]:
        """Remove vectors files that no concept's JSON names and leftover `.tmp` files,
        once unchanged for `grace_s` seconds (default GRACE_S): a reader that read a JSON
        just before a save still finds the vectors it names. Returns the removed names."""
        grace = GRACE_S if grace_s is None else grace_s
        if not self.dir.is_dir():
            return []
        referenced = set()
        for meta_path in self.dir.glob("*.json"):
            f = self._vectors_file(meta_path)
            if f is not None:
                referenced.add(f.name)
        removed, now = [], time.time()
        for p in self.dir.iterdir():
            if p.name in referenced or not (_VECTORS.match(p.name) or _TMP.match(p.name)):
                continue
            try:
                st = p.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime >= grace:
                if _unlink(p):
                    removed.append(p.name)
        return removed

    def load(self, name: str) -> Concept:
        name = validate_name(name)
        meta_path = self.dir / f"{name}.json"
        # A save or delete between reading the JSON and its vectors file shows up as a
        # missing vectors file: read again (the JSON then names the new file, or is gone).
        for attempt in range(3):
            if not meta_path.is_file():
                raise ConceptNotFoundError(f"no concept {name!r} in {self.dir}")
            try:
                concept = self._read(name, meta_path)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise CorruptFileError(
                        f"concept {name!r} cannot be read: its vectors file is missing; "
                        "delete it with `mlx-steer concepts delete` or lab.concepts.delete "
                        "and extract it again") from None
        if concept.model_fingerprint != self.fingerprint:
            raise ModelMismatchError(f"concept {name!r} on disk belongs to another model")
        return concept

    def _read(self, name: str, meta_path: Path) -> Concept:
        """The concept of `meta_path`; FileNotFoundError when a file vanished meanwhile,
        CorruptFileError for anything else that cannot be read."""
        from safetensors.numpy import load

        try:
            if meta_path.stat().st_size > MAX_META_BYTES:
                raise ValueError(f"the JSON is over {MAX_META_BYTES >> 20} MiB")
            meta = read_json(meta_path.read_bytes(), f"{name}.json")
            if not isinstance(meta, dict):
                raise ValueError("the JSON is not an object")
            vec_path = self.dir / Path(str(meta["vectors_file"])).name
            blob = vec_path.read_bytes()
            if hashlib.sha256(blob).hexdigest()[:16] != meta["sha256"]:
                raise ValueError("vectors file does not match its checksum")
            arrays = load(blob)
            fields = {k: meta[k] for k in Concept.__dataclass_fields__
                      if k in meta and k not in ("vectors", "norms")}
            fields["pairs"] = [(str(a), str(b)) for a, b in fields.get("pairs", [])]
            fields["name"] = name  # the file's name, whatever the JSON says
            return Concept(vectors=arrays["vectors"], norms=arrays["norms"], **fields)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - a hostile file can fail in any way
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            raise CorruptFileError(
                f"concept {name!r} cannot be read ({type(e).__name__}: {msg}); delete it "
                "with `mlx-steer concepts delete` or lab.concepts.delete and extract it "
                "again") from None

    def unreadable(self) -> dict[str, str]:
        """{name: error message} for every saved concept that cannot be loaded."""
        out = {}
        for name in self.names():
            try:
                self.load(name)
            except MlxSteerError as e:
                out[name] = str(e)
        return out

    def delete(self, name: str) -> None:
        name = validate_name(name)
        meta_path = self.dir / f"{name}.json"
        if not meta_path.exists():
            raise ConceptNotFoundError(f"no concept {name!r} to delete")
        vec = self._vectors_file(meta_path)
        try:
            meta_path.unlink()
        except FileNotFoundError:
            raise ConceptNotFoundError(f"no concept {name!r} to delete") from None
        except OSError as e:
            raise StorageError(f"cannot delete {name!r}: {e.strerror or e}") from None
        for p in [vec, *self.dir.glob(f"{name}.*.safetensors")]:
            if p is not None and _VECTORS.match(p.name) and _VECTORS.match(p.name)[1] == name:
                _unlink(p)
        self.collect()


def _unlink(p: Path) -> bool:
    try:
        p.unlink()
        return True
    except OSError:
        return False


def _touch(p: Path) -> None:
    try:
        os.utime(p)
    except OSError:
        pass
