"""Does each built-in concept steer the model at its defaults? An evaluation with intervals.

For every built-in concept (and every extraction method asked for), greedy
continuations of the evaluation prompts (`prompts.json`, set "evaluation"; none
is a calibration prompt) are generated in batched decodes, three rows per prompt:

- unsteered;
- steered: the concept at its default block and relative strength (calibrated);
- prompted: unsteered, the prompt followed by the concept's style instruction
  ("Answer in a happy, joyful tone."): the prompting baseline.

Each row is scored (`mlx_steer.experiments.run`):
- the concept's own metric: VADER compound (emotions, signed by the concept's
  direction), or the rate of its Empath emotion-lexicon words (the emotions for which
  `scripts/select_metrics.py` chose it), words per answer (brief / verbose, signed),
  marker-word rate (styles); VADER is shown for every concept;
- expression (every concept): mean log p(text | prompt + instruction) −
  mean log p(text | prompt) per token under the unsteered model, minus the same
  for the unsteered row of that prompt;
- coherence: perplexity of the text under the unsteered model given the plain
  prompt, and distinct-2 of its words.

Per concept: the mean paired change (row − unsteered, same prompt) with a
bootstrap 95% interval over prompts, the perplexity ratio (geometric means),
the distinct-2 ratio and the share of prompts moved the wrong way. The verdict
rule is printed under the table.

A control concept made of random vectors (norm-matched to "happy" at every
layer, calibrated with happy's instruction, judged by happy's metric) shows
what "not steering" looks like.

Usage: python scripts/eval_concepts.py [--methods mean,pca] [--prompts 24]
       [--max-tokens 32] [--concepts happy,sad] [--out docs/CONCEPTS_EVAL.md]
Writes the Markdown report (and --json records, if given) and prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import mlx_steer
from mlx_steer import experiments as E
from mlx_steer.calibrate import apply as apply_calibration
from mlx_steer.calibrate import calibrate
from mlx_steer.concept import Concept
from mlx_steer.catalogue import BUILTINS, builtin_spec
from mlx_steer.prompts import prompt_set

BOOTSTRAP = 2000
PPL_MAX = 2.0
DISTINCT_MIN = 0.8
CONTROL = "random"
CONTROL_BASIS = "happy"  # the control is norm-matched to, and judged like, this built-in
RULE = (f"**steers**: the concept's metric moved the right way with a bootstrap 95% interval "
        f"of the mean paired change (steered − unsteered, same prompt) above 0 — for style "
        f"concepts (marker words) the marker rate *or* the expression score — AND the "
        f"expression score's interval is above 0 too (the text reads more like the concept "
        f"to the model told to write in that way; without this a random direction can pass "
        f"on VADER alone, see the control), and the text stays coherent: perplexity ≤ "
        f"{PPL_MAX:g}× and distinct-2 ≥ {DISTINCT_MIN:g}× the unsteered rows'. **steers, but "
        f"degrades text**: it moved, coherence failed. **no clear effect**: an interval "
        f"includes no change (or the wrong way).")


def verdict(kind: str, s: dict) -> str:
    """The verdict of one summary by `RULE`."""
    expressed = s["expression"][1] > 0
    moved = expressed and (s["delta"][1] > 0 or kind == "markers")
    coherent = s["ppl_ratio"] <= PPL_MAX and s["distinct2_ratio"] >= DISTINCT_MIN
    return ("steers" if moved and coherent else
            "steers, but degrades text" if moved else "no clear effect")


# ---- methods: name → how to get the concept (add a row kind by adding an entry) ----------

def _builtin(lab, name: str) -> Concept:
    return lab.concept(name)


def _pca(lab, name: str) -> Concept:
    spec = builtin_spec(name)
    return lab.extract(name, spec["pairs"], method="pca", read="last",
                       chat=spec.get("template") == "chat", instruction=spec.get("instruction"),
                       category=spec.get("category", "builtin"))


def _mean_chat(lab, name: str) -> Concept:
    """The built-in's pairs read through the chat template (each text as a user turn,
    read at the assistant's first position) instead of as raw text."""
    spec = builtin_spec(name)
    return lab.extract(name, spec["pairs"], method="mean", read="last", chat=True,
                       instruction=spec.get("instruction"),
                       category=spec.get("category", "builtin"))


METHODS: dict[str, Callable] = {"mean": _builtin, "pca": _pca, "mean-chat": _mean_chat}


def random_control(lab) -> Concept:
    """Random directions norm-matched to "happy", calibrated like any concept."""
    happy = lab.concept(CONTROL_BASIS)
    rng = np.random.default_rng(0)
    v = rng.standard_normal(happy.vectors.shape).astype(np.float32)
    v *= (np.linalg.norm(happy.vectors, axis=1) / np.linalg.norm(v, axis=1))[:, None]
    c = Concept(name=CONTROL, vectors=v, norms=happy.norms, layer=happy.layer,
                strength=happy.strength, model_fingerprint=lab.fingerprint,
                model_name=lab.name, method="random", category="control",
                extra={"eval": builtin_spec(CONTROL_BASIS)["eval"],
                       "instruction": builtin_spec(CONTROL_BASIS)["instruction"]})
    return apply_calibration(c, calibrate(lab, c))


# ---- statistics -------------------------------------------------------------------------

def bootstrap_ci(diffs: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean of paired differences and its bootstrap 95% interval (percentile)."""
    d = np.asarray(diffs, np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (BOOTSTRAP, len(d)))].mean(axis=1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def metric_of(rule: dict, rec: dict) -> float:
    """The concept's own metric, signed so that higher = more of the concept."""
    return float(E.concept_score(rule, rec))


def _ppl_ratio(rows: list[dict], base: list[dict]) -> float:
    logs = [math.log(r["perplexity"]) if r.get("perplexity") else math.inf for r in rows]
    blogs = [math.log(b["perplexity"]) for b in base]
    return math.exp(np.mean(logs) - np.mean(blogs)) if all(map(math.isfinite, logs)) \
        else math.inf


def summarise(rule: dict, rows: list[dict], base: dict[str, dict]) -> dict:
    """One variant kind (steered or prompted) of one concept against the unsteered rows."""
    b = [base[r["prompt"]] for r in rows]
    # The unsteered row of a prompt is shared by every concept of a batch, and its own
    # marker list is theirs together: each row's `concept_score_baseline` scores that
    # text by the row's own rule, which is what a paired change needs.
    base_scores = [r["concept_score_baseline"] if r.get("concept_score_baseline") is not None
                   else metric_of(rule, x) for r, x in zip(rows, b)]
    diffs = np.array([metric_of(rule, r) - sb for r, sb in zip(rows, base_scores)])
    expr = np.array([(r["expression"] or 0.0) - (r["expression_baseline"] or 0.0)
                     for r in rows])
    out = {"n": len(rows),
           "metric": float(np.mean([metric_of(rule, r) for r in rows])),
           "metric_base": float(np.mean(base_scores)),
           "delta": bootstrap_ci(diffs), "expression": bootstrap_ci(expr, 1),
           "wrong_way": float(np.mean(diffs < 0)),
           "ppl_ratio": _ppl_ratio(rows, b),
           "distinct2_ratio": float(np.mean([r["distinct_2"] for r in rows])
                                    / max(np.mean([x["distinct_2"] for x in b]), 1e-9)),
           "sentiment": float(np.mean([r["sentiment"] for r in rows])),
           "vader": bootstrap_ci(float(rule.get("direction", 1)) * np.array(
               [r["sentiment"] - x["sentiment"] for r, x in zip(rows, b)]), 2)}
    out["verdict"] = verdict(rule["kind"], out)
    return out


def rescore(results: list[dict], sources: list[dict]) -> list[dict]:
    """`results` summarised again from saved records (`--from-json`): each (concept,
    method) from the first of `sources` (saved --json runs) that holds its rows, against
    that run's unsteered rows. Results without saved rows keep their summaries."""
    for res in results:
        for src in sources:
            mine = [r for r in src.get("records", []) if r.get("concept") == res["concept"]
                    and r.get("method") == res["method"] and not r.get("is_baseline")]
            if not mine:
                continue
            base = {r["prompt"]: r for r in src["records"] if r.get("is_baseline")}
            spec = builtin_spec(CONTROL_BASIS if res["concept"] == CONTROL else res["concept"])
            rule = spec["eval"]
            for kind, key in (("eval", "steered"), ("prompted", "prompted")):
                rows = [r for r in mine if r["kind"] == kind]
                if rows:
                    res[key] = summarise(rule, rows, base)
            break
    return results


# ---- the run ---------------------------------------------------------------------------

def evaluate_group(lab, group: list[tuple[int, Concept, bool]], prompts: list[str],
                   max_tokens: int) -> list[dict]:
    """Several concepts' steered (and prompted) rows in one batched run, sharing the
    unsteered rows. Each record carries `job`, the index of its (concept, method)."""
    rows = []
    for job, c, prompted in group:
        rows += [E.steered_variant(p, c, kind="eval") for p in prompts]
        if prompted:
            rows += [E.prompted_variant(p, c) for p in prompts]
        for v in rows[-len(prompts) * (2 if prompted else 1):]:
            v.extra["job"] = job
    bar = tqdm(total=1, desc="evaluating " + ", ".join(c.name for _, c, _ in group),
               unit="step", leave=False)

    def progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    try:
        return E.run(lab, rows, max_tokens=max_tokens, seed=0, expression=True,
                     progress=progress)
    finally:
        bar.close()


def _fmt_ci(t: tuple[float, float, float], digits: int = 3) -> str:
    return f"{t[0]:+.{digits}f} [{t[1]:+.{digits}f}, {t[2]:+.{digits}f}]"


def report(model: str, results: list[dict], args, seconds: float,
           merged: list[str] = ()) -> str:
    metric_names = {"sentiment": "VADER", "markers": "marker rate", "length": "words",
                    "lexicon": "lexicon rate"}
    cmd = "python scripts/eval_concepts.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in
        (("methods", args.methods), ("prompts", args.prompts), ("max_tokens", args.max_tokens))
    ) + (f" --model {args.model}" if args.model else "")
    for r in results:  # the current rule, also for results read back with --from-json
        for k in ("steered", "prompted"):
            if r.get(k):
                r[k]["verdict"] = verdict(r["kind"], r[k])
    n_steer = sum(r["steered"]["verdict"] == "steers" for r in results
                  if r["method"] == "mean" and r["concept"] != CONTROL)
    n_all = sum(r["method"] == "mean" and r["concept"] != CONTROL for r in results)
    lines = [
        f"# Built-in concepts on {model}",
        "",
        f"Command: `{cmd}`. Greedy decoding, {args.prompts} evaluation prompts (none is a "
        f"calibration prompt), at most {args.max_tokens} tokens. Each concept at its default "
        "block and relative strength α (chosen by calibration, see README), next to the "
        "unsteered model and to the prompting baseline (the prompt plus the concept's "
        "instruction, unsteered). Changes are means of paired differences over prompts "
        "(row − unsteered row of the same prompt) with bootstrap 95% intervals; the "
        "metric is signed so that + means more of the concept (VADER × direction, "
        "words × direction, marker rate, rate of the concept's emotion-lexicon words; "
        "which emotion gets VADER and which its lexicon was chosen on prompted text of "
        "non-evaluation prompts, `scripts/select_metrics.py`). ΔVADER: the VADER change × the "
        "concept's direction, shown for every concept. Expression: nats per token by which the "
        "unsteered model, told to write in the concept's way, finds the text more likely "
        "than the unsteered text.",
        "",
        f"**{n_steer} of {n_all}** built-ins steer at their defaults (method mean).",
        "",
        "| concept | method | block | α | calibration | metric | unsteered | Δ steered [95% CI] "
        "| Δ prompted [95% CI] | ΔVADER steered | expression steered | expression prompted | PPL × | "
        "distinct-2 × | wrong way | verdict | example (steered) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, p = r["steered"], r.get("prompted")
        example = r["example"].strip().replace("\n", " ").replace("|", "/")[:90]
        lines.append(
            f"| {r['concept']} | {r['method']} | {r['layer']} | {r['strength']:g} | "
            f"{'expresses' if r['calibration_steers'] else 'not steering'} | "
            f"{metric_names[r['kind']]} | {s['metric_base']:.3f} | {_fmt_ci(s['delta'])} | "
            f"{_fmt_ci(p['delta']) if p else '—'} | "
            f"{_fmt_ci(s['vader'], 2) if s.get('vader') else '—'} | "
            f"{_fmt_ci(s['expression'], 2)} | "
            f"{_fmt_ci(p['expression'], 2) if p else '—'} | {s['ppl_ratio']:.2f} | "
            f"{s['distinct2_ratio']:.2f} | {s['wrong_way']:.0%} | {s['verdict']} | {example} |")
    lines += ["", "Verdict rule: " + RULE, ""]
    by = {(r["concept"], r["method"]): r for r in results}
    if ("happy", "mean") in by and ("sad", "mean") in by:
        h, s = by[("happy", "mean")]["steered"], by[("sad", "mean")]["steered"]
        base = by[("happy", "mean")]["base_sentiment"]
        lines += [f"Happy vs sad (VADER, mean over prompts): happy {h['sentiment']:+.3f}, "
                  f"sad {s['sentiment']:+.3f}, unsteered {base:+.3f}; happy − sad = "
                  f"{h['sentiment'] - s['sentiment']:+.3f}; perplexity × {h['ppl_ratio']:.2f} "
                  f"(happy), {s['ppl_ratio']:.2f} (sad).", ""]
    if (CONTROL, "mean") in by:
        r = by[(CONTROL, "mean")]
        lines += [f"Control ({CONTROL}: random directions norm-matched to happy, calibrated "
                  f"with happy's instruction, judged by VADER): calibration reports it as "
                  f"{'expressing the concept' if r['calibration_steers'] else 'not steering'}; "
                  f"at its default its verdict is {r['steered']['verdict']}.", ""]
    fails = [r for r in results if r["method"] == "mean" and r["concept"] != CONTROL
             and r["steered"]["verdict"] != "steers"]
    if fails:
        lines += ["Not steering at defaults: " + ", ".join(
            f"{r['concept']} ({r['steered']['verdict']})" for r in fails) + ".", ""]
    if merged:
        lines += [f"Rows of {', '.join(merged)} come from an earlier run of the same command "
                  f"(`--merge`); the others were rerun after a change to their data.", ""]
    lines += [f"Total time {seconds:.0f} s (calibration included when not cached)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model to load (default: embedded SmolLM2)")
    ap.add_argument("--methods", default="mean",
                    help=f"comma-separated extraction methods, of {', '.join(METHODS)}")
    ap.add_argument("--concepts", default=",".join(BUILTINS) + "," + CONTROL,
                    help="comma-separated built-ins (and 'random', the control)")
    ap.add_argument("--prompts", type=int, default=24, help="evaluation prompts (≤ 24)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="docs/CONCEPTS_EVAL.md")
    ap.add_argument("--json", default=None, help="also write every record here")
    ap.add_argument("--merge", default=None, metavar="JSON",
                    help="keep the results of an earlier --json run for the concepts this run "
                         "does not evaluate (the report lists them)")
    ap.add_argument("--from-json", default=None, metavar="JSON",
                    help="only render the report from earlier --json runs (comma-separated; "
                         "each concept is summarised again from the first run holding its rows)")
    ap.add_argument("--group", type=int, default=6,
                    help="concepts per batched decode (they share the unsteered rows)")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    names = [n.strip() for n in args.concepts.split(",") if n.strip()]

    t0 = time.time()
    if args.from_json:
        sources = [json.loads(Path(f).read_text()) for f in args.from_json.split(",")]
        saved = sources[0]
        results = rescore(saved["results"], sources)
        merged = sorted({r["concept"] for r in results
                         if not any(x.get("concept") == r["concept"]
                                    for x in saved.get("records", []))})
        text = report(saved.get("model", "smollm2-135m"), results, args,
                      saved.get("seconds", float("nan")), merged=merged)
        Path(args.out).write_text(text)
        print(text)
        return 0
    lab = mlx_steer.load(args.model)
    prompts = prompt_set("evaluation", args.prompts)
    results, records = [], []
    jobs = [(n, m) for m in methods for n in names if not (n == CONTROL and m != methods[0])]
    concepts = [random_control(lab) if n == CONTROL else METHODS[m](lab, n)
                for n, m in tqdm(jobs, desc="concepts (calibration when not cached)",
                                 unit="concept")]
    recs: list[dict] = []
    for start in tqdm(range(0, len(jobs), args.group), desc="evaluation", unit="group"):
        group = [(j, concepts[j], jobs[j][1] == methods[0])
                 for j in range(start, min(start + args.group, len(jobs)))]
        recs += evaluate_group(lab, group, prompts, args.max_tokens)
    base = {r["prompt"]: r for r in recs if r["is_baseline"]}
    for j, ((name, method), c) in enumerate(zip(jobs, concepts)):
        rule = E.concept_eval(c)
        steered = [r for r in recs if r.get("job") == j and r["kind"] == "eval"]
        prompted = [r for r in recs if r.get("job") == j and r["kind"] == "prompted"]
        results.append({
            "concept": name, "method": method, "layer": c.layer, "strength": c.strength,
            "calibration_steers": bool(c.extra.get("steers")), "kind": rule["kind"],
            "steered": summarise(rule, steered, base),
            "prompted": summarise(rule, prompted, base) if prompted else None,
            "base_sentiment": float(np.mean([b["sentiment"] for b in base.values()])),
            "example": steered[0]["text"]})
    records = [{**r, "method": jobs[r["job"]][1] if r.get("job") is not None else None}
               for r in recs]
    kept = []
    if args.merge:
        done = {(r["concept"], r["method"]) for r in results}
        kept = [r for r in json.loads(Path(args.merge).read_text())["results"]
                if (r["concept"], r["method"]) not in done]
        order = {n: i for i, n in enumerate(list(BUILTINS) + [CONTROL])}
        results = sorted(results + kept, key=lambda r: (methods.index(r["method"])
                                                        if r["method"] in methods else 99,
                                                        order.get(r["concept"], 99)))
    seconds = time.time() - t0
    text = report(lab.name, results, args, seconds,
                  merged=sorted({r["concept"] for r in kept}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": lab.name, "seconds": seconds,
                                               "results": results, "records": records},
                                              indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
