"""The `mlx-steer` CLI: argument errors, the stable forms end to end, the concept library."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_steer import cli, fastpath, pairs
from mlx_steer.cli import session

STABLE_TIMEOUT = 240


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One MLX_STEER_HOME for the module: "happy" is extracted once for all commands."""
    return tmp_path_factory.mktemp("mlx-steer-home")


@pytest.fixture(autouse=True)
def _env(home, monkeypatch):
    monkeypatch.setenv("MLX_STEER_HOME", str(home))


def run_cli(*args: str, preload: bool = True) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "mlx-steer"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlx_steer.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    lib = fastpath.openblas()
    if preload and lib and "openblas" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = str(lib)
    elif not preload:
        env.pop("LD_PRELOAD", None)
        env.pop(fastpath.REEXEC_ENV, None)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env,
                          timeout=STABLE_TIMEOUT)


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("mlx-steer: error: ") and "Traceback" not in err
    return lines[0]


# ---- no model needed -------------------------------------------------------------------------


def test_help_explains(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("generate", "sweep", "mix", "extract", "concepts", "introspect", "eval",
                 "LD_PRELOAD", "relative", "--raw"):
        assert word.lower() in out.lower()
    assert cli.main(["sweep", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--layers" in out and "--strengths" in out and "relative unless --raw" in out


@pytest.mark.parametrize("argv", [
    [],
    ["bogus"],
    ["generate"],
    ["generate", "--prompt", "hi"],
    ["generate", "--prompt", "hi", "--concept", "happy", "--vector", "v.npy"],
    ["generate", "--prompt", "hi", "--concept", "happy", "--strength", "inf"],
    ["generate", "--prompt", "hi", "--concept", "happy", "--raw"],
    ["generate", "--prompt", "hi", "--concept", "happy", "--max-tokens", "0"],
    ["generate", "--prompt", "hi", "--concept", "happy", "--positions", "middle"],
    ["sweep", "--prompt", "hi", "--concept", "happy"],
    ["sweep", "--prompt", "hi", "--concept", "happy", "--layers", "4", "--strengths", "0.1"],
    ["sweep", "--prompt", "hi", "--concept", "happy", "--layers", "4,x"],
    ["sweep", "--prompt", "hi", "--concept", "happy", "--strengths", ""],
    ["mix", "--prompt", "hi", "--concepts", "happy"],
    ["mix", "--prompt", "hi", "--concepts", "happy:0.5", "--name", "bad name"],
    ["introspect", "--trials", "-1"],
    ["introspect", "--yes-bias", "50"],
    ["introspect", "--layer-fraction", "1.5"],
    ["concepts"],
    ["concepts", "export-gguf", "happy"],
    ["extract", "--name", "x"],
    ["extract", "--name", "x", "--pairs", "/nonexistent/pairs.json"],
    ["extract", "--name", "../evil", "--pairs", "p.json"],
])
def test_bad_arguments_one_line_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    one_error_line(captured.err)
    assert captured.out == ""


def test_read_pairs_formats(tmp_path):
    from mlx_steer.errors import InvalidArgumentError

    want = [("I am glad", "I am here"), ("What joy", "What now")]
    files = {
        "a.json": json.dumps([list(p) for p in want]),
        "b.json": json.dumps({"name": "x", "pairs": [list(p) for p in want]}),
        "c.json": json.dumps([{"positive": a, "negative": b} for a, b in want]),
        "d.jsonl": "\n".join(json.dumps(list(p)) for p in want),
        "e.tsv": "\n".join(f"{a}\t{b}" for a, b in want) + "\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        assert pairs.read(str(tmp_path / name)) == want, name
    for bad in ("[]", "[[\"only one\"]]", "one column line\n", "{\"pairs\": 3}"):
        (tmp_path / "bad.txt").write_text(bad)
        with pytest.raises(InvalidArgumentError):
            pairs.read(str(tmp_path / "bad.txt"))


def test_fast_path_reexec_once(monkeypatch):
    """The CLI restarts itself through fastpath.reexec once, and not when told not to,
    when restarted already, when a fast BLAS is mapped or when none is available."""
    calls = []
    lib = "/usr/lib/x/openblas-pthread/libblas.so.3"
    monkeypatch.setattr(fastpath.sys, "platform", "linux")
    monkeypatch.setattr(fastpath, "active", lambda: False)
    monkeypatch.setattr(fastpath, "preload_env", lambda *a: {"LD_PRELOAD": lib})
    monkeypatch.setattr(fastpath.os, "execve", lambda exe, argv, env: calls.append((argv, env)))
    for var in (fastpath.REEXEC_ENV, fastpath.NO_PRELOAD_ENV, fastpath.DISABLE_ENV):
        monkeypatch.delenv(var, raising=False)
    fastpath.reexec(["-m", "mlx_steer.cli", "generate", "--prompt", "hi"])
    (argv, env), = calls
    assert argv[1:] == ["-m", "mlx_steer.cli", "generate", "--prompt", "hi"]
    assert env["LD_PRELOAD"] == lib and env[fastpath.REEXEC_ENV] == "1"
    monkeypatch.setenv(fastpath.REEXEC_ENV, "1")  # the re-executed process: no loop
    fastpath.reexec([])
    monkeypatch.delenv(fastpath.REEXEC_ENV)
    monkeypatch.setenv(fastpath.NO_PRELOAD_ENV, "1")
    fastpath.reexec([])
    monkeypatch.delenv(fastpath.NO_PRELOAD_ENV)
    monkeypatch.setattr(fastpath, "active", lambda: True)  # already preloaded
    fastpath.reexec([])
    monkeypatch.setattr(fastpath, "active", lambda: False)
    monkeypatch.setattr(fastpath, "preload_env", lambda *a: {})  # nothing to preload
    fastpath.reexec([])
    assert len(calls) == 1


# ---- the stable forms, end to end in subprocesses ------------------------------------------


@pytest.mark.model
def test_generate_json():
    p = run_cli("generate", "--prompt", "Tell me about your weekend.", "--concept", "happy",
                "--layer", "14", "--strength", "0.4", "--max-tokens", "6", "--temperature",
                "0", "--seed", "1", "--json", preload=False)  # through the re-exec
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert isinstance(d["baseline"], str) and isinstance(d["steered"], str)
    assert d["baseline"] != d["steered"]
    assert d["layer"] == 14 and d["strength"] == pytest.approx(0.4)
    assert [r["kind"] for r in d["rows"]] == ["baseline", "compare"]
    assert d["rows"][1]["kl_divergence"] > 0


@pytest.mark.model
def test_sweep_strengths_json():
    p = run_cli("sweep", "--prompt", "Describe a city.", "--concept", "happy",
                "--strengths", "0.1,0.2,0.4", "--layer", "14", "--max-tokens", "6", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["rows"]
    assert [r["strength"] for r in rows] == [0.0, 0.1, 0.2, 0.4]
    assert rows[0]["is_baseline"] and all(r["layer"] == 14 for r in rows)
    for r in rows:
        for key in ("text", "sentiment", "marker_rate", "perplexity", "repetition_rate",
                    "kl_divergence", "projection", "raw_strength"):
            assert key in r
        assert r["perplexity"] > 1
    assert rows[3]["kl_divergence"] > rows[1]["kl_divergence"] > 0


@pytest.mark.model
def test_sweep_layers_json_and_raw():
    p = run_cli("sweep", "--prompt", "Describe a city.", "--concept", "happy",
                "--layers", "4,8,12", "--strength", "2", "--raw", "--max-tokens", "5", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["rows"]
    assert [r["layer"] for r in rows] == [None, 4, 8, 12]
    assert [r["raw_strength"] for r in rows[1:]] == [2.0, 2.0, 2.0]
    # Each layer's own vector: the same raw strength is a different relative one.
    assert len({round(r["strength"], 6) for r in rows[1:]}) == 3


@pytest.mark.model
def test_introspect_json():
    p = run_cli("introspect", "--trials", "2", "--control-trials", "2", "--yes-bias", "1",
                "--layer", "20", "--strength", "0.2", "--max-tokens", "6",
                "--baseline-words", "10", "--words", "Oceans,Snow", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["trials"] == 2 and d["control_trials"] == 2 and d["layer"] == 20
    assert 0 <= d["detection_rate"] <= 1 and 0 <= d["false_positive_rate"] <= 1
    assert d["relative"] is True and "verdict" in d and len(d["transcripts"]) == 6
    assert d["baseline_words"] == 10


@pytest.mark.model
def test_model_errors_are_one_line():
    p = run_cli("generate", "--prompt", "hi", "--concept", "happy", "--layer", "99", "-q")
    assert p.returncode == 2
    assert "layer 99 is out of range" in one_error_line(p.stderr)
    p = run_cli("generate", "--prompt", "hi", "--concept", "nosuch", "-q")
    assert p.returncode == 2 and "no concept 'nosuch'" in one_error_line(p.stderr)


# ---- the other commands, in-process on the shared model ----------------------------------------


@pytest.fixture
def inproc(smollm, monkeypatch):
    monkeypatch.setitem(session.LABS, None, smollm)
    return smollm


def call(capsys, *argv):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


@pytest.mark.model
def test_concept_library_workflow(inproc, capsys, tmp_path):
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([
        ["Thank you so much, I would be delighted to help you.", "Fine, I will help you."],
        ["Could you kindly pass the salt, please?", "Pass the salt."],
    ]))
    d = call(capsys, "extract", "--name", "polite", "--pairs", str(pairs), "--json", "-q")
    assert d["name"] == "polite" and d["pairs"] == 2 and d["saved"]
    assert cli.main(["extract", "--name", "polite", "--pairs", str(pairs), "-q"]) == 2
    assert "--force" in one_error_line(capsys.readouterr().err)

    d = call(capsys, "mix", "--prompt", "Tell me about trains.", "--concepts",
             "happy:0.6,polite:0.4", "--save", "--max-tokens", "4", "--json", "-q")
    assert d["concept"] == "mix-happy60-polite40" and d["saved"]
    assert [r["kind"] for r in d["rows"]] == ["baseline", "component", "component", "mix"]
    assert d["text"] == d["rows"][-1]["text"]

    names = {c["name"]: c for c in call(capsys, "concepts", "list", "--json")["concepts"]}
    assert names["polite"]["source"] == "library" and "pirate" in names
    assert names["mix-happy60-polite40"]["extracted"]
    shown = call(capsys, "concepts", "show", "mix-happy60-polite40", "--json")
    assert shown["mix"] == [["happy", 0.6], ["polite", 0.4]]
    assert len(shown["vector_norms"]) == inproc.num_layers

    out = tmp_path / "polite.gguf"
    call(capsys, "concepts", "export-gguf", "polite", str(out), "--layers", "all", "--json")
    d = call(capsys, "concepts", "import-gguf", str(out), "--name", "polite2", "--json")
    assert d["name"] == "polite2"
    a, b = inproc.concept("polite"), inproc.concept("polite2")
    # llama.cpp control vectors cannot steer block 0: it is not exported.
    np.testing.assert_allclose(a.vectors[1:], b.vectors[1:], rtol=1e-5, atol=1e-6)
    for name in ("polite2", "mix-happy60-polite40"):
        assert call(capsys, "concepts", "delete", name, "--json") == {"deleted": name}
    assert cli.main(["concepts", "delete", "happy"]) == 2
    assert "cannot be deleted" in one_error_line(capsys.readouterr().err)

    # A vector file instead of a concept (one layer's raw vector).
    vec = tmp_path / "v.npy"
    np.save(vec, a.vectors[12])
    d = call(capsys, "generate", "--prompt", "Hi!", "--vector", str(vec), "--layer", "12",
             "--strength", "1", "--raw", "--max-tokens", "3", "--no-metrics", "--json", "-q")
    assert d["raw_strength"] == 1.0 and d["layer"] == 12

    d = call(capsys, "eval", "--concept", "happy,polite", "--prompts", "2", "--max-tokens",
             "4", "--json", "-q")
    kinds = {(s["kind"], s["concept"]) for s in d["summary"]}
    assert kinds == {("baseline", None), ("eval", "happy"), ("eval", "polite")}
    happy = next(s for s in d["summary"] if s["concept"] == "happy")
    assert happy["n"] == 2 and "sentiment_delta" in happy


@pytest.mark.model
def test_text_output(inproc, capsys):
    assert cli.main(["generate", "--prompt", "Hi!", "--concept", "happy", "--max-tokens", "4",
                     "-q"]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "happy · layer" in out and "│" in out and "ppl" in out


@pytest.mark.model
def test_ops_trained_and_bake_commands(inproc, capsys, tmp_path, monkeypatch):
    from mlx_steer import train

    d = call(capsys, "generate", "--prompt", "Write a happy birthday card.", "--concept",
             "happy", "--op", "ablate", "--max-tokens", "4", "--no-metrics", "--json", "-q")
    assert d["op"] == "ablate" and d["layer"] == "all" and d["rows"][1]["op"] == "ablate"
    d = call(capsys, "generate", "--prompt", "Hi!", "--concept", "happy", "--op", "cap",
             "--strength", "0", "--layer", "12", "--max-tokens", "3", "--no-metrics",
             "--json", "-q")
    assert d["op"] == "cap" and d["layer"] == 12
    assert cli.main(["generate", "--prompt", "Hi!", "--concept", "happy", "--op", "twist"]) == 2
    assert "--op" in one_error_line(capsys.readouterr().err)

    monkeypatch.setattr(train, "MAX_STEPS", 2)  # the command path, not the optimiser, is tested
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([["What a wonderful day!", "It is a day."],
                                 ["I love it, pure joy!", "I saw it."]]))
    d = call(capsys, "extract", "--name", "joy-trained", "--pairs", str(pairs), "--method",
             "trained", "--layer", "12", "--no-save", "--json", "-q")
    assert d["method"] == "trained" and d["layer"] == 12 and d["trained"]["steps"] == 2

    out = tmp_path / "baked"
    d = call(capsys, "bake", "--out", str(out), "--ablate", "happy", "--add", "pirate:0.2@10",
             "--json", "-q")
    assert d["path"] == str(out) and [o["op"] for o in d["note"]["operations"]] == [
        "ablate", "add"]
    assert (out / "config.json").exists() and (out / "mlx_steer_bake.json").exists()
    assert cli.main(["bake", "--out", str(out), "--ablate", "happy", "-q"]) == 2
    assert "not empty" in one_error_line(capsys.readouterr().err)
    assert cli.main(["bake", "--out", str(tmp_path / "x"), "-q"]) == 2
    assert "--ablate" in one_error_line(capsys.readouterr().err)
