"""Every `MLX_STEER_*` environment variable in one table, read one way.

`python -m mlx_steer.config` prints the table with the values set in this shell.
Modules read a variable through `flag`, `text` or `number` with its name from
`SETTINGS`, so a flag means the same thing everywhere: unset, "", "0", "false",
"no" or "off" (any case) is off, anything else is on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    meaning: str
    read_by: str  # "python", "shim" (the C library reads it), "tests" or "scripts"


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("MLX_STEER_HOME", "~/.cache/mlx-steer",
            "root of saved concepts, cached built-ins, model and introspection caches",
            "python"),
    Setting("MLX_STEER_DEBUG", "0", "CLI and distributed errors show their traceback",
            "python"),
    Setting("MLX_STEER_WEIGHT_CACHE", "1",
            "keep expanded GGUF weights on disk so later starts skip the expansion",
            "python"),
    Setting("MLX_STEER_DIST_TIMEOUT", "1800",
            "seconds a distributed rank waits for the others before DistributedError",
            "python"),
    Setting("MLX_STEER_APP_WARMUP", "1", "the app warms up the model and 'happy' at start",
            "python"),
    Setting("MLX_STEER_NO_PRELOAD", "0",
            "the CLI does not re-execute itself with the fast CPU path preloaded", "python"),
    Setting("MLX_STEER_REEXEC", "0",
            "set in a process already started with the fast path: never re-execute again",
            "python"),
    Setting("MLX_STEER_NO_FASTPATH", "0",
            "turn the whole fast CPU path off (OpenBLAS, shim, tcmalloc)", "python"),
    Setting("MLX_STEER_BLAS", "auto", "which BLAS to preload: auto, system, pypi or mkl",
            "python"),
    Setting("MLX_STEER_NO_TCMALLOC", "0", "leave tcmalloc out of the preload", "python"),
    Setting("MLX_STEER_SHIM_TWINS", "1", "the sgemv shim reads quantised twins", "shim"),
    Setting("MLX_STEER_SHIM_STATS", "0", "the sgemv shim prints call counts at exit", "shim"),
    Setting("MLX_STEER_SHIM_SMALLM", "1", "the sgemv shim's few-row kernel", "shim"),
    Setting("MLX_STEER_SHIM_THREADS", "",
            "the shim's threads (default OPENBLAS_NUM_THREADS, else the CPUs, at most 16)",
            "shim"),
    Setting("MLX_STEER_SHIM_ISA", "", "cap the shim's instruction set: avx2 or generic",
            "shim"),
    Setting("MLX_STEER_SHIM_TWIN_SPLIT", "1",
            "rows from which the shim splits quantised-twin products over threads", "shim"),
    Setting("MLX_STEER_SHIM_IDLE", "1",
            "the shim's pool threads run at idle priority (0: normal priority)", "shim"),
    Setting("MLX_STEER_SHIM_SPIN", "1000",
            "polls of an idle shim thread before it sleeps (0: never)", "shim"),
    Setting("MLX_STEER_SHIM_SPIN_BATCH", "30000",
            "the same after a product of several rows (batched decoding)", "shim"),
    Setting("MLX_STEER_SHIM_NATIVE", "1",
            "the shim compiles MLX's run-time kernels for this CPU (same results)", "shim"),
    Setting("MLX_STEER_FAULT_KILLS", "4", "processes the fault-injection tests kill", "tests"),
    Setting("MLX_STEER_FAULT_SECONDS", "1.5", "seconds each fault-injection run lasts",
            "tests"),
    Setting("MLX_STEER_HYPOTHESIS", "", "'long': the property tests run many examples",
            "tests"),
    Setting("MLX_STEER_HYPOTHESIS_EXAMPLES", "", "examples per property test", "tests"),
)}

_OFF = ("", "0", "false", "no", "off")


def _setting(name: str) -> Setting:
    if name not in SETTINGS:
        raise KeyError(f"{name} is not in mlx_steer.config.SETTINGS: add it there first")
    return SETTINGS[name]


def text(name: str) -> str:
    """The variable's value, else its default (stripped)."""
    value = os.environ.get(name)
    return (_setting(name).default if value is None else value).strip()


def flag(name: str) -> bool:
    """On unless unset/empty/"0"/"false"/"no"/"off" (then the default decides)."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        value = _setting(name).default
    return value.strip().lower() not in _OFF


def number(name: str) -> float:
    """The value as a number; the default when it is unset or not a number."""
    try:
        return float(text(name))
    except ValueError:
        return float(_setting(name).default)


TF32 = "MLX_ENABLE_TF32"  # MLX's own variable, not in SETTINGS


def full_float32() -> None:
    """Keep MLX's float32 matrix products in full float32 unless the user chose otherwise.

    MLX runs float32 matmuls, quantised matmuls and attention at TF32 precision by default
    on hardware with matrix units (CUDA GPUs, Apple M5); it reads `MLX_ENABLE_TF32` at the
    first such product. The lab compares rows of one batch with each other and with
    requests run alone, which needs the same arithmetic at every batch size: on an H200,
    with TF32, batched rows differed from the request alone by up to 5.6e-4 in
    log-probabilities (docs/BENCHMARKS.md §8). `MLX_ENABLE_TF32=1` restores MLX's default.
    """
    os.environ.setdefault(TF32, "0")


def home() -> Path:
    """Root of mlx-steer's user data: $MLX_STEER_HOME or ~/.cache/mlx-steer."""
    return Path(os.environ.get("MLX_STEER_HOME") or Path.home() / ".cache" / "mlx-steer")


def table() -> str:
    rows = [(s.name, s.default or "-", os.environ.get(s.name, ""), s.read_by, s.meaning)
            for s in SETTINGS.values()]
    head = ("variable", "default", "set here", "read by", "meaning")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4]  # noqa: E731
    return "\n".join([line(head)] + [line(r) for r in rows])

