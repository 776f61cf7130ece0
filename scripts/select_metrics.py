"""Which metric measures each emotion concept? Chosen on prompted text, never on steered text.

Rule (fixed before any steered evaluation with lexicon metrics was run):
for every emotion built-in with candidate lexicon categories (its spec's
``lexicon``), greedy continuations of the *selection prompts* (the calibration
set plus the neutral set; none is an evaluation prompt) are generated twice,
unsteered and prompted with the concept's instruction ("Answer in an angry,
furious tone."). Each candidate metric is scored on both, and its paired
standardized effect d = mean(prompted − unsteered) / sd(prompted − unsteered)
over prompts is computed:

- VADER compound × the concept's direction (the metric of every emotion before);
- the rate of words in the concept's Empath lexicon categories.

The lexicon metric is chosen when its d is larger than VADER's. Valence
concepts (happy, sad, pessimistic) keep VADER whatever the table says: their
acceptance test (happy − sad) is on VADER. Steering plays no part in the choice.

Usage: python scripts/select_metrics.py [--max-tokens 32] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import mlx_steer
from mlx_steer import experiments as E
from mlx_steer import metrics as M
from mlx_steer.concept import Concept
from mlx_steer.catalogue import BUILTINS, builtin_spec
from mlx_steer.prompts import prompt_set

VALENCE = ("happy", "sad", "pessimistic")


def effect(diffs: np.ndarray) -> float:
    """Paired standardized effect (Cohen's d_z); 0 when nothing moved."""
    sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0
    return float(np.mean(diffs)) / sd if sd > 0 else 0.0


def _stand_in(lab, name: str) -> Concept:
    """A concept that only carries its name and instruction (prompted rows steer nothing)."""
    n, d = lab.num_layers, lab.hidden_size
    return Concept(name=name, vectors=np.zeros((n, d), np.float32), norms=np.ones(n, np.float32),
                   layer=0, strength=0.0, model_fingerprint=lab.fingerprint, model_name=lab.name,
                   extra={"instruction": builtin_spec(name)["instruction"]})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args(argv)
    names = [n for n in BUILTINS if builtin_spec(n).get("lexicon")]
    lab = mlx_steer.load()
    prompts = prompt_set("calibration") + prompt_set("neutral")
    rows = [E.prompted_variant(p, _stand_in(lab, n)) for n in names for p in prompts]
    recs = E.run(lab, rows, max_tokens=args.max_tokens, seed=0, score=False)
    base = {r["prompt"]: r["text"] for r in recs if r["is_baseline"]}
    lines = [f"Selection prompts: {len(prompts)} (calibration + neutral sets), "
             f"{args.max_tokens} tokens, prompted − unsteered, paired d = mean / sd.", "",
             "| concept | lexicon categories | VADER d | lexicon d | chosen |",
             "|---|---|---|---|---|"]
    for n in names:
        spec = builtin_spec(n)
        direction, cats = float(spec["eval"].get("direction", 1)), spec["lexicon"]
        mine = [r for r in recs if r["kind"] == "prompted" and r["concept"] == n]
        vader = np.array([direction * (M.sentiment(r["text"]) - M.sentiment(base[r["prompt"]]))
                          for r in mine])
        lex = np.array([M.lexicon_rate(r["text"], cats) - M.lexicon_rate(base[r["prompt"]], cats)
                        for r in mine])
        dv, dl = effect(vader), effect(lex)
        chosen = "VADER (valence)" if n in VALENCE else ("lexicon" if dl > dv else "VADER")
        lines.append(f"| {n} | {', '.join(cats)} | {dv:+.2f} | {dl:+.2f} | {chosen} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
