"""What the commands share: the model loaded once per process, concepts and vectors
looked up with a progress bar, and the checks every steering command makes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .. import loading, validate
from ..concept import Concept, validate_name
from ..errors import CorruptFileError, InvalidArgumentError
from ..lab import Lab
from .args import UsageError
from .render import Bar, say

LABS: dict[str | None, Lab] = {}  # by --model: one load per process (tests put theirs here)


def lab(args: argparse.Namespace) -> Lab:
    """The model, loaded once per process."""
    name = getattr(args, "model", None)
    if name not in LABS:
        if not getattr(args, "quiet", False) and sys.stderr.isatty():
            say(f"loading {name or 'the embedded model'} …")
        LABS[name] = loading.load(name, group=args.group if args.shard else None)
    return LABS[name]


def concept(lab: Lab, name: str, args: argparse.Namespace) -> Concept:
    """A concept by name; a built-in not yet extracted for this model shows a bar."""
    name = validate_name(name)
    if lab.concepts.is_ready(name):
        return lab.concepts.get(name)
    with Bar(args, f"extracting and calibrating {name}", "‰") as bar:
        return lab.concepts.get(name, progress=bar)


def vector_concept(lab: Lab, path: str, layer: int | None) -> Concept:
    """A Concept wrapping a vector file (.npy or .gguf control vector)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"no such vector file: {path}")
    stem = "".join(c for c in p.stem.lower() if c.isalnum() or c in "_-") or "vector"
    if p.suffix.lower() == ".gguf":
        c = Concept.from_gguf(p, lab, name=stem)
        if layer is not None:
            c.layer = c.check_layer(layer)
        return c
    if p.suffix.lower() != ".npy":
        raise InvalidArgumentError(f"{p.name}: a vector file must be .npy or .gguf")
    try:
        v = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's
        raise CorruptFileError(f"cannot read {p.name}: {e}") from None
    v = np.asarray(v, np.float32)
    if v.ndim == 1:
        if layer is None:
            raise InvalidArgumentError(f"{p.name} holds one vector: give --layer")
        if v.shape[0] != lab.hidden_size:
            raise InvalidArgumentError(
                f"{p.name} has {v.shape[0]} dimensions; this model's hidden size is "
                f"{lab.hidden_size}")
        vectors = np.zeros((lab.num_layers, lab.hidden_size), np.float32)
        vectors[validate.layer(layer, lab.num_layers)] = v
    elif v.ndim == 2 and v.shape == (lab.num_layers, lab.hidden_size):
        vectors = v
    else:
        raise InvalidArgumentError(
            f"{p.name} has shape {v.shape}; expected ({lab.hidden_size},) or "
            f"({lab.num_layers}, {lab.hidden_size})")
    if not np.all(np.isfinite(vectors)):
        raise InvalidArgumentError(f"{p.name} contains NaN or infinite values")
    norms = lab.residual_norms()
    rel = np.linalg.norm(vectors, axis=1) / norms
    best = int(np.argmax(rel)) if layer is None else validate.layer(layer, lab.num_layers)
    return Concept(name=stem, vectors=vectors, norms=norms, layer=best, strength=0.25,
                   model_fingerprint=lab.fingerprint, model_name=lab.name, method="file",
                   category="file", description=f"from {p.name}")


def check_layers(lab: Lab, *layers: int | None) -> None:
    """LayerOutOfRangeError for a layer this model does not have (None: not given)."""
    for layer in layers:
        if layer is not None:
            validate.layer(layer, lab.num_layers)


def source(lab: Lab, args: argparse.Namespace) -> Concept:
    """The --concept or --vector of a steering command."""
    check_layers(lab, args.layer)
    if getattr(args, "vector", None):
        return vector_concept(lab, args.vector, args.layer)
    return concept(lab, args.concept, args)


def check_raw(args: argparse.Namespace) -> None:
    if getattr(args, "raw", False) and getattr(args, "strength", None) is None \
            and getattr(args, "strengths", None) is None:
        raise UsageError("--raw needs --strength (a raw multiplier of the vector)")


def run_options(args: argparse.Namespace, bar: Bar) -> dict[str, Any]:
    """The keyword arguments every experiment run takes from the command line."""
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                progress=bar, score=not getattr(args, "no_metrics", False),
                group=None if args.shard else args.group)
