"""Process-level faults on one concept library: saves killed at random points, readers
and writers in separate processes, a full disk during a save. The library stays
loadable, nothing saved earlier is lost, and a failed save says what happened.

Longer runs: MLX_STEER_FAULT_KILLS=200 MLX_STEER_FAULT_SECONDS=20 python -m pytest -s
tests/test_faults.py (counts are printed with -s).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlx_steer import Concept, errors
from mlx_steer.library import Library

KILLS = int(os.environ.get("MLX_STEER_FAULT_KILLS", "4"))
SECONDS = float(os.environ.get("MLX_STEER_FAULT_SECONDS", "1.5"))
FP = "ab" * 32  # a model fingerprint: no model is needed to save and load concepts
L, D = 30, 576  # SmolLM2's shape: each save writes ~70 KB

CHILD = """
import json, os, sys, time
import numpy as np
from mlx_steer import Concept
from mlx_steer.library import Library
root, role, seconds, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
lib = Library("ab" * 32, "m", root=__import__("pathlib").Path(root))
rng = np.random.default_rng(seed)
def concept(name, k):
    v = np.full((30, 576), float(k), np.float32) + rng.standard_normal((30, 576)).astype(np.float32)
    return Concept(name, v, np.full(30, 10.0, np.float32), 1 + k % 20, 0.5, "ab" * 32,
                   extra={"k": int(k)})
if role == "fsize":
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    try:
        lib.save(concept("keep", 99))
        print(json.dumps({"saved": True}))
    except Exception as e:
        print(json.dumps({"saved": False, "type": type(e).__name__, "msg": str(e)}))
    sys.exit(0)
print("ready", flush=True)
end = time.time() + seconds
n = bad = 0
errs = []
while time.time() < end:
    if role == "writer":
        lib.save(concept("shared", n % 7))
        lib.save(concept(f"w{seed}-{n % 5}", n))
    else:
        for name in lib.names():
            try:
                c = lib.load(name)
                assert c.vectors.shape == (30, 576) and np.isfinite(c.vectors).all()
                assert abs(float(c.vectors[0].mean()) - c.extra["k"]) < 0.5  # vectors match meta
            except Exception as e:
                bad += 1
                errs.append(f"{name}: {type(e).__name__}: {e}")
    n += 1
print(json.dumps({"role": role, "ops": n, "bad": bad, "errors": errs[:3]}), flush=True)
"""

STATS: dict[str, int] = {}


def _spawn(root, role, seconds=3600.0, seed=0):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), role, str(seconds),
                             str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _concept(name, k):
    v = np.full((L, D), float(k), np.float32)
    return Concept(name, v, np.full(L, 10.0, np.float32), 1, 0.5, FP, extra={"k": k})


def _check_library(lib: Library, keep: dict[str, int]) -> None:
    """Every listed concept loads; the concepts saved before the faults are intact."""
    for name in lib.names():
        c = lib.load(name)  # a CorruptFileError here fails the test
        assert np.isfinite(c.vectors).all()
    for name, k in keep.items():
        assert lib.load(name).extra["k"] == k


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nfault runs:", json.dumps(STATS, sort_keys=True))


def test_saves_killed_at_random_points(tmp_path):
    lib = Library(FP, "m", root=tmp_path)
    keep = {"before1": 1, "before2": 2}
    for name, k in keep.items():
        lib.save(_concept(name, k))
    rnd = random.Random(0)
    for i in range(KILLS):
        p = _spawn(tmp_path, "writer", seed=i)
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        time.sleep(rnd.uniform(0.0, 0.25))
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert p.returncode == -signal.SIGKILL
        _check_library(lib, keep)
    STATS["killed saves"] = STATS.get("killed saves", 0) + KILLS
    leftovers = [p.name for p in lib.dir.iterdir()
                 if p.name.endswith(".tmp") or p.suffix == ".safetensors"]
    lib.collect(grace_s=0)  # what killed saves left behind is collected...
    after = {p.name for p in lib.dir.iterdir()}
    assert not [n for n in after if n.endswith(".tmp")]
    referenced = {json.loads(p.read_text())["vectors_file"] for p in lib.dir.glob("*.json")}
    assert {n for n in after if n.endswith(".safetensors")} == referenced
    STATS["files collected after kills"] = len(leftovers) - len(referenced)
    _check_library(lib, keep)  # ...and everything still loads


def test_concurrent_reader_and_writer_processes(tmp_path):
    lib = Library(FP, "m", root=tmp_path)
    lib.save(_concept("shared", 0))
    procs = [_spawn(tmp_path, "writer", SECONDS, seed=i) for i in range(2)]
    procs += [_spawn(tmp_path, "reader", SECONDS, seed=10 + i) for i in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    reads = sum(r["ops"] for r in results if r["role"] == "reader")
    writes = sum(r["ops"] for r in results if r["role"] == "writer")
    assert all(r["bad"] == 0 for r in results), [r["errors"] for r in results]
    assert reads > 0 and writes > 0
    STATS["concurrent processes"] = len(procs)
    STATS["concurrent reader passes"] = reads
    STATS["concurrent writer rounds"] = writes
    _check_library(lib, {})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE semantics")
def test_full_disk_during_a_save(tmp_path):
    lib = Library(FP, "m", root=tmp_path)
    lib.save(_concept("keep", 1))
    lib.save(_concept("other", 2))
    p = _spawn(tmp_path, "fsize")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    r = json.loads(out.strip().splitlines()[-1])
    assert r == {"saved": False, "type": "StorageError", "msg": r["msg"]}
    assert "'keep' was not saved" in r["msg"] and "File too large" in r["msg"]
    assert "unchanged" in r["msg"]
    _check_library(lib, {"keep": 1, "other": 2})  # the old "keep" is still there
    assert not [q for q in lib.dir.iterdir() if q.name.endswith(".tmp")]
    assert len(list(lib.dir.glob("*.safetensors"))) == 2  # the partial file was removed
    STATS["full-disk saves"] = 1


def test_storage_error_is_typed_in_process(tmp_path, monkeypatch):
    lib = Library(FP, "m", root=tmp_path)
    lib.save(_concept("keep", 1))

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(errors.StorageError, match="No space left"):
        lib.save(_concept("keep", 5))
    monkeypatch.undo()
    assert lib.load("keep").extra["k"] == 1
    assert Path(lib.dir).is_dir() and not list(lib.dir.glob(".*.tmp"))
