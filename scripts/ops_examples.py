"""One measured example of each operation (add, ablate, cap) and of baking, on the
embedded model: the numbers in docs/OPERATIONS.md.

- add: a concept at its recommended block and strength, on neutral prompts;
- ablate: the concept's direction removed at every block and the embedding output,
  on prompts that evoke the concept;
- cap: the component along the direction held at most at α × the median residual
  norm of the recommended block, on the same evoking prompts;
- bake: the ablation folded into the weights, opened by plain mlx-lm, logits compared
  with runtime ablation (positions=0, as weights act on every token).

Each row group is one batched greedy decode next to unsteered rows of the same
prompts, scored by `experiments.run` (concept score, projection on the direction at
the recommended block, perplexity under the unsteered model).

Usage: python scripts/ops_examples.py [--concept happy] [--max-tokens 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import mlx.core as mx
import numpy as np

import mlx_steer
from mlx_steer import experiments as ex
from mlx_steer.prompts import neutral_prompts

EVOKING = {
    "happy": ["Write a cheerful birthday message for my best friend.",
              "Describe the happiest day of your life.",
              "Tell me about a wonderful surprise party.",
              "Write a joyful poem about spring."],
    "pirate": ["Talk like a pirate and tell me about your ship.",
               "Write a pirate's greeting to his crew.",
               "Describe a treasure hunt on the high seas.",
               "What does a pirate captain say to a landlubber?"],
}


def summary(records, label):
    rows = [r for r in records if r["label"] == label]
    mean = lambda k: float(np.mean([r[k] for r in rows if r.get(k) is not None]))  # noqa: E731
    return {"label": label, "n": len(rows), "concept_score": mean("concept_score"),
            "projection": mean("projection"), "perplexity": mean("perplexity"),
            "example": rows[0]["text"].strip().replace("\n", " ")[:100]}


def group(lab, concept, prompts, variants_for, max_tokens):
    variants = [v for p in prompts for v in variants_for(p)]
    records = ex.run(lab, variants, max_tokens=max_tokens)
    base = [r for r in records if r["is_baseline"]]
    for r in base:
        r["label"] = "unsteered"
    labels = list(dict.fromkeys(r["label"] for r in records))
    return [summary(records, label) for label in labels]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concept", default="happy", choices=sorted(EVOKING))
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    lab = mlx_steer.load()
    c = lab.concept(args.concept)
    out = {"concept": c.name, "layer": c.layer, "alpha": c.strength,
           "max_tokens": args.max_tokens}

    out["add"] = group(lab, c, neutral_prompts(4), lambda p: [
        ex.steered_variant(p, c, label="add")], args.max_tokens)
    out["ablate"] = group(lab, c, EVOKING[c.name], lambda p: [
        ex.steered_variant(p, c, op="ablate", label="ablate (every block)")], args.max_tokens)
    out["cap"] = group(lab, c, EVOKING[c.name], lambda p: [
        ex.steered_variant(p, c, c.layer, a, op="cap", label=f"cap α={a:g}")
        for a in (0.0, 0.1)], args.max_tokens)

    import mlx_lm

    steer = c.ablate(positions=0)
    tokens = lab.encode(EVOKING[c.name][0], chat=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = lab.bake(steer, f"{tmp}/baked")
        seconds = time.perf_counter() - t0
        model, _ = mlx_lm.load(str(path))
        baked = np.array(model(mx.array(tokens)[None])[0].astype(mx.float32))
    runtime = lab.logits(tokens, steer)
    out["bake"] = {"seconds": round(seconds, 2),
                   "max_abs_logit_diff": float(np.abs(baked - runtime).max()),
                   "logit_scale": float(np.abs(runtime).max()),
                   "argmax_agree": float(np.mean(baked.argmax(-1) == runtime.argmax(-1))),
                   "tokens": len(tokens)}
    text = json.dumps(out, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
