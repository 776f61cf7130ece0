"""`extract` (a concept from a pairs file), `bake` (steering folded into weights) and
`serve` (the OpenAI-compatible server)."""

from __future__ import annotations

import argparse
import json

from .. import pairs as P
from ..bake import NOTE
from ..concept import validate_name
from ..errors import InvalidArgumentError
from ..extract import METHODS
from ..server import serve
from . import args as A
from . import session as S
from .args import UsageError
from .render import Bar, emit, fmt


def add_parsers(command: A.Command) -> None:
    p = command("extract", "make a concept from contrast pairs in a file",
                "Extract a concept from (positive, negative) text pairs: a vector for "
                "every layer, a recommended layer and strength; saved to the model's "
                "library. The file is JSON ([[pos, neg], ...], [{\"positive\": ..., "
                "\"negative\": ...}], or {\"pairs\": ...} like the built-in specs), JSON "
                "lines, CSV/TSV, or lines 'positive<TAB>negative' or 'positive | negative'.")
    p.add_argument("--name", required=True, help="concept name (letters, digits, _ or -)")
    p.add_argument("--pairs", required=True, metavar="FILE", help="the pairs file")
    p.add_argument("--method", choices=METHODS, default="mean",
                   help="mean of differences (default), first principal component, the "
                        "first pair only, or a vector trained at one layer with a "
                        "bi-directional preference objective (slower; see --layer, --seed)")
    p.add_argument("--layer", type=int, metavar="L",
                   help="the block to recommend (and, with --method trained, to train at); "
                        "default: the block where the pairs separate best")
    p.add_argument("--seed", type=int, default=0, metavar="K",
                   help="seed of the trained method's minibatches (default 0)")
    p.add_argument("--read", choices=("last", "mean"), default="last",
                   help="read the last token (default) or the mean over tokens")
    p.add_argument("--chat", action="store_true",
                   help="wrap the texts in the chat template before reading")
    p.add_argument("--description", default="", help="a description to store")
    p.add_argument("--no-save", action="store_true", help="don't save it")
    p.add_argument("--force", action="store_true", help="replace a saved concept of that name")
    p.set_defaults(func=cmd_extract)

    p = command("bake", "write an MLX model folder with steering folded into the weights",
                "Fold steering into the weights and write an MLX model folder that plain "
                "`mlx_lm.load(folder)` opens without mlx-steer: --ablate removes a concept's "
                "direction at every block (the weights writing into the residual stream are "
                "orthogonalised), --add adds a concept at one block (a bias on that block's "
                "MLP down projection; llama-family models only). Weights act on every "
                "token, position 0 included. The folder carries mlx_steer_bake.json and a "
                "README saying what was baked.")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--ablate", action="append", default=[], metavar="NAME",
                   help="a concept whose direction to ablate everywhere (repeatable)")
    p.add_argument("--add", action="append", default=[], metavar="NAME[:S][@L]",
                   help="a concept to add at block L (default: recommended) with relative "
                        "strength S (default: recommended), e.g. happy:0.3@12 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(func=cmd_bake)

    p = command("serve", "an OpenAI-compatible server with steering per request",
                "Serve the model over HTTP with the OpenAI API's shapes (/v1/chat/completions, "
                "/v1/completions, /v1/models, /v1/concepts); a request's \"steering\" list "
                "steers it alone. Concurrent requests are decoded together (continuous "
                "batching).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=A.positive, default=8080, help="port (default 8080)")
    p.add_argument("--max-rows", type=A.positive, default=8, metavar="N",
                   help="requests decoded together at most (default 8)")
    p.add_argument("--max-queue", type=A.count, default=32, metavar="N",
                   help="requests waiting at most; more get a 429 (default 32)")
    p.add_argument("--max-request-bytes", type=A.positive, default=1 << 20, metavar="N",
                   help="largest request body; larger get a 413 (default 1 MiB)")
    p.add_argument("--allow-raw-vectors", action="store_true",
                   help="accept raw steering vectors (hidden-size lists) in requests")
    p.set_defaults(func=cmd_serve)


def cmd_extract(args: argparse.Namespace) -> int:
    name = validate_name(args.name)
    pairs = P.read(args.pairs)
    lab = S.lab(args)
    if not args.no_save and not args.force and name in lab.concepts.library:
        raise InvalidArgumentError(
            f"a concept {name!r} is already saved for this model; give --force to replace it")
    with Bar(args, f"extracting and calibrating {name}", "‰") as bar:
        S.check_layers(lab, args.layer)
        c = lab.concepts.extract(name, pairs, method=args.method, read=args.read,
                                 chat=args.chat, progress=bar, description=args.description,
                                 layer=args.layer, seed=args.seed)
    path = None if args.no_save else lab.concepts.save(c)
    obj = {"model": lab.name, "name": c.name, "layer": c.layer, "strength": c.strength,
           "raw_strength": c.relative_to_raw(c.layer, c.strength), "method": c.method,
           "read": c.read, "pairs": len(c.pairs), "saved": path,
           "layer_scores": c.extra.get("layer_scores"),
           "calibration": c.extra.get("calibration"), "steers": c.extra.get("steers"),
           "trained": c.extra.get("trained")}
    emit(args, obj, lambda: (
        f"{c.name}: {len(c.pairs)} pairs, method {c.method}; recommended layer {c.layer}, "
        f"strength {fmt(c.strength)} (relative)" + (f"\nsaved to {path}" if path else
                                                    "\nnot saved")))
    return 0


def cmd_bake(args: argparse.Namespace) -> int:
    if not args.ablate and not args.add:
        raise UsageError("give at least one --ablate or --add concept")
    specs = [A.add_spec(t) for t in args.add]
    lab = S.lab(args)
    steers = [S.concept(lab, name, args).ablate(positions=0) for name in args.ablate]
    for name, strength, layer in specs:
        S.check_layers(lab, layer)
        steers.append(S.concept(lab, name, args).steer(layer, strength, positions=0))
    path = lab.bake(steers, args.out, overwrite=args.overwrite)
    note = json.loads((path / NOTE).read_text())
    obj = {"model": lab.name, "path": str(path), "ablate": args.ablate,
           "add": [{"concept": n, "strength": s, "layer": la} for n, s, la in specs],
           "note": note}
    emit(args, obj, lambda: (
        f"wrote {path} ({len(note['operations'])} operation(s) baked); open it with "
        f"mlx_lm.load({str(path)!r})"))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    serve(S.lab(args), args.host, args.port, args.max_rows, args.max_queue,
          args.max_request_bytes, args.allow_raw_vectors,
          log_level="warning" if args.quiet else "info")
    return 0
