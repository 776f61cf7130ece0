"""`eval` (concepts scored on several prompts) and `introspect` (injected thoughts)."""

from __future__ import annotations

import argparse
import textwrap

from .. import experiments as X
from .. import introspection as I
from ..catalogue import BUILTINS
from ..prompts import neutral_prompts
from . import args as A
from . import session as S
from .args import UsageError
from .render import Bar, emit, fmt, indented, table, width


def add_parsers(command: A.Command) -> None:
    p = command("introspect", "the injected-thought detection test (Lindsey 2025)",
                "Inject word concept vectors from the newline before 'Trial 1' on and ask "
                "the model whether it detects an injected thought; run control trials "
                "without injection and yes/no control questions with and without it; grade "
                "by documented rules. Reports detection rate, false-positive rate and "
                "yes-bias shift with trial counts. Small models are not expected to pass.")
    p.add_argument("--trials", type=A.count, default=20, metavar="N",
                   help="injected trials per strength (default 20)")
    p.add_argument("--control-trials", type=A.count, metavar="N",
                   help="trials without injection (default: --trials)")
    p.add_argument("--yes-bias", type=A.count, default=20, metavar="N",
                   help="control questions asked with and without injection (0-20, default "
                        "20)")
    p.add_argument("--layer", type=int, metavar="L",
                   help="injection layer (default: round(2/3 of the depth))")
    p.add_argument("--layer-fraction", type=A.number, default=2 / 3, metavar="F",
                   help="depth fraction used when --layer is not given (default 0.667)")
    p.add_argument("--strength", type=A.numbers, metavar="S",
                   help="strength(s), e.g. 0.2 or 0.1,0.2: relative unless --raw (default: "
                        "raw 2, the paper's)")
    p.add_argument("--raw", action="store_true",
                   help="--strength is a raw multiple of the word vector (paper: 1,2,4,8)")
    p.add_argument("--words", metavar="LIST",
                   help="comma-separated concept words (default: the paper's 50)")
    p.add_argument("--baseline-words", type=A.positive, metavar="N",
                   help="subtract the mean of the first N of the paper's 100 baseline words "
                        "(default: all; fewer is faster and noisier)")
    p.add_argument("--batch-size", type=A.positive, default=16, metavar="B",
                   help="rows per batched decode (default 16)")
    p.add_argument("--transcripts", action="store_true",
                   help="print every response (text mode; --json always includes them)")
    A.sampling(p, max_tokens=100, temperature=1.0)
    p.set_defaults(func=cmd_introspect)

    p = command("eval", "score concepts on several prompts against the baseline",
                "Steer each concept (recommended or given layer and strength) on several "
                "neutral prompts next to the baseline, all in one batch, and summarise the "
                "metrics as steered minus baseline.")
    p.add_argument("--concept", action="append", metavar="NAME",
                   help="a concept (repeat, or comma-separate; default happy); 'builtins' "
                        "for all 17")
    p.add_argument("--prompt", action="append", help="prompts (default: neutral prompts)")
    p.add_argument("--prompts", type=A.positive, default=4, metavar="N",
                   help="how many of the packaged neutral prompts (default 4)")
    p.add_argument("--layer", type=int, metavar="L", help="layer for every concept")
    p.add_argument("--strength", type=A.number, metavar="S",
                   help="relative strength for every concept (raw with --raw)")
    p.add_argument("--raw", action="store_true", help="--strength is a raw multiplier")
    p.add_argument("--prompted", action="store_true",
                   help="add each concept's prompting baseline (the prompt plus its style "
                        "instruction, unsteered) and the expression score of every row")
    A.sampling(p, max_tokens=40)
    p.set_defaults(func=cmd_eval)


def cmd_introspect(args: argparse.Namespace) -> int:
    S.check_raw(args)
    if not 0 < args.layer_fraction < 1:
        raise UsageError("--layer-fraction must be between 0 and 1")
    if args.yes_bias > len(I.protocol()["control_questions"]):
        raise UsageError(f"--yes-bias is at most {len(I.protocol()['control_questions'])}")
    words = [w.strip() for w in args.words.split(",") if w.strip()] if args.words else None
    if args.words is not None and not words:
        raise UsageError("--words is empty")
    lab = S.lab(args)
    S.check_layers(lab, args.layer)
    strengths = args.strength if args.strength is not None else list(I.DEFAULT_SCALES)
    relative = args.strength is not None and not args.raw
    with Bar(args, "introspection", "row") as bar:
        report = I.detection_test(lab, trials=args.trials, layer=args.layer,
                       layer_fraction=args.layer_fraction, strengths=strengths,
                       relative=relative, control_trials=args.control_trials,
                       yes_bias=args.yes_bias, max_tokens=args.max_tokens,
                       temperature=args.temperature, seed=args.seed,
                       batch_size=args.batch_size, words=words,
                       baseline_words=(I.protocol()["baseline_words"][:args.baseline_words]
                                       if args.baseline_words else None),
                       progress=bar)
    emit(args, report, lambda: _introspection_text(report, args.transcripts))
    return 0


def _introspection_text(r: dict, transcripts: bool) -> str:
    pct = lambda v: "–" if v is None else f"{v:.0%}"  # noqa: E731
    yb = r["yes_bias"]
    lines = [
        f"injected-thought detection · {r['model']} · layer {r['layer']}/{r['num_layers']} "
        f"· strengths {', '.join(fmt(s) for s in r['strengths'])} "
        f"({'relative' if r['relative'] else 'raw'}) · T={fmt(r['temperature'])}",
        f"detection rate       {r['detections']}/{r['trials']} = {pct(r['detection_rate'])}",
        f"false-positive rate  {r['false_positives']}/{r['control_trials']} = "
        f"{pct(r['false_positive_rate'])}",
        f"yes-bias shift       {pct(yb['injected_yes_rate'])} with injection vs "
        f"{pct(yb['control_yes_rate'])} without ({yb['questions']} questions)",
        f"affirmative {pct(r['affirmative_rate'])} · named {pct(r['named_rate'])} · "
        f"coherent {pct(r['coherence_rate'])} (injected trials)",
    ]
    for b in r["by_strength"]:
        lines.append(f"  strength {fmt(b['strength'])}: {b['detections']}/{b['trials']} "
                     f"detected, mean relative strength {fmt(b['mean_relative_strength'])}")
    lines += ["", textwrap.fill(r["verdict"], width())]
    if transcripts:
        for t in r["transcripts"]:
            tag = t["kind"] + (f" [{t['word']}]" if t.get("word") else "")
            verdict = t.get("reason") or ("yes" if t.get("says_yes") else "no")
            lines += ["", f"{tag} → {verdict}", indented(t["response"])]
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    S.check_raw(args)
    names: list[str] = []
    for item in args.concept or ["happy"]:
        for n in item.split(","):
            n = n.strip()
            if n == "builtins":
                names += list(BUILTINS)
            elif n:
                names.append(n)
    names = list(dict.fromkeys(names))
    prompts = args.prompt or neutral_prompts(args.prompts)
    lab = S.lab(args)
    S.check_layers(lab, args.layer)
    concepts = [S.concept(lab, n, args) for n in names]
    with Bar(args, "eval", "token") as bar:
        rows = X.evaluate(lab, concepts, prompts, args.layer, args.strength,
                          relative=not args.raw, prompted=args.prompted,
                          expression=args.prompted, **S.run_options(args, bar))
    summary = X.summarize(rows, by=("kind", "concept"))
    obj = {"model": lab.name, "prompts": prompts, "summary": summary, "rows": rows}

    def text() -> str:
        cols = [("concept", "concept"), ("n", "n"), ("concept_score_delta", "Δscore"),
                ("sentiment_delta", "Δsent"), ("marker_rate_delta", "Δmark"),
                ("perplexity", "ppl"), ("perplexity_delta", "Δppl"),
                ("repetition_rate", "rep"), ("kl_divergence", "KL")]
        if args.prompted:
            cols.insert(3, ("expression_delta", "Δexpr"))
        srows = [dict(s, concept="baseline" if s["kind"] == "baseline" else
                      f"{s['concept']} (prompted)" if s["kind"] == "prompted" else s["concept"])
                 for s in summary]
        return (f"{len(prompts)} prompts × {len(names)} concepts, {args.max_tokens} tokens, "
                "steered minus baseline\n" + table(srows, cols))

    emit(args, obj, text)
    return 0
