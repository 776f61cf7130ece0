"""Hostile input and concurrent use: typed errors, nothing lost, nothing crashes.

Each test here reproduces a failure seen before the fix (segfault on out-of-range token
ids, one corrupt concept breaking `concepts list`, readers seeing a re-saved concept as
corrupt, unbounded `--layers` ranges, bare RecursionError on nested JSON, untyped errors
for bad numbers and text).
"""

import json
import os
import threading
import time

import numpy as np
import pytest

from mlx_steer import Concept, Steer, cli, errors, pairs
from mlx_steer.cli import args as cli_args
from mlx_steer.cli import session
from mlx_steer.library import GRACE_S, Library
from tiny import VOCAB, tiny_lab

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def lab():
    return tiny_lab("mistral")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_STEER_HOME", str(tmp_path))
    return tmp_path


def concept(lab, name="c", scale=1.0, layer=1):
    rng = np.random.default_rng(int(scale * 1000) % 2**32)
    v = rng.standard_normal((lab.num_layers, lab.hidden_size)).astype(np.float32) * scale
    return Concept(name, v, np.full(lab.num_layers, 10.0, np.float32), layer, 0.5,
                   lab.fingerprint, lab.name)


# ---- 1. token ids -------------------------------------------------------------------

@pytest.mark.parametrize("ids", [[10**9], [VOCAB], [-1], [1, 2, VOCAB + 5], [2**63]])
def test_out_of_range_token_ids_are_refused(lab, ids):
    assert lab.vocab_size == VOCAB
    with pytest.raises(errors.InvalidArgumentError, match="out of range"):
        lab.trace(ids)
    with pytest.raises(errors.InvalidArgumentError, match="out of range"):
        lab.generate_batch_tokens([(ids, None)], max_tokens=2)


@pytest.mark.parametrize("ids", [[1.5], ["a"], [True], 7, [[1, 2]], None])
def test_non_integer_token_ids_are_refused(lab, ids):
    with pytest.raises(errors.MlxSteerError):
        lab.generate_batch_tokens([(ids, None)], max_tokens=2)


def test_valid_token_ids_still_work(lab):
    ids = lab.encode("hello")
    assert lab.trace(np.array(ids)).tokens == ids
    assert lab.trace([VOCAB - 1]).logits.shape == (1, VOCAB)


# ---- 3. one corrupt concept ----------------------------------------------------------

def test_concepts_list_survives_one_corrupt_concept(lab, home, monkeypatch, capsys):
    lab.save_concept(concept(lab, "good"))
    lab.save_concept(concept(lab, "bad"))
    (lab.library.dir / "bad.json").write_text("{ not json")
    monkeypatch.setitem(session.LABS, None, lab)
    assert cli.main(["concepts", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["concepts"]}
    assert rows["good"]["layer"] == 1 and "error" not in rows["good"]
    assert "cannot be read" in rows["bad"]["error"]
    assert cli.main(["concepts", "list"]) == 0
    out = capsys.readouterr().out
    assert "unreadable bad" in out and "good" in out
    assert set(lab.library.unreadable()) == {"bad"}
    assert lab.concept("good").layer == 1


# ---- 4. readers during a re-save ---------------------------------------------------

def test_resave_keeps_the_old_vectors_for_readers(lab, home):
    lib = lab.library
    lib.save(concept(lab, "x", 1.0))
    stale_meta = json.loads((lib.dir / "x.json").read_text())
    lib.save(concept(lab, "x", 2.0))
    # A reader that read the JSON just before the save still finds its vectors file.
    assert (lib.dir / stale_meta["vectors_file"]).is_file()
    assert lib.load("x").vector_norm(1) == pytest.approx(concept(lab, "x", 2.0).vector_norm(1))


def test_concurrent_readers_never_see_a_resaved_concept_as_corrupt(lab, home):
    lib = lab.library
    lib.save(concept(lab, "x", 1.0))
    stop, seen, failures = threading.Event(), [], []

    def read():
        while not stop.is_set():
            try:
                seen.append(round(lib.load("x").vector_norm(0), 3))
            except Exception as e:  # noqa: BLE001 - any failure is what this test looks for
                failures.append(repr(e))

    t = threading.Thread(target=read)
    t.start()
    t_end = time.time() + 1.5
    i = 0
    while time.time() < t_end:
        i += 1
        lib.save(concept(lab, "x", 1.0 + i % 2))
    stop.set()
    t.join()
    assert not failures, failures[:3]
    assert len(seen) > 10 and i > 10


def test_collect_removes_only_old_unreferenced_files(lab, home):
    lib = lab.library
    lib.save(concept(lab, "x", 1.0))
    lib.save(concept(lab, "x", 2.0))
    lib.save(concept(lab, "y", 1.0))
    current = {json.loads(p.read_text())["vectors_file"] for p in lib.dir.glob("*.json")}
    stale = [p for p in lib.dir.glob("*.safetensors") if p.name not in current]
    assert len(stale) == 1
    orphan = lib.dir / "z.0123456789abcdef-01234567.safetensors"  # a killed save's
    orphan.write_bytes(b"x")
    tmp = lib.dir / ".abc123.tmp"
    tmp.write_bytes(b"partial")
    keep = lib.dir / "notes.txt"  # not ours: never touched
    keep.write_text("mine")
    assert lib.collect() == []  # all younger than the grace period
    old = time.time() - GRACE_S - 1
    for p in (*stale, orphan, tmp, keep):
        os.utime(p, (old, old))
    removed = set(lib.collect())
    assert removed == {stale[0].name, orphan.name, tmp.name}
    assert keep.exists() and {p.name for p in lib.dir.glob("*.safetensors")} == current
    assert lib.load("x").name == "x" and lib.load("y").name == "y"


def test_a_symlink_is_never_collected(lab, home, tmp_path_factory):
    lib = lab.library
    lib.save(concept(lab, "x"))
    outside = tmp_path_factory.mktemp("outside") / "victim.txt"
    outside.write_text("keep")
    link = lib.dir / "q.0123456789abcdef.safetensors"
    link.symlink_to(outside)
    old = time.time() - GRACE_S - 1
    os.utime(outside, (old, old))
    lib.collect()
    assert outside.read_text() == "keep"


# ---- 5. ranges -----------------------------------------------------------------------

@pytest.mark.parametrize("text", ["0-99999999", "0-" + "9" * 30, "0-4000:1",
                                  "1,2," + ",".join(["3"] * 2000), "0-10:0", "5-1:-1"])
def test_layer_ranges_are_bounded_before_expanding(text, capsys):
    t0 = time.perf_counter()
    assert cli.main(["sweep", "--prompt", "x", "--concept", "happy", "--layers", text]) == 2
    assert time.perf_counter() - t0 < 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error" in err


def test_short_ranges_still_expand():
    assert cli_args.int_list("0-8:4,10") == [0, 4, 8, 10]


# ---- 6. nested JSON -------------------------------------------------------------------

def test_deeply_nested_concept_json_is_corrupt(lab, home):
    lab.save_concept(concept(lab, "deep"))
    (lab.library.dir / "deep.json").write_text(DEEP)
    with pytest.raises(errors.CorruptFileError, match="nested too deeply"):
        lab.library.load("deep")


def test_deeply_nested_pairs_file(tmp_path, capsys):
    for i, body in enumerate([DEEP, '{"pairs": ' + DEEP + "}", DEEP + "\n" + DEEP]):
        p = tmp_path / f"pairs{i}.json"
        p.write_text(body)
        with pytest.raises(errors.MlxSteerError):
            pairs.read(str(p))
        assert cli.main(["extract", "--name", "n", "--pairs", str(p)]) == 2
        assert "internal error" not in capsys.readouterr().err


def test_broken_builtin_cache_entry_is_rebuilt(lab, home):
    calm = lab.concept("calm")
    cache = Library(lab.fingerprint, lab.name, sub="builtin")
    for bad in (DEEP, '{"layer": 1e400}', json.dumps({"vectors_file": "../../x"})):
        (cache.dir / "calm.json").write_text(bad)
        again = lab.concept("calm")
        assert again.layer == calm.layer
        np.testing.assert_array_equal(again.vectors, calm.vectors)
        assert cache.load("calm").layer == calm.layer  # the entry was written again


# ---- weak spots: typed errors for bad numbers and text -----------------------------

def v(n=64):
    return np.ones(n, np.float32)


@pytest.mark.parametrize("positions", [2**31, 2**64, -1])
def test_huge_positions(lab, positions):
    with pytest.raises(errors.InvalidPositionsError):
        lab.generate("hi", Steer(v(), 1, 1.0, positions), max_tokens=2)


@pytest.mark.parametrize("seed", [-1, 2**64, 2**70, 1.5, "7", True])
def test_bad_seeds(lab, seed):
    with pytest.raises(errors.InvalidArgumentError, match="seed"):
        lab.generate("hi", max_tokens=2, temperature=1.0, seed=seed)
    with pytest.raises(errors.InvalidArgumentError, match="seed"):
        lab.generate_batch([("hi", None)], max_tokens=2, temperature=1.0, seed=seed)


def test_largest_seed_works(lab):
    assert isinstance(lab.generate("hi", max_tokens=2, temperature=1.0, seed=2**64 - 1), str)


@pytest.mark.parametrize("kw", [{"temperature": "1"}, {"temperature": 1j},
                                {"top_p": "0.5"}, {"max_tokens": "3"}, {"max_tokens": 2.0}])
def test_options_of_the_wrong_type(lab, kw):
    with pytest.raises(errors.InvalidArgumentError):
        lab.generate("hi", **{"max_tokens": 2, **kw})


@pytest.mark.parametrize("strength", ["1.5", 1 + 2j, [1.0], True, float("nan")])
def test_strengths_must_be_real_numbers(lab, strength):
    with pytest.raises(errors.InvalidStrengthError):
        Steer(v(), 1, strength)
    with pytest.raises(errors.InvalidStrengthError):
        concept(lab).steer(1, strength)
    with pytest.raises(errors.InvalidStrengthError):
        Steer(v(), 1, None)


@pytest.mark.parametrize("vec", [v().astype(complex), np.array(["1"] * 64),
                                 np.array([object()] * 64), np.ones(64, bool)])
def test_vectors_must_be_real_numbers(vec):
    with pytest.raises(errors.VectorShapeError):
        Steer(vec, 1, 1.0)


def test_lone_surrogates_and_empty_batches(lab):
    for call in (lambda: lab.generate("hi \ud800", max_tokens=2),
                 lambda: lab.trace("\udfff"),
                 lambda: lab.generate_batch([("a\ud83d", None)], max_tokens=2)):
        with pytest.raises(errors.InvalidArgumentError, match="surrogate"):
            call()
    with pytest.raises(errors.InvalidArgumentError):
        lab.hidden_states_batch([])
    with pytest.raises(errors.InvalidArgumentError):
        lab.generate("hi", steer="not a steer", max_tokens=2)
    with pytest.raises(errors.InvalidArgumentError):
        lab.generate_batch(["no steer"], max_tokens=2)


def test_to_gguf_into_a_missing_folder(lab, tmp_path):
    with pytest.raises(errors.InvalidArgumentError, match="does not exist"):
        concept(lab).to_gguf(tmp_path / "nope" / "x.gguf")
    assert not (tmp_path / "nope").exists()


# ---- concepts are validated at construction, save, load and import ------------------

def _parts(lab):
    return dict(name="c", vectors=np.ones((lab.num_layers, lab.hidden_size), np.float32),
                norms=np.full(lab.num_layers, 10.0, np.float32), layer=1, strength=0.5,
                model_fingerprint=lab.fingerprint)


@pytest.mark.parametrize("change,error", [
    ({"layer": 99}, errors.LayerOutOfRangeError),
    ({"layer": -1}, errors.LayerOutOfRangeError),
    ({"layer": 1.5}, errors.LayerOutOfRangeError),
    ({"strength": float("nan")}, errors.InvalidStrengthError),
    ({"strength": float("inf")}, errors.InvalidStrengthError),
    ({"strength": "0.5"}, errors.InvalidStrengthError),
    ({"strength": 1e300}, errors.InvalidStrengthError),
    ({"vectors": np.full((4, 64), np.nan)}, errors.InvalidArgumentError),
    ({"vectors": np.full((4, 64), 3e38, np.float32)}, errors.InvalidArgumentError),
    ({"vectors": np.ones((4, 64)) * 1j}, errors.InvalidArgumentError),
    ({"vectors": np.ones((0, 64))}, errors.InvalidArgumentError),
    ({"norms": np.full(4, np.inf)}, errors.InvalidArgumentError),
])
def test_invalid_concepts_are_refused(lab, change, error):
    with pytest.raises(error):
        Concept(**{**_parts(lab), **change})


def test_invalid_concept_is_not_saved(lab, home):
    c = Concept(**_parts(lab))
    c.layer = 99  # changed after construction
    with pytest.raises(errors.LayerOutOfRangeError):
        lab.save_concept(c)
    assert lab.library.names() == []


def test_zero_vector_concept_has_strength_zero(lab):
    c = Concept(**{**_parts(lab), "vectors": np.zeros((4, 64), np.float32)})
    assert c.strength == 0 and c.extra["zero_vector"]
    with pytest.raises(errors.InvalidArgumentError, match="no contrast"):
        lab.extract("same", [("I am here.", "I am here.")] * 2, calibrate=False)


def test_gguf_with_huge_values_is_refused(lab, tmp_path):
    from mlx_steer.control_vector import write_control_vector

    path = write_control_vector(tmp_path / "huge.gguf",
                                {1: np.full(64, 3e38, np.float32)}, "llama", 4)
    with pytest.raises(errors.CorruptFileError, match="too large"):
        Concept.from_gguf(path, lab)
    with pytest.raises(errors.InvalidArgumentError, match="no such file"):
        Concept.from_gguf(tmp_path / "missing.gguf", lab)


# ---- 2. a clean exit after many threads ran the model -------------------------------

THREADS_CHILD = """
import sys, threading
sys.path.insert(0, sys.argv[1])
from tiny import tiny_lab
lab = tiny_lab("mistral", layers=2, hidden=256)
n = int(sys.argv[2])
out = [None] * n
def run(i):
    out[i] = lab.generate_batch([("Tell me a story.", None)] * 3, max_tokens=4)
ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
for t in ts:
    t.start()
for t in ts:
    t.join()
assert all(isinstance(o, list) and o == out[0] for o in out), out
print("ok", n)
"""


def test_many_threads_then_a_clean_exit(tmp_path):
    """18 threads generating on one Lab, then exit: status 0 every time, with the fast
    path preloaded and without (MLX's per-thread compile caches are freed before the
    interpreter finalises)."""
    import subprocess
    import sys
    from pathlib import Path

    from mlx_steer import fastpath

    script = tmp_path / "threads.py"
    script.write_text(THREADS_CHILD)
    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    envs = [base] * 2
    fast = fastpath.preload_env(shim=True) if sys.platform.startswith("linux") else None
    if fast:
        envs.append({**base, **fast})
    for env in envs:
        p = subprocess.run([sys.executable, str(script), str(Path(__file__).parent), "18"],
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-1500:]}"
        assert "ok 18" in p.stdout
