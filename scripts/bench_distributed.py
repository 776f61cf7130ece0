"""Benchmark: an experiment grid on 1 rank vs split across N ranks (`mlx.launch`).

The grid is a strength sweep (strength 0 = the baseline row of each prompt) over
several neutral prompts, greedy, on the embedded model by default. Three
measurements per repeat, interleaved, each in fresh processes after a warm-up
grid in the same processes (model loaded, concept cached):

- `1 rank`: the whole grid as one batch in one process;
- `N ranks`: `mlx.launch -n N --backend ring` on this machine, rows split across
  the ranks, records gathered (timed from a barrier to the gathered records);
- `N ranks, k BLAS thread(s) each`: the same with OPENBLAS_NUM_THREADS = cores / N;
- `largest share alone`: the rows rank 0 decodes (its share plus the baseline rows
  it compares with) in one process: what each rank costs when it has a machine
  of its own, i.e. the grid time to expect on N Macs, gather aside (a few KB).

The texts of the N-rank run are checked against the 1-rank run.

    LD_PRELOAD=$(python -m mlx_steer.fastpath) python scripts/bench_distributed.py \\
        --prompts 4 --strengths 0.1,0.2,0.3,0.4 --max-tokens 24 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import machine

ROOT = Path(__file__).resolve().parent.parent


def worker(args) -> None:
    import mlx.core as mx

    import mlx_steer
    from mlx_steer import distributed
    from mlx_steer import experiments as X
    from mlx_steer.prompts import neutral_prompts

    group = distributed.world()
    lab = mlx_steer.load(args.model)
    concept = lab.concept(args.concept)
    prompts = neutral_prompts(args.prompts)
    strengths = [float(s) for s in args.strengths.split(",")]
    variants = X.with_baselines(X.strength_variants(prompts, concept, strengths))
    if args.alone_share:
        rank, size = (int(x) for x in args.alone_share.split("/"))
        variants = [variants[i] for i in X.rank_rows(variants, rank, size)[1]]
    kw = dict(max_tokens=args.max_tokens, baselines=False, group=group)
    X.run(lab, variants[:2], **dict(kw, max_tokens=2))  # warm-up
    if group is not None:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    t = time.perf_counter()
    records = X.run(lab, variants, **kw)
    seconds = time.perf_counter() - t
    if distributed.is_lead(group):
        print(json.dumps({"seconds": seconds, "rows": len(variants),
                          "ranks": distributed.size(group),
                          "texts": [r["text"] for r in records]}))


def run(cmd: list[str], timeout: float, env_extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")]))
    env.update(env_extra or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd[:6])} … printed no result:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: embedded SmolLM2)")
    ap.add_argument("--concept", default="happy")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--strengths", default="0.1,0.2,0.3,0.4")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=None, help="also write the results here (JSON)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--alone-share", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    me = [sys.executable, str(Path(__file__).resolve()), "--worker",
          "--concept", args.concept, "--prompts", str(args.prompts),
          "--strengths", args.strengths, "--max-tokens", str(args.max_tokens)]
    if args.model:
        me += ["--model", args.model]
    launch = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(args.ranks),
              "--backend", "ring", "-p", "35123"]
    # On one machine the ranks' BLAS thread pools compete for the same cores; the
    # last variant gives each rank an equal part of them.
    split = str(max(1, (os.cpu_count() or 1) // args.ranks))
    runs = {"1 rank": (me, {}), f"{args.ranks} ranks": ([*launch, *me], {}),
            f"{args.ranks} ranks, {split} BLAS thread(s) each": (
                [*launch, *me], {"OPENBLAS_NUM_THREADS": split}),
            "largest share alone": ([*me, "--alone-share", f"0/{args.ranks}"], {})}
    run(me, args.timeout)  # extracts and caches the concept once
    times: dict[str, list[float]] = {k: [] for k in runs}
    rows: dict[str, int] = {}
    texts = {}
    for _ in range(args.repeats):
        for name, (cmd, env) in runs.items():
            r = run(cmd, args.timeout, env)
            times[name].append(r["seconds"])
            rows[name] = r["rows"]
            texts[name] = r["texts"]
    same = all(texts["1 rank"] == texts[k] for k in runs if "ranks" in k)
    base = statistics.median(times["1 rank"])
    result = {"machine": machine(), "args": {k: v for k, v in vars(args).items()
                                             if k not in ("worker", "alone_share")},
              "rows": rows, "seconds": times, "texts_identical": same,
              "median_s": {k: statistics.median(v) for k, v in times.items()},
              "speedup_vs_1_rank": {k: base / statistics.median(v) for k, v in times.items()},
              "per_row_s_1_rank": base / rows["1 rank"]}
    print(f"grid: {rows['1 rank']} rows x {args.max_tokens} tokens, "
          f"{args.repeats} repeats, texts identical: {same}")
    for name in runs:
        m = result["median_s"][name]
        print(f"  {name:32s} {rows[name]:3d} rows  median {m:7.2f} s  "
              f"speed-up {base / m:5.2f}x  (runs: {', '.join(f'{t:.2f}' for t in times[name])})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
