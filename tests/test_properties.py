"""Property-based tests (hypothesis) over the public API and the CLI, on tiny models.

Whatever the input, mlx-steer answers with a result or a typed error from
`mlx_steer.errors`: never a crash, a hang, a bare builtin exception, or a file written
outside the library. The CLI exits 0, or 2 with one line on stderr.

`make test` runs a short profile; a longer run:
    MLX_STEER_HYPOTHESIS=long python -m pytest tests/test_properties.py
(`MLX_STEER_HYPOTHESIS_EXAMPLES=N` overrides the example count of either profile).
"""

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mlx_steer import Concept, Steer, cli, errors
from mlx_steer.cli import session
from mlx_steer.concept import validate_name
from mlx_steer.library import Library
from tiny import VOCAB, tiny_lab

PROFILES = {"fast": 20, "long": 400}
_examples = int(os.environ.get("MLX_STEER_HYPOTHESIS_EXAMPLES") or
                PROFILES[os.environ.get("MLX_STEER_HYPOTHESIS", "fast")])
SETTINGS = settings(max_examples=_examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much])
# Counts of generated inputs, for docs/RELIABILITY.md (printed with -s).
COUNTS: dict[str, int] = {}


def count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


@pytest.fixture(scope="module")
def lab():
    return tiny_lab("mistral")


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if COUNTS:
        print("\nhypothesis inputs tried:", json.dumps(COUNTS, sort_keys=True))


def typed_or_ok(fn, *args, **kw):
    """Run fn; a typed error is fine, any other exception fails the test."""
    try:
        return fn(*args, **kw)
    except errors.MlxSteerError as e:
        assert str(e), "a typed error must say what went wrong"
        return e


# ---- values ---------------------------------------------------------------------------

SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\ud83d", "\udcff\udcfe"])
texts = st.one_of(st.text(max_size=40), st.just(""), st.just("   \n\t"),
                  SURROGATES, st.just("x" * 5000), st.text(alphabet="\x00\u202e\ufeff",
                                                           max_size=5))
big_ints = st.one_of(st.integers(-3, 40), st.sampled_from([2**31 - 1, 2**31, 2**63, 2**64,
                                                           -2**63, 10**30]))
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), big_ints,
                    st.complex_numbers(max_magnitude=10), st.text(max_size=5), st.none(),
                    st.booleans(), st.sampled_from(["1.5", b"2", [1.0], np.float64(2.0),
                                                    np.int64(3), np.nan]))
positions = st.one_of(st.sampled_from(["all", "prompt", "generated", "none", "", "ALL"]),
                      big_ints, st.floats(), st.none())
dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int8, np.int64, np.bool_,
                          np.complex64, np.str_, object])


@st.composite
def vectors(draw, hidden=64):
    shape = draw(st.sampled_from([(hidden,), (1, hidden), (hidden, 1), (hidden + 1,), (0,),
                                  (2, hidden), (), (hidden, hidden)]))
    dtype = draw(dtypes)
    fill = draw(st.sampled_from([1.0, 0.0, np.nan, np.inf, -np.inf, 3e38, 1e-30, "random"]))
    if fill == "random":
        a = np.random.default_rng(draw(st.integers(0, 99))).standard_normal(shape)
    else:
        a = np.full(shape, fill)
    if dtype is np.str_:
        return a.astype(str)
    if dtype is object:
        return a.astype(object)
    with np.errstate(all="ignore"):
        return a.astype(dtype)


# ---- the Python API ---------------------------------------------------------------------

@SETTINGS
@given(vec=vectors(), layer=st.one_of(big_ints, st.floats(), st.none(), st.text(max_size=3)),
       strength=numbers, pos=positions, prompt=texts)
def test_steer_and_generate(lab, vec, layer, strength, pos, prompt):
    count("steer+generate")
    s = typed_or_ok(Steer, vec, layer, strength, pos)
    if isinstance(s, Steer):
        out = typed_or_ok(lab.generate, prompt, s, max_tokens=2)
        assert isinstance(out, (str, errors.MlxSteerError))


@SETTINGS
@given(prompt=texts, max_tokens=st.one_of(big_ints, numbers), temperature=numbers,
       top_p=numbers, seed=st.one_of(big_ints, numbers), chat=st.booleans())
def test_generation_options(lab, prompt, max_tokens, temperature, top_p, seed, chat):
    count("generation options")
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and 0 < max_tokens:
        max_tokens = min(max_tokens, 3)  # valid sizes stay short
    typed_or_ok(lab.generate, prompt, None, max_tokens=max_tokens, temperature=temperature,
                top_p=top_p, seed=seed, chat=chat)


token_lists = st.one_of(
    st.lists(st.integers(-2**70, 2**70), max_size=6),
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6),
    st.lists(st.one_of(st.floats(), st.text(max_size=2), st.booleans(), st.none()),
             max_size=3),
    st.builds(lambda n: np.arange(n, dtype=np.int64), st.integers(0, 5)),
    st.sampled_from([[VOCAB], [-1], [2**31], [[1, 2]], 5, None, b"ab"]))


@SETTINGS
@given(ids=token_lists, prompt_len=st.one_of(st.none(), big_ints))
def test_token_ids(lab, ids, prompt_len):
    count("token ids")
    r = typed_or_ok(lab.trace, ids, None, prompt_len=prompt_len)
    if not isinstance(r, errors.MlxSteerError):
        assert r.logits.shape == (len(r.tokens), VOCAB)
    typed_or_ok(lab.generate_batch_tokens, [(ids, None)], max_tokens=2)


@SETTINGS
@given(batch=st.one_of(st.lists(texts, max_size=3), st.just([]), st.just("text"),
                       st.none(), st.lists(big_ints, max_size=2)))
def test_hidden_states_batch(lab, batch):
    count("hidden_states_batch")
    typed_or_ok(lab.hidden_states_batch, batch)


@SETTINGS
@given(vec=vectors(), norms=vectors(), layer=st.one_of(big_ints, st.floats(), st.none()),
       strength=numbers, n_layers=st.sampled_from([4, 0, 1, 5]))
def test_concept_construction(lab, vec, norms, layer, strength, n_layers):
    count("concept construction")
    v = np.broadcast_to(vec.reshape(-1)[:1] if vec.size else vec.reshape(-1),
                        (n_layers, 64)) if vec.size and vec.ndim <= 1 else vec
    n = norms.reshape(-1)[:n_layers] if norms.ndim else norms
    c = typed_or_ok(Concept, "c", v, n, layer, strength, lab.fingerprint)
    if isinstance(c, Concept):
        assert all(math.isfinite(x) for x in (c.strength, c.vector_norm(c.layer)))
        s = typed_or_ok(c.steer)
        assert isinstance(s, (Steer, errors.MlxSteerError))


@SETTINGS
@given(name=st.one_of(st.text(max_size=80), SURROGATES, st.sampled_from(
    ["../x", "..", ".", "/etc/passwd", "a/b", "a\\b", "CON", "x" * 65, "ok-name", "\x00",
     "a.json", " spaced ", "Ünïcode"])))
def test_names_never_escape_the_library(tmp_path, name):
    count("names")
    lib = Library("f" * 64, "m", root=tmp_path)
    clean = typed_or_ok(validate_name, name)
    if isinstance(clean, str):
        path = (lib.dir / f"{clean}.json").resolve()
        assert path.parent == lib.dir.resolve()


# ---- hostile files ---------------------------------------------------------------------------

def _good_concept(lab, name="good"):
    v = np.random.default_rng(0).standard_normal((lab.num_layers, lab.hidden_size))
    return Concept(name, v, np.full(lab.num_layers, 10.0), 1, 0.5, lab.fingerprint)


@st.composite
def hostile_json(draw, meta: dict):
    kind = draw(st.sampled_from(["truncate", "nest", "mutate", "random", "types"]))
    text = json.dumps(meta)
    if kind == "truncate":
        return text[: int(draw(st.floats(0, 1)) * len(text))].encode()
    if kind == "nest":
        d = draw(st.sampled_from([10, 1000, 100_000]))
        return ("[" * d + "]" * d).encode()
    if kind == "mutate":
        b = bytearray(text.encode())
        for _ in range(draw(st.integers(1, 5))):  # positions as fractions: lengths vary
            b[int(draw(st.floats(0, 1, exclude_max=True)) * len(b))] = draw(st.integers(0, 255))
        return bytes(b)
    if kind == "random":
        return draw(st.binary(max_size=200))
    key = draw(st.sampled_from(sorted(meta)))
    bad = draw(st.one_of(st.none(), st.booleans(), big_ints, st.floats(), st.text(max_size=5),
                         st.lists(st.integers(), max_size=3), st.just({"a": [1]}),
                         st.just("../../etc/passwd"), st.just(1e400)))
    return json.dumps({**meta, key: bad}).replace("Infinity", "1e400").encode()


@SETTINGS
@given(data=st.data())
def test_hostile_concept_files(lab, tmp_path_factory, data):
    count("concept files")
    root = tmp_path_factory.mktemp("lib")
    lib = Library(lab.fingerprint, lab.name, root=root)
    lib.save(_good_concept(lab, "good"))
    lib.save(_good_concept(lab, "victim"))
    meta = json.loads((lib.dir / "victim.json").read_text())
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    if data.draw(st.booleans()):
        (lib.dir / "victim.json").write_bytes(data.draw(hostile_json(meta)))
    else:  # a hostile safetensors file whose checksum the JSON matches
        import hashlib

        blob = data.draw(st.one_of(
            st.binary(max_size=64),
            st.builds(lambda n, body: struct.pack("<Q", n) + body,
                      st.sampled_from([0, 2, 10**6, 2**63]),
                      st.sampled_from([b"{}", b'{"vectors": {"dtype": "F32", "shape": '
                                       b'[999999, 999999], "data_offsets": [0, 8]}}',
                                       b'{"__metadata__": 5}', b"[" * 5000]))))
        vec = lib.dir / meta["vectors_file"]
        vec.write_bytes(blob)
        meta["sha256"] = hashlib.sha256(blob).hexdigest()[:16]
        (lib.dir / "victim.json").write_text(json.dumps(meta))
    r = typed_or_ok(lib.load, "victim")
    assert isinstance(r, (Concept, errors.MlxSteerError))
    assert lib.load("good").layer == 1  # the other concept is untouched
    assert "victim" in lib.names()
    after = {p for p in root.rglob("*")}
    assert all(str(p).startswith(str(lib.dir)) for p in after - set(before))


def _gguf_bytes(lab, tmp_path) -> bytes:
    return _good_concept(lab).to_gguf(tmp_path / "ok.gguf", layers="all").read_bytes()


@SETTINGS
@given(data=st.data())
def test_hostile_gguf_control_vectors(lab, tmp_path_factory, data):
    count("gguf files")
    d = tmp_path_factory.mktemp("gguf")
    good = _gguf_bytes(lab, d)
    kind = data.draw(st.sampled_from(["truncate", "mutate", "header", "random"]))
    b = bytearray(good)
    if kind == "truncate":
        b = b[: data.draw(st.integers(0, len(b) - 1))]
    elif kind == "mutate":
        for _ in range(data.draw(st.integers(1, 8))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    elif kind == "header":  # tensor count, kv count, a length field: huge or wrong
        off = data.draw(st.sampled_from([8, 16, 24, 32, 40]))
        b[off:off + 8] = struct.pack("<Q", data.draw(st.sampled_from(
            [0, 1, 2**31, 2**63, 2**64 - 1, 7])))
    else:
        b = bytearray(data.draw(st.binary(max_size=128)))
    path = d / "hostile.gguf"
    path.write_bytes(bytes(b))
    r = typed_or_ok(Concept.from_gguf, path, lab)
    if isinstance(r, Concept):
        assert np.all(np.isfinite(r.vectors)) and math.isfinite(r.strength)


# ---- the CLI ---------------------------------------------------------------------------------

HOSTILE = st.one_of(
    st.sampled_from(["0", "1", "-1", "3", "all", "0-3", "0-99999999", "0-" + "9" * 40,
                     "1,2,3", "nan", "inf", "-inf", "1e999", "2147483648", "1.5", "", " ",
                     "happy", "calm", "nope", "../x", "a:0.5,b:0.5", "happy:0.7,calm:0.3",
                     "happy:nan", "prompt", "generated", "\udcff", "x" * 300]),
    st.text(max_size=8), big_ints.map(str))
COMMANDS = {
    "generate": ["--prompt", "--concept", "--vector", "--layer", "--strength", "--raw",
                 "--positions", "--max-tokens", "--temperature", "--seed"],
    "sweep": ["--prompt", "--concept", "--layers", "--strengths", "--max-tokens", "--seed",
              "--positions", "--raw", "--strength"],
    "mix": ["--prompt", "--concepts", "--layer", "--strength", "--positions", "--name",
            "--max-tokens"],
    "extract": ["--name", "--pairs", "--method", "--read", "--no-save"],
    "concepts list": [],
    "concepts show": [],
    "concepts export-gguf": ["--layers"],
    "concepts import-gguf": ["--name", "--force"],
    "concepts delete": [],
}
FLAGS = {"--raw", "--no-save", "--force"}


@st.composite
def argvs(draw, files: dict):
    cmd = draw(st.sampled_from(sorted(COMMANDS)))
    argv = cmd.split() + ["--quiet"]
    if cmd in ("concepts show", "concepts delete", "concepts export-gguf"):
        argv.append(draw(HOSTILE))
    if cmd == "concepts export-gguf":
        argv.append(draw(st.sampled_from([files["out"], files["missing_dir"], "", "."])))
    if cmd == "concepts import-gguf":
        argv.append(draw(st.sampled_from(list(files.values()))))
    for flag in draw(st.lists(st.sampled_from(COMMANDS[cmd]), max_size=5)) if COMMANDS[cmd] else []:
        argv.append(flag)
        if flag not in FLAGS:
            if flag in ("--pairs", "--vector"):
                argv.append(draw(st.sampled_from(list(files.values()))))
            elif flag == "--max-tokens":
                argv.append(draw(st.sampled_from(["1", "2", "0", "-1", "x", "10000000"])))
            else:
                argv.append(draw(HOSTILE))
    if draw(st.booleans()):
        argv.append("--json")
    return argv


@pytest.fixture(scope="module")
def cli_files(lab, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-files")
    (d / "pairs.json").write_text(json.dumps([["I love it.", "I see it."],
                                              ["What joy!", "What now."]]))
    (d / "nested.json").write_text("[" * 50_000 + "]" * 50_000)
    (d / "same.json").write_text(json.dumps([["same", "same"]]))
    np.save(d / "v.npy", np.ones(64, np.float32))
    np.save(d / "bad.npy", np.full(64, np.nan, np.float32))
    (d / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 40)
    _good_concept(lab).to_gguf(d / "ok.gguf")
    return {"pairs": str(d / "pairs.json"), "nested": str(d / "nested.json"),
            "same": str(d / "same.json"), "npy": str(d / "v.npy"), "nan": str(d / "bad.npy"),
            "junk": str(d / "junk.gguf"), "gguf": str(d / "ok.gguf"),
            "none": str(d / "missing.json"), "out": str(d / "out.gguf"),
            "missing_dir": str(d / "no" / "out.gguf")}


@SETTINGS
@given(data=st.data())
def test_cli_exit_status_and_one_line_errors(lab, cli_files, tmp_path_factory, monkeypatch,
                                             capsys, data):
    count("cli argv")
    home = tmp_path_factory.mktemp("home")
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.setenv("MLX_STEER_HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.setitem(session.LABS, None, lab)
    argv = data.draw(argvs(cli_files))
    before = set(Path(cli_files["out"]).parent.rglob("*"))
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code in (0, 2), f"{argv}: exit {code}: {err}"
    if code == 2:
        assert err.strip() and "\n" not in err.strip(), f"{argv}: {err!r}"
        assert "internal error" not in err
    assert not list(cwd.iterdir()), f"{argv} wrote into the working folder"
    new = set(Path(cli_files["out"]).parent.rglob("*")) - before
    assert new <= {Path(cli_files["out"])}, f"{argv} wrote {new}"
    for p in home.rglob("*"):
        assert p.resolve().is_relative_to(home.resolve())
