"""`generate`, `sweep` and `mix`: steered text next to the unsteered baseline."""

from __future__ import annotations

import argparse

from .. import experiments as X
from ..concept import validate_name
from . import args as A
from . import session as S
from .render import (METRIC_COLUMNS, Bar, emit, fmt, indented, metric_line, side_by_side,
                     table)


def add_parsers(command: A.Command) -> None:
    p = command("generate", "baseline and steered text side by side",
                "Generate from one prompt twice in one batch (same seed): unsteered and "
                "steered, printed side by side with their metrics.")
    p.add_argument("--prompt", required=True, help="the user message (chat template applied)")
    A.steering(p)
    p.add_argument("--op", choices=A.OPS, default="add",
                   help="add the vector (default); ablate its direction (strength ignored; "
                        "default layer: every block and the embedding output); or cap the "
                        "component along it at --strength")
    A.sampling(p, metrics_option=True)
    p.set_defaults(func=cmd_generate)

    p = command("sweep", "one concept over layers or strengths",
                "Sweep one concept over layers (each layer with its own vector, at one "
                "strength) or over strengths (at one layer; 0 is always included). Every "
                "variant plus the baseline is a row of one batched decode.")
    p.add_argument("--prompt", required=True, action="append",
                   help="the user message; repeat for several prompts (rows differ in prompt)")
    A.steering(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--layers", type=A.layers, metavar="LIST",
                      help="layers to sweep: 4,8,12, a range 0-28:4, or all")
    what.add_argument("--strengths", type=A.numbers, metavar="LIST",
                      help="strengths to sweep, e.g. 0.1,0.2,0.4 (relative unless --raw)")
    A.sampling(p, metrics_option=True)
    p.set_defaults(func=cmd_sweep)

    p = command("mix", "generate with a weighted mix of concepts (and save it)",
                "Mix concepts (each layer's vector normalised to unit norm first unless "
                "--raw-mix, weights as shares), generate with the mix next to the baseline "
                "and each part alone, and optionally save it to the model's library.")
    p.add_argument("--prompt", required=True, action="append", help="the user message")
    p.add_argument("--concepts", required=True, type=A.weights, metavar="LIST",
                   help="name:weight items, e.g. happy:0.7,excited:0.3")
    p.add_argument("--raw-mix", action="store_true",
                   help="weighted sum of the raw vectors (no normalisation)")
    p.add_argument("--layer", type=int, metavar="L",
                   help="layer (default: the heaviest part's recommended layer)")
    p.add_argument("--strength", type=A.number, metavar="S",
                   help="relative strength (default: the parts' weighted recommended "
                        "strength); with --raw, a raw multiplier of the mixed vector")
    p.add_argument("--raw", action="store_true", help="--strength is a raw multiplier")
    p.add_argument("--positions", type=A.positions, default="all", metavar="P",
                   help="tokens to steer: all, prompt, generated or an integer k")
    p.add_argument("--name", help="name of the mix (default: mix-happy70-excited30)")
    p.add_argument("--save", action="store_true", help="save the mix to the model's library")
    p.add_argument("--no-parts", action="store_true",
                   help="don't generate with each part alone")
    A.sampling(p)
    p.set_defaults(func=cmd_mix)


def _steer_header(r: dict) -> str:
    return f"{r['concept']} · layer {r['layer']} · strength {fmt(r['strength'])}"


def cmd_generate(args: argparse.Namespace) -> int:
    S.check_raw(args)
    lab = S.lab(args)
    concept = S.source(lab, args)
    with Bar(args, "generating", "token") as bar:
        rows = X.compare(lab, args.prompt, concept, args.layer, args.strength,
                         relative=not args.raw, positions=args.positions, op=args.op,
                         **S.run_options(args, bar))
    base, steered = rows[0], rows[1]
    obj = {"model": lab.name, "prompt": args.prompt, "concept": steered["concept"],
           "op": args.op, "layer": ("all" if args.op == "ablate" and args.layer is None
                                    else steered["layer"]),
           "strength": steered["strength"],
           "raw_strength": steered["raw_strength"], "positions": args.positions,
           "baseline": base["text"], "steered": steered["text"], "rows": rows}

    def text() -> str:
        return "\n".join([
            side_by_side(("baseline", base["text"]), (_steer_header(steered),
                                                      steered["text"])),
            "", "baseline  " + metric_line(base), "steered   " + metric_line(steered)])

    emit(args, obj, text)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    S.check_raw(args)
    lab = S.lab(args)
    concept = S.source(lab, args)
    with Bar(args, "sweep", "token") as bar:
        kw = S.run_options(args, bar)
        if args.layers is not None:
            layers = list(range(lab.num_layers)) if args.layers == "all" else args.layers
            S.check_layers(lab, *layers)
            rows = X.layer_analysis(lab, args.prompt, concept, layers, args.strength,
                                    relative=not args.raw, positions=args.positions, **kw)
            kind = "layers"
        else:
            rows = X.strength_explorer(lab, args.prompt, concept, args.strengths, args.layer,
                                       relative=not args.raw, positions=args.positions, **kw)
            kind = "strengths"
    obj = {"model": lab.name, "experiment": kind, "concept": concept.name, "rows": rows}

    def text() -> str:
        cols = [("layer", "layer"), ("strength", "strength"), ("raw_strength", "raw")]
        cols += [(k, h) for k, h in METRIC_COLUMNS]
        if len(args.prompt) > 1:
            cols.insert(0, ("row", "row"))
        out = [f"{concept.name}: sweep over {kind}", table(rows, cols), ""]
        for r in rows:
            who = "baseline" if r["is_baseline"] else \
                f"layer {r['layer']}, strength {fmt(r['strength'])}"
            pre = f"[{r['row']}] {who}" + (f" · {r['prompt']}" if len(args.prompt) > 1 else "")
            out += [pre, indented(r["text"])]
        return "\n".join(out)

    emit(args, obj, text)
    return 0


def cmd_mix(args: argparse.Namespace) -> int:
    S.check_raw(args)
    if args.name is not None:
        validate_name(args.name)
    lab = S.lab(args)
    parts = [(S.concept(lab, n, args), w) for n, w in args.concepts]
    with Bar(args, "mix", "token") as bar:
        mixed, rows = X.mix(lab, args.prompt, parts, normalize=not args.raw_mix,
                            layer=args.layer, strength=args.strength, relative=not args.raw,
                            positions=args.positions, name=args.name, save=args.save,
                            include_parts=not args.no_parts, **S.run_options(args, bar))
    mrow = next(r for r in rows if r["kind"] == "mix")
    saved = mrow.get("saved")
    obj = {"model": lab.name, "concept": mixed.name, "parts": [[n, w] for n, w in args.concepts],
           "normalize": not args.raw_mix, "layer": mrow["layer"], "strength": mrow["strength"],
           "raw_strength": mrow["raw_strength"], "saved": saved, "text": mrow["text"],
           "rows": rows}

    def text() -> str:
        out = [f"{mixed.name} = {mixed.description}  (layer {mrow['layer']}, strength "
               f"{fmt(mrow['strength'])}" + (", raw sum" if args.raw_mix else "") + ")"]
        for r in rows:
            who = {"baseline": "baseline", "mix": "mix"}.get(r["kind"], r["concept"])
            out += ["", f"{who}:  {metric_line(r)}", indented(r["text"])]
        if saved:
            out += ["", f"saved as {mixed.name!r} ({saved})"]
        return "\n".join(out)

    emit(args, obj, text)
    return 0
