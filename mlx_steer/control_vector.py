"""llama.cpp control-vector GGUF files: `direction.N` float32 tensors.

`direction.N` is added to the output of block N (0-based), the same
convention as `Steer.layer` and repeng; block 0 cannot be written (llama.cpp
rejects index 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import CorruptFileError, InvalidArgumentError, VectorShapeError
from .files import atomic_path


def write_control_vector(path: str | Path, directions: dict[int, np.ndarray],
                         model_hint: str, layer_count: int) -> Path:
    """Write `directions` ({block: vector}) as a control vector; block 0 is dropped."""
    import gguf

    path = Path(path)
    if not path.parent.is_dir():
        raise InvalidArgumentError(f"cannot write {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise InvalidArgumentError(f"cannot write {path}: it is a folder")
    kept = {i: np.ascontiguousarray(v, dtype=np.float32) for i, v in sorted(directions.items())
            if i >= 1}
    if not kept:
        raise VectorShapeError("nothing to export: llama.cpp cannot steer block 0")
    with atomic_path(path, suffix=".gguf.tmp") as tmp:
        w = gguf.GGUFWriter(str(tmp), "controlvector")
        w.add_string("controlvector.model_hint", model_hint or "llama")
        w.add_uint32("controlvector.layer_count", int(layer_count))
        for i, v in kept.items():
            w.add_tensor(f"direction.{i}", v)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read_control_vector(path: str | Path, hidden_size: int) -> dict[int, np.ndarray]:
    """{block: float32 vector} from a control-vector GGUF, checked like llama.cpp does."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"no such file: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CorruptFileError(f"{path.name} is not a readable GGUF file: {e}") from None
    out: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        prefix, _, idx = t.name.partition(".")
        if prefix != "direction" or not idx.isdigit() or int(idx) < 1:
            raise CorruptFileError(
                f"{path.name}: tensor {t.name!r} is not a control vector direction.N (N ≥ 1)")
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise CorruptFileError(f"{path.name}: {t.name} is {t.tensor_type.name}, not F32")
        v = np.asarray(t.data, dtype=np.float32).reshape(-1)
        if v.size != int(np.prod(t.shape)) or len([d for d in t.shape if d > 1]) > 1:
            raise CorruptFileError(f"{path.name}: {t.name} is not 1-D")
        if v.size != hidden_size:
            raise VectorShapeError(
                f"{path.name} has {v.size}-dimensional vectors but this model's hidden size "
                f"is {hidden_size}: it was made for another model")
        with np.errstate(over="ignore"):
            norm = np.linalg.norm(v)  # float32, as it will be used
        if not np.all(np.isfinite(v)) or not np.isfinite(norm):
            raise CorruptFileError(
                f"{path.name}: {t.name} contains NaN, infinite or too large values")
        out[int(idx)] = v.copy()
    if not out:
        raise CorruptFileError(f"{path.name} holds no direction tensors")
    return out
