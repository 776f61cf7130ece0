"""Benchmark: experiments as one batched decode vs one generation per variant.

1. A strength sweep of 8 variants (0 included) as 8 rows of one batched decode,
   against the same 8 requests generated one by one.
2. Compare (baseline + steered, 2 rows of one batch) against one generation.

Same prompt, same number of tokens, greedy; the batched rows are checked to be
the same text as the lone requests. Each timing is the median of --repeats runs,
interleaved, after a warm-up. Also reports what the metric pass (perplexity and
projection, teacher-forced) adds to the batched sweep.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        .venv/bin/python scripts/bench_experiments.py --max-tokens 48 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

STRENGTHS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: embedded SmolLM2)")
    ap.add_argument("--concept", default="happy")
    ap.add_argument("--prompt", default="Tell me about your weekend.")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import mlx_steer
    from mlx_steer import experiments as X

    lab = mlx_steer.load(args.model)
    c = lab.concept(args.concept)
    layer, n, p = c.layer, args.max_tokens, args.prompt
    steers = [c.steer(layer, s) for s in STRENGTHS]
    # min_tokens is not an option: measure rows that do not stop early, and report tokens.
    batch_rows = [(p, s) for s in steers]

    def sweep_batched():
        return lab.generate_batch_tokens(batch_rows, max_tokens=n)

    def sweep_alone():
        return [lab.generate(p, s, max_tokens=n) for s in steers]

    def sweep_with_metrics():
        return X.strength_explorer(lab, p, c, STRENGTHS, layer, max_tokens=n)

    def compare_batched():
        return lab.generate_batch_tokens([(p, None), (p, steers[4])], max_tokens=n)

    def one_generation():
        return lab.generate(p, steers[4], max_tokens=n)

    # Warm-up (and the equality check: batched rows are the lone requests' text).
    batched = sweep_batched()
    alone = sweep_alone()
    same = [r.text for r in batched] == alone
    tokens = [len(r.tokens) for r in batched]
    compare_batched(), one_generation(), sweep_with_metrics()

    times: dict[str, list[float]] = {k: [] for k in (
        "sweep_batched", "sweep_one_by_one", "sweep_with_metrics", "compare_batched",
        "one_generation")}
    for _ in range(args.repeats):
        times["sweep_batched"].append(timed(sweep_batched)[0])
        times["sweep_one_by_one"].append(timed(sweep_alone)[0])
        times["sweep_with_metrics"].append(timed(sweep_with_metrics)[0])
        times["compare_batched"].append(timed(compare_batched)[0])
        times["one_generation"].append(timed(one_generation)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": lab.name, "concept": c.name, "layer": layer, "strengths": list(STRENGTHS),
        "max_tokens": n, "tokens_per_row": tokens, "repeats": args.repeats,
        "batched_rows_equal_one_by_one": same,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "seconds": {k: round(v, 3) for k, v in med.items()},
        "sweep_speedup": med["sweep_one_by_one"] / med["sweep_batched"],
        "sweep_metrics_overhead": med["sweep_with_metrics"] / med["sweep_batched"],
        "compare_over_one_generation": med["compare_batched"] / med["one_generation"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        s = result["seconds"]
        print(f"{lab.name}, concept {c.name} @ layer {layer}, {n} max tokens "
              f"(rows generated {min(tokens)}–{max(tokens)} tokens), median of "
              f"{args.repeats}; batched rows == one by one: {same}")
        print(f"strength sweep, 8 variants: batched {s['sweep_batched']:.2f} s vs one by one "
              f"{s['sweep_one_by_one']:.2f} s -> {result['sweep_speedup']:.2f}x faster")
        print(f"  with metrics (ppl + projection + KL + text): {s['sweep_with_metrics']:.2f} s "
              f"= {result['sweep_metrics_overhead']:.2f}x the bare batched decode")
        print(f"compare, 2 rows: {s['compare_batched']:.2f} s vs one generation "
              f"{s['one_generation']:.2f} s -> {result['compare_over_one_generation']:.2f}x "
              "the time of a single generation")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
