"""Does each built-in concept steer the model? A table of measured effects.

For every built-in concept, greedy continuations of neutral prompts are generated
with and without the concept at its recommended layer and strength (all rows in
batched decodes), then scored:
- emotion concepts: mean VADER compound, steered vs unsteered;
- style concepts: marker-word rate (the concept's own marker list);
- brief / verbose: words per answer;
- every concept: perplexity of the steered text under the unsteered model, the
  3-gram repetition rate, and the vector's logit lens (tokens it promotes).

Usage: python scripts/eval_concepts.py [--model NAME] [--prompts 8] [--max-tokens 40]
Writes docs/CONCEPTS_EVAL.md (or --out) and prints the same table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import mlx_steer
from mlx_steer import lens, metrics
from mlx_steer.extract import neutral_prompts
from mlx_steer.library import builtin_spec


def perplexity_under_base(lab, prompt: str, tokens: list[int]) -> float:
    if not tokens:
        return float("nan")
    ids = lab.encode(prompt, chat=True)
    logits = lab.trace(ids + tokens).logits
    return metrics.perplexity(logits[len(ids) - 1:-1], np.array(tokens))


def score(kind: dict, spec: dict, texts: list[str]) -> float:
    if kind["kind"] == "sentiment":
        return float(np.mean([metrics.sentiment(t) for t in texts]))
    if kind["kind"] == "markers":
        return float(np.mean([metrics.marker_rate(t, spec["markers"]) for t in texts]))
    return float(np.mean([len(metrics.words(t)) for t in texts]))


def verdict(kind: dict, base: float, steered: float, ppl_ratio: float, rep: float) -> str:
    d = kind.get("direction", 1)
    if kind["kind"] == "sentiment":
        moved = (steered - base) * d > 0.1
    elif kind["kind"] == "markers":
        moved = steered > base + 0.01
    else:
        moved = (steered / max(base, 1e-9) - 1) * d > 0.2
    if not moved:
        return "no clear effect"
    if ppl_ratio > 3 or rep > 0.5:
        return "steers, but degrades text"
    return "steers"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model to load (default: embedded SmolLM2)")
    ap.add_argument("--prompts", type=int, default=8, help="neutral prompts per concept")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--out", default="docs/CONCEPTS_EVAL.md")
    args = ap.parse_args(argv)

    t0 = time.time()
    lab = mlx_steer.load(args.model)
    concepts = lab.ensure_builtins()
    prompts = neutral_prompts(args.prompts)
    rows = [(p, None) for p in prompts] + [(p, c.steer()) for c in concepts for p in prompts]
    results = []
    bar = tqdm(total=len(rows), desc="generating", unit="row")
    for i in range(0, len(rows), 48):
        results += lab.generate_batch_tokens(rows[i:i + 48], max_tokens=args.max_tokens)
        bar.update(len(rows[i:i + 48]))
    bar.close()
    base = results[: len(prompts)]
    base_ppl = np.nanmean([perplexity_under_base(lab, p, r.tokens) for p, r in zip(prompts, base)])

    lines = [
        f"# Built-in concepts on {lab.name}",
        "",
        f"Command: `python scripts/eval_concepts.py --prompts {args.prompts} --max-tokens "
        f"{args.max_tokens}`{'' if args.model is None else f' --model {args.model}'}. "
        f"Greedy decoding, {len(prompts)} neutral chat prompts, each concept at its "
        "recommended layer and relative strength (α_rel: fraction of the residual norm).",
        f"Unsteered perplexity of its own text: {base_ppl:.1f}.",
        "",
        "| concept | layer | α_rel | metric | unsteered | steered | PPL (steered, under "
        "unsteered model) | repetition | verdict | logit lens at 0.85·L (promotes) | example |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, c in enumerate(tqdm(concepts, desc="scoring", unit="concept")):
        spec = builtin_spec(c.name)
        mine = results[len(prompts) * (k + 1): len(prompts) * (k + 2)]
        kind = spec["eval"]
        b = score(kind, spec, [r.text for r in base])
        s = score(kind, spec, [r.text for r in mine])
        ppl = float(np.nanmean([perplexity_under_base(lab, p, r.tokens)
                                for p, r in zip(prompts, mine)]))
        rep = float(np.mean([metrics.repetition_rate(r.text) for r in mine]))
        # The logit lens reads late layers best (earlier ones decode to junk).
        lens_layer = max(c.layer, round(0.85 * (lab.num_layers - 1)))
        top = [r["token"].strip() for r in lens.vector_lens(lab, c.vectors[lens_layer], k=6)
               if r["direction"] == "promotes"][:6]
        metric = {"sentiment": "VADER", "markers": "marker rate", "length": "words"}[kind["kind"]]
        example = mine[0].text.strip().replace("\n", " ").replace("|", "/")[:90]
        lines.append(
            f"| {c.name} | {c.layer} | {c.strength:.2f} | {metric} | {b:.3f} | {s:.3f} | "
            f"{ppl:.1f} | {rep:.2f} | {verdict(kind, b, s, ppl / base_ppl, rep)} | "
            f"{', '.join(t.replace('|', '/') for t in top)} | {example} |")
    lines += ["", f"Total time {time.time() - t0:.0f} s (extraction included when not cached)."]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
