"""A concept's default block and strength, chosen from the text it makes the model write.

Rule (documented; `CALIBRATION_VERSION` changes whenever it does, which
invalidates cached built-ins):

1. Greedy continuations of the calibration prompts (`prompts.json`, set
   "calibration", never used for evaluation) are generated for every
   (block, α_rel) candidate of a small grid plus one unsteered row per prompt,
   all as ONE batched decode (`experiments.run`).
2. Every row is scored under the unsteered model:
   - **expression**: how much more likely its text becomes when the prompt
     carries the concept's style instruction ("Answer in a happy tone."):
     mean log p(text | prompt + instruction) − mean log p(text | prompt), per
     token, minus the same for the unsteered row of that prompt. Works for any
     concept with a name; no judge model;
   - **coherence**: perplexity of the text given the plain prompt, and
     distinct-2 of its words, each against the unsteered rows.
3. A candidate is *coherent* when its perplexity is ≤ `PPL_LIMIT` × and its
   distinct-2 ≥ `DISTINCT_LIMIT` × the unsteered rows', and *expresses* the
   concept when its mean expression gain is ≥ `EXPRESSION_MIN` nats per token
   AND the unsteered model's activations on its text move along the concept
   direction at that block by ≥ `PROJECTION_MIN` of the residual norm (mean
   over generated tokens, against the unsteered rows' text). Two signals, one
   from the text's likelihood and one from the model's activations: a random
   direction, whose text changes only by chance, rarely passes both.
   The default is, among the coherent candidates that express the concept,
   the one whose text moves the activations furthest along the concept
   direction (ties: the weaker α). Version 3; versions 1–2 took the largest
   expression gain, which on 3 short texts ranked a weaker candidate first
   where the stronger one steered clearly (docs/CONCEPTS_EVAL.md). When none
   does, the concept is reported as not steering (`steers=False`); its
   default is then its most expressive coherent candidate, or the weakest α
   at the middle block if none is coherent.

The whole grid is kept on the concept (`concept.extra["calibration"]`) for
charts and the library page.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import experiments
from .activations import Progress
from .concept import Concept
from .errors import InvalidArgumentError
from .prompts import prompt_set

if TYPE_CHECKING:
    from .lab import Lab

CALIBRATION_VERSION = 3
BLOCK_FRACTIONS = (0.4, 0.5, 0.6)
ALPHAS = (0.1, 0.2, 0.3)
N_PROMPTS = 3
MAX_TOKENS = 20
PPL_LIMIT = 1.5
DISTINCT_LIMIT = 0.85
EXPRESSION_MIN = 0.1
PROJECTION_MIN = 0.005


@dataclass
class Calibration:
    """What calibration chose, and every candidate it measured."""

    layer: int
    strength: float
    steers: bool
    grid: list[dict] = field(default_factory=list)
    baseline: dict = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    instruction: str = ""
    max_tokens: int = MAX_TOKENS
    version: int = CALIBRATION_VERSION

    def to_dict(self) -> dict:
        return asdict(self)


def candidate_blocks(num_layers: int, fractions: Sequence[float] = BLOCK_FRACTIONS) -> list[int]:
    """Blocks at the given fractions of the depth (distinct, in range)."""
    blocks = sorted({min(num_layers - 1, max(0, int(round(f * num_layers))))
                     for f in fractions})
    if not blocks:
        raise InvalidArgumentError("give at least one block fraction")
    return blocks


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def _summary(rows: Sequence[dict], base: dict[str, dict], norm: float) -> dict:
    """Mean scores of one candidate's rows against the unsteered rows of their prompts
    (projection: change of the text's mean projection, as a fraction of `norm`)."""
    nll = [math.log(r["perplexity"]) if r.get("perplexity") else math.inf for r in rows]
    base_nll = [math.log(base[r["prompt"]]["perplexity"]) for r in rows]
    d2 = [r["distinct_2"] for r in rows]
    base_d2 = [base[r["prompt"]]["distinct_2"] for r in rows]
    gain = [(r["expression"] - r["expression_baseline"])
            if r.get("expression") is not None and r.get("expression_baseline") is not None
            else 0.0 for r in rows]
    proj = [(r["text_projection"] - r["projection_baseline"]) / norm
            if r.get("text_projection") is not None and r.get("projection_baseline") is not None
            else 0.0 for r in rows]
    ppl_ratio = math.exp(_mean(nll) - _mean(base_nll)) if all(map(math.isfinite, nll)) \
        else math.inf
    d2_ratio = _mean(d2) / max(_mean(base_d2), 1e-9)
    return {"expression": round(_mean(gain), 4),
            "projection": round(_mean(proj), 4),
            "ppl_ratio": round(ppl_ratio, 4) if math.isfinite(ppl_ratio) else None,
            "distinct2_ratio": round(d2_ratio, 4),
            "coherent": bool(ppl_ratio <= PPL_LIMIT and d2_ratio >= DISTINCT_LIMIT)}


def choose(grid: Sequence[dict], middle: int, weakest: float) -> tuple[int, float, bool]:
    """(layer, α, steers) from scored candidates, by the rule in the module notes."""
    coherent = [g for g in grid if g["coherent"]]
    if not coherent:
        return middle, weakest, False
    expressive = [g for g in coherent if expresses(g)]
    if expressive:
        best = max(expressive, key=lambda g: (g["projection"], -g["strength"]))
        return best["layer"], best["strength"], True
    best = max(coherent, key=lambda g: (g["expression"], -g["strength"]))
    return best["layer"], best["strength"], False


def expresses(g: dict) -> bool:
    """A candidate expresses the concept: its text is more likely under the instruction
    AND the unsteered model's activations on it move along the concept direction."""
    return g["expression"] >= EXPRESSION_MIN and g["projection"] >= PROJECTION_MIN


def calibrate(lab: "Lab", concept: Concept, prompts: Sequence[str] | None = None,
              blocks: Sequence[int] | None = None, alphas: Sequence[float] = ALPHAS,
              max_tokens: int = MAX_TOKENS, instruction: str | None = None,
              progress: Progress | None = None) -> Calibration:
    """Score a (block × α) grid on the calibration prompts and pick the default.

    One batched decode of len(prompts) × (len(blocks) × len(alphas) + 1) rows,
    then batched teacher-forced scoring. Deterministic (greedy).
    """
    prompts = list(prompts) if prompts is not None else prompt_set("calibration", N_PROMPTS)
    blocks = list(blocks) if blocks is not None else candidate_blocks(concept.num_layers)
    alphas = sorted(float(a) for a in alphas)
    if not prompts or not blocks or not alphas or any(a <= 0 for a in alphas):
        raise InvalidArgumentError("calibration needs prompts, blocks and positive strengths")
    instruction = experiments.concept_instruction(concept) if instruction is None \
        else instruction
    if instruction:
        concept.extra.setdefault("instruction", instruction)
    rows = [experiments.Variant(p, kind="baseline", concept=concept, label="baseline")
            for p in prompts]
    rows += [experiments.steered_variant(p, concept, layer, a, kind="calibration")
             for layer in blocks for a in alphas for p in prompts]
    bar = None
    if progress is None:
        from tqdm.auto import tqdm

        bar = tqdm(total=1, desc=f"calibrating {concept.name}", unit="step", leave=False)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
    try:
        recs = experiments.run(lab, rows, max_tokens=max_tokens, seed=0, expression=True,
                               baselines=False, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    base = {r["prompt"]: r for r in recs if r["kind"] == "baseline"}
    if any(not b.get("perplexity") for b in base.values()):
        raise InvalidArgumentError("an unsteered calibration row is empty: use other prompts")
    grid = []
    for layer in blocks:
        for a in alphas:
            mine = [r for r in recs if r["kind"] == "calibration" and r["layer"] == layer
                    and math.isclose(r["strength"], a)]
            grid.append({"layer": layer, "strength": a,
                         **_summary(mine, base, float(concept.norms[layer]))})
    middle = blocks[len(blocks) // 2]
    layer, strength, steers = choose(grid, middle, alphas[0])
    baseline = {"perplexity": round(_mean([b["perplexity"] for b in base.values()]), 4),
                "distinct_2": round(_mean([b["distinct_2"] for b in base.values()]), 4),
                "expression": round(_mean([b["expression"] or 0.0 for b in base.values()]), 4)}
    return Calibration(layer, strength, steers, grid, baseline, prompts, instruction or "",
                       max_tokens)


def apply(concept: Concept, cal: Calibration) -> Concept:
    """Set the concept's defaults from a calibration and record it in `extra`."""
    concept.layer, concept.strength = int(cal.layer), float(cal.strength)
    concept.extra["calibration"] = cal.to_dict()
    concept.extra["steers"] = bool(cal.steers)
    if cal.instruction:
        concept.extra["instruction"] = cal.instruction
    return concept
