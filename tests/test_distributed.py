"""Scale-out on mx.distributed: two ranks on loopback, started by `mlx.launch --backend ring`.

The ranks load the same tiny random Llama/Mistral model from a folder written here.
"""

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny import save_tiny, tiny_lab

import mlx_steer
from mlx_steer import Concept, distributed
from mlx_steer import experiments as X
from mlx_steer.errors import InvalidArgumentError, UnsupportedModelError
from mlx_steer.models import base

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().with_name("dist_worker.py")
LAUNCH_TIMEOUT = 300  # seconds for a whole 2-rank run on a loaded machine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-mistral"), "mistral")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A model that mlx-lm can also split into pipeline stages."""
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("mlx-steer-home")


def fake_concept(lab):
    vecs = np.random.default_rng(0).normal(size=(lab.num_layers, lab.hidden_size))
    return Concept("happy", vecs.astype(np.float32), np.full(lab.num_layers, 8.0, np.float32),
                   1, 0.5, lab.fingerprint)


def free_ports() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def launch(*command: str, home: Path, n: int = 2) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "mlx.launch"
    launcher = [str(exe)] if exe.exists() else [
        sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", MLX_STEER_HOME=str(home),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([*launcher, "-n", str(n), "--backend", "ring", "-p",
                           str(free_ports()), *command],
                          capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=LAUNCH_TIMEOUT)


def worker(mode: str, model_dir: Path, out: Path, home: Path):
    started = time.monotonic()
    proc = launch(sys.executable, str(WORKER), mode, str(model_dir), str(out), home=home)
    ranks = {}
    for r in (0, 1):
        f = out / f"{mode}-rank{r}.json"
        ranks[r] = json.loads(f.read_text()) if f.exists() else None
    return proc, ranks, time.monotonic() - started


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    """Equal records: every field equal, floats to float32 rounding (a batch of a
    different size rounds its matrix products differently)."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert list(ra) == list(rb)  # same columns, same order
        for k in ra:
            x, y = ra[k], rb[k]
            if isinstance(x, float) and isinstance(y, float):
                assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6), (ra["row"], k, x, y)
            else:
                assert x == y, (ra["row"], k, x, y)


# ---- in one process -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_share_covers_every_row_once(n, size):
    shares = [distributed.share(n, r, size) for r in range(size)]
    assert [i for s in shares for i in s] == list(range(n))  # contiguous, in order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(InvalidArgumentError):
        distributed.share(n, size, size)


def test_alone_is_not_distributed(monkeypatch):
    assert distributed.world() is None
    assert distributed.is_lead(None) and distributed.size(None) == 1
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(InvalidArgumentError, match="number of seconds"):
        distributed.timeout_s()
    with pytest.raises(InvalidArgumentError):
        distributed.timeout_s(0)


def test_gather_results_raises_what_another_rank_raised(monkeypatch):
    """The gather's protocol, with rank 1's part simulated (the real collective is
    exercised under mlx.launch below)."""
    from mlx_steer.errors import DistributedError, PromptTooLongError

    def other_rank(fn):
        try:
            return json.dumps({"ok": True, "result": fn()}).encode()
        except Exception as e:
            return json.dumps(distributed._failure(e)).encode()

    def with_rank1(fn):
        monkeypatch.setattr(distributed, "all_gather_bytes",
                            lambda data, group: [data, other_rank(fn)])

    with_rank1(lambda: [2])
    assert distributed.gather_results(lambda: [1], None) == [[1], [2]]

    def too_long():
        raise PromptTooLongError("the prompt has 9999 tokens")

    with_rank1(too_long)
    with pytest.raises(PromptTooLongError, match="rank 1 of 2 failed: the prompt has 9999"):
        distributed.gather_results(lambda: [1], None)

    def crash():
        raise KeyError("boom")

    with_rank1(crash)
    with pytest.raises(DistributedError, match="rank 1 of 2 failed: KeyError: 'boom'"):
        distributed.gather_results(lambda: [1], None, what="grid")
    # this rank failing too: both are named, and nothing is returned
    with pytest.raises(DistributedError, match=r"rank 0 of 2 failed \(and ranks 1\)"):
        distributed.gather_results(lambda: [float("nan")], None)


def test_shard_problems_are_named():
    model = tiny_lab("mistral").model  # 4 heads, 2 KV heads, 4 blocks
    assert base.sharding_kind(model) == "tensor"
    assert base.shard_problem(model, 2) is None
    assert "num_key_value_heads (2) is not divisible by 4" in base.shard_problem(model, 4)
    with pytest.raises(UnsupportedModelError, match="no pipeline sharding"):
        base.sharding_kind(model, "pipeline")  # mlx-lm's llama has no stages
    with pytest.raises(InvalidArgumentError):
        base.sharding_kind(model, "rows")
    assert base.sharding_kind(tiny_lab("qwen2").model, "pipeline") == "pipeline"
    assert "4 blocks cannot make 5 pipeline stages" in base.shard_problem(
        tiny_lab("qwen2").model, 5, "pipeline")

    class Group:  # only its size is read before refusing
        def size(self):
            return 4

    with pytest.raises(UnsupportedModelError, match="not divisible by 4 ranks"):
        base.shard(model, Group())


def test_a_sharded_model_does_not_split_rows():
    class Group:
        def size(self):
            return 2

        def rank(self):
            return 0

    lab = tiny_lab("mistral")
    lab.group = Group()  # as if sharded: every rank must run every row
    with pytest.raises(InvalidArgumentError, match="not to both"):
        X.strength_explorer(lab, "hi", fake_concept(lab), [1.0], layer=1, group=Group())


def test_a_group_of_one_loads_unsharded(model_dir):
    import mlx.core as mx

    lab = mlx_steer.load(str(model_dir), group=mx.distributed.init())
    assert lab.group is None
    assert lab.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)


# ---- two ranks under mlx.launch ------------------------------------------------------------


def test_sharded_steered_model_equals_whole(model_dir, tmp_path, home):
    proc, ranks, _ = worker("shard", model_dir, tmp_path, home)
    assert proc.returncode == 0 and ranks[0] and ranks[1], proc.stderr[-3000:]
    for r in ranks.values():
        assert r["size"] == 2
        assert r["q_proj_rows"] == [32, 64]  # each rank holds half the heads
        assert r["steering_effect"] > 0.1  # the steering changes the logits ...
        assert r["logits_diff"] < 1e-4  # ... the same way on the sharded model
        assert r["hidden_diff"] < 1e-4
        assert r["text_sharded"] == r["text_whole"]
        # A lone request, then a batch: the generator's step ahead must not
        # overlap the batch's collectives.
        assert r["batch_sharded"] == r["batch_whole"]
        assert r["batch_whole"][0] == r["text_whole"]


def test_pipeline_stages_steer_like_the_whole_model(qwen_dir, tmp_path, home):
    proc, ranks, _ = worker("pipeline", qwen_dir, tmp_path, home)
    assert proc.returncode == 0 and ranks[0] and ranks[1], proc.stderr[-3000:]
    assert ranks[0]["span"] == [2, 4] and ranks[1]["span"] == [0, 2]  # mlx-lm's split
    for r in ranks.values():
        assert r["num_layers"] == 4
        assert r["steering_effect"] > 0.1
        # each stage steers its own blocks; the captured outputs of all blocks reach
        # every rank; the same operations run, so the results are the same bits
        assert r["logits_diff"] == 0 and r["hidden_diff"] == 0 and r["batch_hidden_diff"] == 0
        assert r["text_sharded"] == r["text_whole"]
        assert r["batch_sharded"] == r["batch_whole"]
        assert_same_records(r["grid_sharded"], r["grid_whole"])


def test_distributed_grid_equals_local_grid(model_dir, tmp_path, home):
    proc, ranks, _ = worker("grid", model_dir, tmp_path, home)
    assert proc.returncode == 0 and ranks[0] and ranks[1], proc.stderr[-3000:]
    for name in ("strengths", "layers", "mix"):
        d0 = ranks[0]["grids"][name]["distributed"]
        assert_same_records(d0, ranks[0]["grids"][name]["local"])
        assert ranks[1]["grids"][name]["distributed"] == d0  # every rank gets every record
        assert [r["row"] for r in d0] == list(range(len(d0)))
        assert [r["text"] for r in d0] == [r["text"] for r in ranks[0]["grids"][name]["local"]]
    for (run0, total), (run1, _) in zip(ranks[0]["grids"]["rows_run"],
                                        ranks[1]["grids"]["rows_run"]):
        # each rank decoded its share (plus a baseline row it compares with), not all
        assert 0 < run0 < total and 0 < run1 < total and run0 + run1 >= total


def test_a_failing_rank_fails_every_rank(model_dir, tmp_path, home):
    proc, ranks, _ = worker("fail", model_dir, tmp_path, home)
    for r in ranks.values():
        assert "records" not in r  # nobody returned a partial grid
        assert r["error"]["type"] == "DistributedError"
        assert "rank 1 of 2 failed: RuntimeError: simulated failure" in r["error"]["message"]
    assert "rank 1 of 2 failed" in proc.stderr
    assert "exited with code 1" in proc.stderr  # mlx.launch's report of the ranks
    assert proc.stdout.strip() == ""


def test_a_silent_rank_ends_the_run_after_the_timeout(model_dir, tmp_path, home):
    proc, ranks, elapsed = worker("hang", model_dir, tmp_path, home)
    assert "no answer from every rank within 3 s" in proc.stderr
    assert proc.stdout.strip() == ""
    assert ranks[0] is None  # the watchdog ended rank 0 in the wait, before any result
    assert elapsed < 100  # rank 1 sleeps 120 s: the wait was bounded


def test_cli_under_mlx_launch(model_dir, home):
    args = ["--model", str(model_dir), "sweep", "--prompt", "hello", "--prompt", "bye",
            "--concept", "happy", "--strengths", "0.2,0.5", "--max-tokens", "6", "--json", "-q"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", MLX_STEER_HOME=str(home))
    alone = subprocess.run([sys.executable, "-m", "mlx_steer.cli", *args], capture_output=True,
                           text=True, env=env, cwd=ROOT, timeout=LAUNCH_TIMEOUT)
    assert alone.returncode == 0, alone.stderr[-2000:]
    single = json.loads(alone.stdout)
    split = launch(sys.executable, "-m", "mlx_steer.cli", *args, home=home)
    sharded = launch(sys.executable, "-m", "mlx_steer.cli", "--shard", *args, home=home)
    for proc in (split, sharded):
        assert "exited with code" not in proc.stderr, proc.stderr[-2000:]
        out = json.loads(proc.stdout)  # one JSON document: rank 1 printed nothing
        assert {k: v for k, v in out.items() if k != "rows"} == \
            {k: v for k, v in single.items() if k != "rows"}
        assert [r["text"] for r in out["rows"]] == [r["text"] for r in single["rows"]]
    assert_same_records(json.loads(split.stdout)["rows"], single["rows"])
    assert len(single["rows"]) == 6
