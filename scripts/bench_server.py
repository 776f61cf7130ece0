"""Benchmark of `mlx-steer serve` (continuous batching) against the same requests sent
one after another, and against mlx-lm's own server (`mlx_lm.server`) unsteered.

For each server configuration the script starts the server as a child process on a
free loopback port, warms it up (one request per distinct request, so concepts are
extracted and caches allocated before timing), then for each N in --clients sends N
different requests:

  concurrent  N client threads at once; aggregate tokens/s = completion tokens of all
              N answers (from each response's `usage`) / wall time from the first send
              to the last answer; latency = each request's send-to-answer time.
  sequential  the same N requests one after another; tokens/s = tokens / total time.

Configurations (all greedy, --max-tokens tokens, non-streaming):

  mlx-steer steered    every request steered: happy / pirate alternately, at their
                       recommended layers and strengths, the odd ones at other layers
  mlx-steer unsteered  the same prompts with no steering
  mlx-lm unsteered     mlx_lm.server on the same weights, written as an MLX model
                       folder (float32, as mlx-steer decodes on the CPU) in a temporary
                       directory, with the same BLAS preload (`python -m
                       mlx_steer.fastpath`) as mlx-steer's server gets

Answers may end early at the end-of-sequence token; tokens are counted, not assumed.
This is a benchmark, not a test: run it on an otherwise idle machine.

    python scripts/bench_server.py --clients 1,2,4,8 --max-tokens 32 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe a walk through a busy market in the morning.",
    "Tell me about your favorite season and why.",
    "Explain how a bicycle works to a child.",
    "Describe the view from a mountain top.",
    "Tell me a story about a cat who wants to fly.",
    "What is a good way to spend a rainy afternoon?",
    "Describe a city at night.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def preload() -> str:
    out = subprocess.run([sys.executable, "-m", "mlx_steer.fastpath"], capture_output=True,
                         text=True)
    return out.stdout.strip()


def write_mlx_folder(folder: Path) -> None:
    """The embedded model's weights as an MLX model folder mlx_lm.server can load."""
    from mlx_lm.utils import save_config, save_model

    import mlx_steer

    lab = mlx_steer.load()
    save_model(folder, lab.model, donate_model=False)
    save_config(asdict(lab.model.args), folder / "config.json")
    lab.tokenizer.save_pretrained(str(folder))


def requests_for(kind: str, n: int, max_tokens: int) -> list[dict]:
    out = []
    for i in range(n):
        body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0.0, "model": "default_model"}
        if kind == "steered":
            item = {"concept": ("happy", "pirate")[i % 2]}
            if i % 4 >= 2:
                item.update(layer=8 + i, strength=0.3)
            body["steering"] = [item]
        out.append(body)
    return out


def run_one(url: str, body: dict) -> tuple[float, int]:
    t = time.perf_counter()
    r = post(url, body)
    return time.perf_counter() - t, int(r["usage"]["completion_tokens"])


def concurrent(url: str, bodies: list[dict]) -> dict:
    results: list = [None] * len(bodies)

    def work(i):
        results[i] = run_one(url, bodies[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(bodies))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    return summary(results, wall)


def sequential(url: str, bodies: list[dict]) -> dict:
    t = time.perf_counter()
    results = [run_one(url, b) for b in bodies]
    return summary(results, time.perf_counter() - t)


def summary(results: list[tuple[float, int]], wall: float) -> dict:
    lat = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {"wall_s": round(wall, 3), "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2),
            "latency_mean_s": round(statistics.mean(lat), 3),
            "latency_max_s": round(max(lat), 3)}


def measure(name: str, cmd: list[str], env: dict, kind: str, clients: list[int],
            max_tokens: int, log) -> dict:
    port = free_port()
    cmd = [*cmd, "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    print(f"[{name}] starting: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    out = {}
    try:
        wait_ready(base, proc)
        url = base + "/v1/chat/completions"
        for body in requests_for(kind, max(clients), max_tokens):  # warm-up
            post(url, body)
        for n in clients:
            bodies = requests_for(kind, n, max_tokens)
            c = concurrent(url, bodies)
            s = sequential(url, bodies)
            out[n] = {"concurrent": c, "sequential": s,
                      "speedup": round(c["tokens_per_s"] / s["tokens_per_s"], 2)}
            print(f"[{name}] N={n}: concurrent {c['tokens_per_s']} tok/s, latency "
                  f"{c['latency_mean_s']} s; sequential {s['tokens_per_s']} tok/s, latency "
                  f"{s['latency_mean_s']} s", file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def table(results: dict, clients: list[int]) -> str:
    rows = ["| server | N | concurrent tok/s | mean latency (s) | sequential tok/s | "
            "mean latency (s) | concurrent / sequential |",
            "|---|---|---|---|---|---|---|"]
    for name, by_n in results.items():
        for n in clients:
            r = by_n[n]
            c, s = r["concurrent"], r["sequential"]
            rows.append(f"| {name} | {n} | {c['tokens_per_s']} | {c['latency_mean_s']} | "
                        f"{s['tokens_per_s']} | {s['latency_mean_s']} | {r['speedup']} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,2,4,8", help="N values (default 1,2,4,8)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--skip-mlx-lm", action="store_true", help="don't run mlx_lm.server")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    clients = [int(x) for x in args.clients.split(",")]
    env = dict(os.environ)
    pre = preload()
    if pre:
        env["LD_PRELOAD"] = pre
    env["MLX_STEER_REEXEC"] = "1"  # LD_PRELOAD is already set as the CLI would set it
    serve = [sys.executable, "-m", "mlx_steer.cli", "serve", "--quiet",
             "--max-rows", str(max(clients))]
    results = {}
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "servers.log", "w") as log:
        results["mlx-steer steered"] = measure("mlx-steer steered", serve, env, "steered",
                                               clients, args.max_tokens, log)
        results["mlx-steer unsteered"] = measure("mlx-steer unsteered", serve, env, "plain",
                                                 clients, args.max_tokens, log)
        if not args.skip_mlx_lm:
            folder = Path(tmp) / "smollm2-mlx"
            folder.mkdir()
            write_mlx_folder(folder)
            cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(folder),
                   "--log-level", "WARNING"]
            results["mlx-lm unsteered"] = measure("mlx-lm unsteered", cmd, env, "plain",
                                                  clients, args.max_tokens, log)
    report = {"machine": machine(), "max_tokens": args.max_tokens, "clients": clients,
              "preload": bool(pre), "results": results}
    print(table(results, clients))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
