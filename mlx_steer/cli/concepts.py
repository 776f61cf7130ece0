"""`concepts list|show|export-gguf|import-gguf|delete`: the model's concepts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ..catalogue import BUILTINS, builtin_spec
from ..concept import Concept, validate_name
from ..errors import ConceptNotFoundError, InvalidArgumentError, MlxSteerError
from ..experiments import concept_eval, concept_markers
from ..lab import Lab
from . import args as A
from . import session as S
from .args import UsageError
from .render import emit, fmt, table


def add_parsers(command: A.Command) -> None:
    p = command("concepts", "list, show, export, import or delete concepts",
                "Manage concepts: the 17 built-ins and the concepts saved for the model.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=A.Parser)
    sub.required = True

    def action(name: str, help: str, func) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help, formatter_class=argparse.RawDescriptionHelpFormatter)
        A.common(q)
        q.set_defaults(func=func)
        return q

    action("list", "list concepts", cmd_list)
    action("show", "a concept's details", cmd_show).add_argument("name")
    q = action("export-gguf", "write a llama.cpp control vector", cmd_export)
    q.add_argument("name")
    q.add_argument("out", help="output .gguf path")
    q.add_argument("--layers", default="default", metavar="LIST",
                   help="default (the recommended layer at the recommended strength), all "
                        "(every layer's raw vector), or a list like 10,12,14")
    q = action("import-gguf", "read a llama.cpp / repeng control vector", cmd_import)
    q.add_argument("file")
    q.add_argument("--name", help="concept name (default: the file's stem)")
    q.add_argument("--force", action="store_true", help="replace a saved concept")
    action("delete", "delete a saved concept", cmd_delete).add_argument("name")


def info(lab: Lab, name: str) -> dict:
    """One row of `concepts list`: where the concept comes from and its defaults, without
    extracting anything (an unreadable saved concept is marked, not raised)."""
    saved = name in lab.concepts.library
    builtin = name in BUILTINS
    row: dict[str, Any] = {"name": name, "source": "library" if saved else "builtin",
                           "builtin": builtin, "layer": None, "strength": None,
                           "category": None, "description": None, "extracted": saved}
    c = None
    if saved:
        try:
            c = lab.concepts.library.load(name)
        except MlxSteerError as e:  # one unreadable concept: listed, marked, the rest shown
            row.update(source="library (unreadable)", extracted=False, error=str(e))
    elif builtin and name in lab.concepts.builtin_cache:
        try:
            c = lab.concepts.builtin_cache.load(name)
            row["extracted"] = True
        except Exception:  # noqa: BLE001 - a stale cache is re-extracted on use
            c = None
    if c is not None:
        row.update(layer=c.layer, strength=c.strength, category=c.category,
                   description=c.description)
    elif builtin:
        spec = builtin_spec(name)
        row.update(category=spec.get("category"), description=spec.get("description"))
    return row


def cmd_list(args: argparse.Namespace) -> int:
    lab = S.lab(args)
    infos = [info(lab, n) for n in lab.concepts.names()]
    obj = {"model": lab.name, "concepts": infos}

    def text() -> str:
        cols = [("name", "name"), ("source", "source"), ("category", "category"),
                ("layer", "layer"), ("strength", "strength")]
        rows = [dict(i, layer=i["layer"] if i["extracted"] else None) for i in infos]
        bad = [f"{i['name']}: {i['error']}" for i in infos if i.get("error")]
        return (table(rows, cols) + "\n\n(– : a built-in not yet extracted for this model; "
                "it is extracted on first use)" + "".join(f"\nunreadable {b}" for b in bad))

    emit(args, obj, text)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    lab = S.lab(args)
    c = S.concept(lab, args.name, args)
    vn = np.linalg.norm(c.vectors, axis=1)
    obj = {"model": lab.name, "name": c.name, "layer": c.layer, "strength": c.strength,
           "raw_strength": c.relative_to_raw(c.layer, c.strength), "method": c.method,
           "read": c.read, "template": c.template, "category": c.category,
           "description": c.description, "pairs": len(c.pairs),
           "markers": concept_markers(c), "eval": concept_eval(c),
           "num_layers": c.num_layers, "hidden_size": c.hidden_size,
           "vector_norms": vn.tolist(), "residual_norms": c.norms.tolist(),
           "relative_norms": (vn / np.maximum(c.norms, 1e-12)).tolist(),
           "layer_scores": c.extra.get("layer_scores"),
           "calibration": c.extra.get("calibration"), "steers": c.extra.get("steers"),
           "mix": c.extra.get("mix")}
    emit(args, obj, lambda: _show_text(c, obj, vn))
    return 0


def _show_text(c: Concept, obj: dict, vn: np.ndarray) -> str:
    lines = [f"{c.name} ({c.category}): {c.description}",
             f"recommended: layer {c.layer}, strength {fmt(c.strength)} relative "
             f"(raw {fmt(obj['raw_strength'])})",
             f"method {c.method}, read {c.read}, template {c.template}, {len(c.pairs)} pairs"]
    if obj["markers"]:
        lines.append("markers: " + ", ".join(obj["markers"]))
    if obj["eval"]:
        lines.append(f"evaluation: {obj['eval']}")
    if obj["calibration"]:
        cal = obj["calibration"]
        said = "expresses the concept" if obj["steers"] else "not steering"
        lines.append(f"calibration ({said}; instruction: {cal['instruction']}):")
        lines.append(table(cal["grid"], [("layer", "layer"), ("strength", "α"),
                                         ("expression", "expression"),
                                         ("projection", "projection"), ("ppl_ratio", "ppl ×"),
                                         ("distinct2_ratio", "distinct-2 ×"),
                                         ("coherent", "coherent")]))
    rows = [{"layer": i, "vector": float(vn[i]), "residual": float(c.norms[i]),
             "ratio": float(obj["relative_norms"][i]),
             "score": (obj["layer_scores"] or [None] * c.num_layers)[i]}
            for i in range(c.num_layers)]
    lines += ["", table(rows, [("layer", "layer"), ("vector", "‖v‖"),
                               ("residual", "median ‖h‖"), ("ratio", "‖v‖/‖h‖"),
                               ("score", "separation")])]
    return "\n".join(lines)


def cmd_export(args: argparse.Namespace) -> int:
    layers: Any = args.layers
    if layers not in ("default", "all"):
        try:
            layers = A.int_list(layers)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"--layers: {e}") from None
    lab = S.lab(args)
    c = S.concept(lab, args.name, args)
    path = c.to_gguf(args.out, layers)
    emit(args, {"name": c.name, "path": str(path), "layers": layers},
         lambda: f"wrote {path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    if not Path(args.file).is_file():
        raise InvalidArgumentError(f"no such file: {args.file}")
    name = validate_name(args.name or "".join(
        ch for ch in Path(args.file).stem.lower() if ch.isalnum() or ch in "_-") or "imported")
    lab = S.lab(args)
    if name in lab.concepts.library and not args.force:
        raise InvalidArgumentError(
            f"a concept {name!r} is already saved for this model; give --force or --name")
    c = Concept.from_gguf(args.file, lab, name=name)
    path = lab.concepts.save(c)
    emit(args, {"name": c.name, "layer": c.layer, "strength": c.strength, "saved": str(path)},
         lambda: f"imported {c.name!r}: layer {c.layer}, strength {fmt(c.strength)} "
                 f"(relative)\nsaved to {path}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    name = validate_name(args.name)
    lab = S.lab(args)
    if name not in lab.concepts.library:
        extra = " (built-in concepts cannot be deleted)" if name in BUILTINS else ""
        raise ConceptNotFoundError(f"no saved concept {name!r} for {lab.name}{extra}")
    lab.concepts.delete(name)
    emit(args, {"deleted": name}, lambda: f"deleted {name!r}")
    return 0
