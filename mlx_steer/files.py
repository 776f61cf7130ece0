"""Atomic file writes and strict JSON reading, shared by every module that saves.

A write goes to a temporary file in the target's folder, is fsynced and renamed
over the target: readers see the old file or the new one, never a part, and the
temporary file is removed whatever fails (not only on OSError).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CorruptFileError, StorageError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", mode: int = 0o644
                ) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block ends without error the
    temporary file is fsynced and renamed over `path`. For writers that want a file
    name (a GGUF writer, numpy); an OSError becomes StorageError naming the file."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=suffix)
        os.close(fd)
        os.chmod(tmp, mode)  # mkstemp makes 0600 files
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise StorageError(f"cannot write {path.name} in {path.parent}: "
                           f"{e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, data: bytes | str, mode: int = 0o644) -> Path:
    """Replace `path` with `data` atomically (text is written as UTF-8)."""
    blob = data.encode() if isinstance(data, str) else bytes(data)
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(blob)
    return Path(path)


def read_json(text: str | bytes, what: str):
    """Parsed JSON; anything unreadable (bad syntax, bad UTF-8, nesting too deep for
    Python's recursive parser) raises CorruptFileError naming `what`."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        msg = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise CorruptFileError(f"{what} is not valid JSON ({msg})") from None


def jsonable(x: Any) -> Any:
    """`x` with NumPy values, tuples and paths made plain JSON; NaN and inf become None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x
