"""Trained vs mean-difference (and pca) vectors of a few built-in concepts, measured.

For each concept the same pairs give a mean-difference, a pca and a trained vector
at the same block (the one the mean difference recommends); each gets its strength
by the same rule (`extract.calibrate_strength`: the largest grid strength whose
next-token KL from the unsteered model stays within 1 nat). All variants and the
unsteered baseline then generate on the same neutral prompts in one batched,
greedy decode, and are scored with the project's metrics
(`experiments.evaluate`): the concept's expression score (VADER for emotions,
marker rate for styles, words for length), perplexity of the text under the
unsteered model, repetition, first-token KL and the projection on the direction.

Usage: python scripts/compare_trained.py [--concepts happy,pirate,formal]
       [--prompts 6] [--max-tokens 40] [--out docs/TRAINED_EVAL.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

import mlx_steer
from mlx_steer import experiments
from mlx_steer.prompts import neutral_prompts
from mlx_steer.catalogue import builtin_spec

METHODS = ("mean", "pca", "trained")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concepts", default="happy,pirate,formal")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/TRAINED_EVAL.md")
    args = ap.parse_args(argv)

    lab = mlx_steer.load()
    names = [n.strip() for n in args.concepts.split(",") if n.strip()]
    prompts = neutral_prompts(args.prompts)
    concepts, seconds = [], {}
    for name in tqdm(names, desc="extracting", unit="concept"):
        spec = builtin_spec(name)
        chat = spec.get("template") == "chat"
        layer = None
        for method in METHODS:
            t0 = time.perf_counter()
            c = lab.extract(f"{name}-{method}", spec["pairs"], method=method, chat=chat,
                            layer=layer, seed=args.seed, progress=None)
            seconds[(name, method)] = time.perf_counter() - t0
            layer = c.layer  # the same block for every method
            c.extra.update({"eval": spec["eval"], "markers": spec.get("markers", [])})
            concepts.append(c)
    records = experiments.evaluate(lab, concepts, prompts, max_tokens=args.max_tokens,
                                   seed=args.seed)
    summary = {r["concept"]: r for r in experiments.summarize(records, by=("concept",))}

    lines = [
        f"# Trained vs mean-difference vectors on {lab.name}", "",
        f"Command: `python scripts/compare_trained.py --concepts {args.concepts} --prompts "
        f"{args.prompts} --max-tokens {args.max_tokens}`. Same pairs, same block, same "
        "strength rule (KL ≤ 1 nat at the first token), greedy, "
        f"{len(prompts)} neutral chat prompts, one batched decode. `score`: the concept's "
        "expression score (VADER compound for emotions, marker-word rate for styles), "
        "Δ against the unsteered rows of the same prompts. Seconds: extraction on this CPU "
        "(capture + training + calibration).", "",
        "| concept | method | layer | α_rel | score | Δ score | perplexity | repetition | "
        "KL first token | train steps | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for c in concepts:
        name, method = c.name.rsplit("-", 1)
        s = summary[c.name]
        steps = c.extra.get("trained", {}).get("steps", "")
        row = {"concept": name, "method": method, "layer": c.layer, "alpha_rel": c.strength,
               "score": s.get("concept_score"), "score_delta": s.get("concept_score_delta"),
               "perplexity": s.get("perplexity"), "repetition": s.get("repetition_rate"),
               "kl": s.get("kl_divergence"), "steps": steps,
               "seconds": round(seconds[(name, method)], 1)}
        rows.append(row)
        f = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(f"| {name} | {method} | {c.layer} | {c.strength:.2f} | {f(row['score'])} | "
                     f"{f(row['score_delta'])} | {f(row['perplexity'])} | "
                     f"{f(row['repetition'])} | {f(row['kl'])} | {steps} | {row['seconds']} |")
    base = [r for r in records if r.get("is_baseline")]
    lines += ["", f"Unsteered rows: {len(base)}; mean perplexity "
              f"{sum(r['perplexity'] for r in base) / max(len(base), 1):.2f}.", ""]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
