"""The optional fast CPU path for MLX on Linux: libraries to preload, and a tiny shim.

MLX's Linux CPU wheel links a bundled reference BLAS, whose matrix products are
many times slower than an optimised BLAS. Preloading Debian's OpenBLAS
(`libopenblas0-pthread`) replaces it. Where that is not installed (no root), the
OpenBLAS of PyPI's `scipy-openblas32` wheel (a dependency on Linux) is used instead:
its CBLAS symbols carry a `scipy_` prefix, so it replaces nothing by itself and the
shim below forwards MLX's products to it. A small shim compiled here at set-up
(`sgemv_shim.c`, with the system C compiler) goes in front of it and sends
MLX's one-row `cblas_sgemm` calls (batch-1 decoding) to `cblas_sgemv`, and
few-row ones (batched decoding of 2-12 rows) to a kernel that streams each
weight row once; OpenBLAS's sgemm re-packs the whole weight matrix on every call.
On x86-64 the shim also adds `-march=native -ffp-contract=off -fno-trapping-math
-finline-limit=1000` to the g++ command MLX compiles its fused CPU kernels with at run time
(exp inlined and vectorised, bit-identical outputs; MLX caches them by
name under `$TMPDIR/mlx/`, so kernels compiled before are reused as they are;
MLX_STEER_SHIM_NATIVE=0 leaves the command alone).
tcmalloc (Debian `libtcmalloc-minimal4`) is added when installed: MLX allocates
and frees many buffers per token, which glibc's malloc serves with page faults.

All of it is optional: off on macOS (Metal / Accelerate), skipped when OpenBLAS
or a C compiler is missing, and results are the same either way (float32 sums
in another order: greedy tokens identical, log-probabilities within ~1e-4;
tests/test_fastpath.py).

    python -m mlx_steer.fastpath                # prints the LD_PRELOAD value ('' if none)
    python -m mlx_steer.fastpath --no-tcmalloc  # ... without tcmalloc
    python -m mlx_steer.fastpath --status       # what is available and what this process has

Set MLX_STEER_NO_FASTPATH=1 to turn it all off, MLX_STEER_NO_TCMALLOC=1 for tcmalloc alone,
MLX_STEER_BLAS=pypi to use the PyPI OpenBLAS even where Debian's is installed
(=system: Debian's only; default auto: Debian's, else PyPI's; =mkl: the MKL of PyPI's
`mkl` wheel where `pip install mkl` put it in this environment, sequential by default;
else as auto).

Preloading must happen before the process starts (the dynamic linker reads
LD_PRELOAD once): the Makefile runs `env LD_PRELOAD=... python ...`, and
`reexec()` restarts the current Python process with it.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from .. import config

SOURCE = Path(__file__).with_name("sgemv_shim.c")
SHIM_NAME = "libmlxsteer_sgemv"
_OPENBLAS = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/*-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
)
_TCMALLOC = ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4",)
CFLAGS = ("-O3", "-Wno-psabi", "-shared", "-fPIC")
LIBS = ("-ldl", "-lpthread")
DISABLE_ENV = "MLX_STEER_NO_FASTPATH"  # set to 1 to turn the whole fast path off
BLAS_ENV = "MLX_STEER_BLAS"  # auto (default) | system | pypi: which OpenBLAS to preload
PYPI_BLAS = ("scipy_openblas32", "lib/libscipy_openblas.so")  # package, library inside it
NO_TCMALLOC_ENV = "MLX_STEER_NO_TCMALLOC"  # set to 1 to leave tcmalloc out
REEXEC_ENV = "MLX_STEER_REEXEC"  # set in a process started by reexec(): never loop
NO_PRELOAD_ENV = "MLX_STEER_NO_PRELOAD"  # set to 1: reexec() does nothing


def supported() -> bool:
    """The fast path applies to Linux only (macOS uses Metal and Accelerate)."""
    return sys.platform.startswith("linux") and not _disabled()


def _disabled() -> bool:
    return config.flag(DISABLE_ENV)


def _first(patterns) -> Path | None:
    for pat in patterns:
        for hit in sorted(glob.glob(pat)):
            if os.path.isfile(hit):
                return Path(hit)
    return None


def _blas_choice() -> str:
    choice = config.text(BLAS_ENV).lower() or "auto"
    return choice if choice in ("auto", "system", "pypi", "mkl") else "auto"


def openblas() -> Path | None:
    """Debian/Ubuntu's OpenBLAS `libblas.so.3`, if installed (and not set aside with
    MLX_STEER_BLAS=pypi)."""
    if not supported() or _blas_choice() == "pypi":
        return None
    return _first(_OPENBLAS)


def mkl() -> Path | None:
    """`libmkl_rt` of PyPI's `mkl` wheel in this environment, with MLX_STEER_BLAS=mkl only
    (measured fastest, but a 229 MB wheel: an opt-in, not a dependency)."""
    if not supported() or _blas_choice() != "mkl":
        return None
    return _first((str(Path(sys.prefix) / "lib" / "libmkl_rt.so.*"),))


def pypi_openblas() -> Path | None:
    """The OpenBLAS library of PyPI's `scipy-openblas32` wheel, if installed (found
    without importing it). Its symbols are prefixed: usable only behind the shim."""
    if not supported() or _blas_choice() == "system":
        return None
    try:
        spec = importlib.util.find_spec(PYPI_BLAS[0])
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(root) / PYPI_BLAS[1]
        if lib.is_file():
            return lib
    return None


def tcmalloc() -> Path | None:
    """`libtcmalloc_minimal.so.4` (Debian `libtcmalloc-minimal4`), if installed and
    not turned off with MLX_STEER_NO_TCMALLOC=1."""
    return _first(_TCMALLOC) if supported() and not config.flag(NO_TCMALLOC_ENV) else None


def compiler() -> str | None:
    """The system C compiler: $CC, else cc, gcc or clang on PATH."""
    cc = os.environ.get("CC")
    if cc and shutil.which(cc.split()[0]):
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def default_dest() -> Path:
    """Where the shim is built: inside the virtual environment when writable."""
    venv = Path(sys.prefix) / "share" / "mlx-steer"
    try:
        venv.mkdir(parents=True, exist_ok=True)
        if os.access(venv, os.W_OK):
            return venv
    except OSError:
        pass
    return config.home() / "fastpath"


def shim_path(dest: str | os.PathLike | None = None) -> Path:
    """The path the shim has (or would have) in `dest`: named after its source's hash."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS + LIBS).encode()
                            ).hexdigest()[:12]
    machine = sysconfig.get_platform().replace("-", "_")
    return Path(dest or default_dest()) / f"{SHIM_NAME}-{machine}-{digest}.so"


def build(dest: str | os.PathLike | None = None, force: bool = False) -> Path | None:
    """Compile `sgemv_shim.c` into `dest` and return the .so, or None where that fails.

    None on non-Linux systems, without a C compiler, or when compilation fails;
    never raises for those. An up-to-date build is reused unless `force`.
    """
    if not supported():
        return None
    out = shim_path(dest)
    if out.is_file() and not force:
        return out
    cc = compiler()
    if cc is None:
        return None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [*cc.split(), *CFLAGS, "-o", str(tmp), str(SOURCE), *LIBS]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            return None
        # Atomic: concurrent builds never see half a file. Builds of older sources are
        # left in place: running processes may still name them in LD_PRELOAD.
        os.replace(tmp, out)
        return out
    except (OSError, subprocess.SubprocessError):
        return None


def preload_libs(shim: bool = True, use_tcmalloc: bool = True,
                 dest: str | os.PathLike | None = None) -> list[Path]:
    """The libraries to preload, in order: [shim,] OpenBLAS [, tcmalloc]; [] if none.

    The shim is only used together with OpenBLAS (it must come first so that it
    sees MLX's `cblas_sgemm` calls, and forwards to the library after it). Debian's
    OpenBLAS is preferred; PyPI's needs the shim (its symbols are prefixed).
    """
    blas = mkl() or openblas()
    needs_shim = False
    if blas is None:
        blas, needs_shim = pypi_openblas(), True
    if blas is None:
        return []
    libs = []
    if shim or needs_shim:
        so = build(dest)
        if so is not None:
            libs.append(so)
        elif needs_shim:
            return []
    libs.append(blas)
    if use_tcmalloc:
        tc = tcmalloc()
        if tc is not None:
            libs.append(tc)
    return libs


def preload_env(shim: bool = True, use_tcmalloc: bool = True,
                dest: str | os.PathLike | None = None) -> dict[str, str]:
    """Environment to add for a child process: {"LD_PRELOAD": "shim:openblas:tcmalloc"}
    (what is available of it), or {}.

    Other libraries already in this environment's LD_PRELOAD are kept, after ours
    (earlier shims, OpenBLAS and tcmalloc entries are replaced).
    """
    libs = preload_libs(shim, use_tcmalloc, dest)
    if not libs:
        return {}
    ours = [str(p) for p in libs]
    prior = os.environ.get("LD_PRELOAD", "").replace(" ", ":").split(":")
    kept = [p for p in prior if p and p not in ours and SHIM_NAME not in p
            and "openblas" not in p.lower() and "libmkl_rt" not in p and "tcmalloc" not in p]
    return {"LD_PRELOAD": ":".join(ours + kept)}


def loaded() -> dict[str, bool]:
    """What this process has mapped: {"openblas": .., "pypi_openblas": .., "shim": ..,
    "mkl": .., "tcmalloc": ..}. "openblas" is true for any fast BLAS serving MLX."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    debian = _first(_OPENBLAS) if supported() else None
    system_blas = "/openblas-pthread/" in maps or "/openblas-openmp/" in maps or (
        debian is not None and os.path.realpath(debian) in maps)
    shim = SHIM_NAME in maps
    # The PyPI library serves MLX only through the shim. (numpy's own bundled
    # libscipy_openblas64_ is another library, which MLX cannot use.)
    pypi_blas = shim and "libscipy_openblas.so" in maps
    mkl_rt = "libmkl_rt.so" in maps
    return {"openblas": bool(system_blas or pypi_blas or mkl_rt), "pypi_openblas": pypi_blas,
            "mkl": mkl_rt, "shim": shim, "tcmalloc": "tcmalloc" in maps}


def active() -> bool:
    """True when this process runs MLX with OpenBLAS preloaded."""
    return loaded()["openblas"]


_ROWS_ALONE: dict[int, int] = {}


def rows_alone(m: int) -> int:
    """The most elements of B for which the preloaded shim computes a small product of `m`
    rows (`A @ B` or `A @ B.T`) giving each row the bits it gets alone; 0 without the shim."""
    if m not in _ROWS_ALONE:
        try:
            fn = ctypes.CDLL(None).mlx_steer_rows_alone
            fn.restype, fn.argtypes = ctypes.c_long, [ctypes.c_int]
            _ROWS_ALONE[m] = int(fn(m))
        except (OSError, AttributeError):  # no shim in this process
            _ROWS_ALONE[m] = 0
    return _ROWS_ALONE[m]


def reexec(argv: list[str] | None = None, shim: bool = True, use_tcmalloc: bool = True
           ) -> None:
    """Restart this Python process once with the fast path preloaded (the CLI's entry
    point calls it before MLX does any work; a script may too).

    `argv`: the new process's arguments after the interpreter (default: this
    process's own). A no-op off Linux, with MLX_STEER_NO_FASTPATH or
    MLX_STEER_NO_PRELOAD set, in the restarted process (MLX_STEER_REEXEC), when a
    fast BLAS is already mapped, or when nothing is available to preload; if the
    exec itself fails the process carries on without it.
    """
    if (not supported() or config.flag(NO_PRELOAD_ENV) or config.flag(REEXEC_ENV)
            or active()):
        return
    env = preload_env(shim, use_tcmalloc)
    if not env:
        return
    if argv is None:
        argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)[1:]
    env = {**os.environ, **env, REEXEC_ENV: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv], env)
    except OSError:
        return


def describe() -> str:
    """One line for humans: what the fast path uses here."""
    if not sys.platform.startswith("linux"):
        return "fast CPU path: not needed on this platform"
    if _disabled():
        return f"fast CPU path: disabled by {DISABLE_ENV}"
    have = loaded()
    if not have["openblas"]:
        return ("fast CPU path: off (MLX's bundled reference BLAS; install Debian's "
                "libopenblas0-pthread, or the scipy-openblas32 wheel, and start through "
                "`make app`)")
    return _label(have["mkl"], have["pypi_openblas"], have["shim"], have["tcmalloc"])


def _label(mkl_rt: bool, pypi_blas: bool, shim: bool, tc: bool) -> str:
    blas = ("MKL (mkl wheel)" if mkl_rt else "OpenBLAS from PyPI (scipy-openblas32)"
            if pypi_blas else "OpenBLAS")
    return "fast CPU path: " + blas + (" + sgemv shim" if shim else "") + (
        " + tcmalloc" if tc else "")


def _planned(libs: list[Path]) -> str:
    """What `describe()` will say in a process started with `libs` preloaded."""
    names = " ".join(p.name for p in libs)
    return _label("libmkl_rt" in names, "libscipy_openblas" in names, SHIM_NAME in names,
                  "tcmalloc" in names)


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mlx_steer.fastpath",
                                description="Print the LD_PRELOAD value for MLX's fast CPU path.")
    p.add_argument("--no-shim", action="store_true", help="OpenBLAS only")
    p.add_argument("--no-tcmalloc", action="store_true", help="leave tcmalloc out")
    p.add_argument("--dest", help="where to build the shim")
    p.add_argument("--status", action="store_true", help="describe what is available")
    a = p.parse_args(argv)
    libs = preload_libs(not a.no_shim, not a.no_tcmalloc, a.dest)
    if a.status:
        print(f"platform: {sys.platform}; compiler: {compiler()}; openblas: {openblas()}; "
              f"pypi openblas: {pypi_openblas()}; mkl: {mkl()}; tcmalloc: {tcmalloc()}")
        print("LD_PRELOAD=" + ":".join(map(str, libs)))
        print(describe())
        if libs and not active():  # e.g. `make setup`: what `make app` / `make test` get
            print("with the LD_PRELOAD above (as `make app` and `make test` start Python): "
                  + _planned(libs))
        return 0
    print(":".join(map(str, libs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
