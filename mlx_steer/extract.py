"""Concept extraction: every layer from one batched pass, plus measured defaults.

Recommended defaults (documented rule):
- layer: among blocks 0.3·L … 0.7·L, the one where the pooled activations of
  the positive and negative texts separate best along the concept direction
  (Fisher score: gap of the class means over the pooled standard deviation);
- then `calibrate.calibrate` chooses the default block and strength from the
  text the model writes over a (block × α_rel) grid (see that module): the most
  expressive candidate that keeps the text coherent. The Fisher layer is kept
  as `extra["fisher_layer"]` and is the default when calibration is skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import train
from .activations import Progress, capture
from .calibrate import apply as apply_calibration
from .calibrate import calibrate as calibrate_concept
from .concept import Concept, validate_name
from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from .lab import Lab

METHODS = ("mean", "pca", "classic", "trained")
DEFAULT_STRENGTH = 0.2  # uncalibrated concepts only


def directions(pos: np.ndarray, neg: np.ndarray, method: str) -> np.ndarray:
    """(L, D) concept vectors from pooled positives and negatives (N, L, D)."""
    diffs = pos - neg
    if method == "mean":
        return diffs.mean(axis=0)
    if method == "classic":
        return diffs[0]
    if method == "pca":
        out = np.zeros(diffs.shape[1:], np.float32)
        for layer in range(diffs.shape[1]):
            d = diffs[:, layer].astype(np.float64)
            _, _, vt = np.linalg.svd(d, full_matrices=False)
            pc = vt[0]
            proj = d @ pc
            if proj.mean() < 0:
                pc, proj = -pc, -proj
            # Scaled to the mean projection so magnitudes match the mean difference.
            out[layer] = pc * proj.mean()
        return out
    raise InvalidArgumentError(f"method must be one of {METHODS}, got {method!r}")


def fisher_scores(pos: np.ndarray, neg: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Per-layer separation of positives and negatives along each layer's vector."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    p = np.einsum("nld,ld->nl", pos, unit)
    n = np.einsum("nld,ld->nl", neg, unit)
    spread = np.sqrt((p.var(axis=0) + n.var(axis=0)) / 2) + 1e-6
    return (p.mean(axis=0) - n.mean(axis=0)) / spread


def recommend_layer(scores: np.ndarray) -> int:
    L = len(scores)
    lo, hi = int(round(0.3 * L)), max(int(round(0.7 * L)), int(round(0.3 * L)) + 1)
    return lo + int(np.argmax(scores[lo:hi]))


def extract(lab: "Lab", name: str, pairs: Sequence[tuple[str, str]], method: str = "mean",
            read: str = "last", chat: bool = False, progress: Progress | None = None,
            calibrate: bool = True, layer: int | None = None, seed: int = 0,
            instruction: str | None = None, **meta) -> Concept:
    """A concept from (positive, negative) text pairs, with a vector for every layer.

    With `calibrate` (default) its default block and strength come from
    `calibrate.calibrate`; `instruction` is its style instruction (default: made
    from the name), used by that calibration and by the prompting baseline.
    `layer` fixes the default block (calibration then chooses only the strength).
    `method="trained"` trains the vector at that block (default: the one the mean
    difference recommends) with `mlx_steer.train` (seeded by `seed`); the other
    blocks keep the mean difference, and calibration keeps the trained block.
    `progress(done, total)` covers extraction and calibration together.
    """
    name = validate_name(name)
    pairs = [(str(p), str(n)) for p, n in pairs]
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {METHODS}, got {method!r}")
    if not pairs or any(not p.strip() or not n.strip() for p, n in pairs):
        raise InvalidArgumentError("give at least one pair of non-empty (positive, negative) texts")
    if all(p == n for p, n in pairs):
        raise InvalidArgumentError(
            "every pair has the same positive and negative text: there is no contrast "
            "to extract a direction from")
    if method == "pca" and len(pairs) < 2:
        raise InvalidArgumentError("the pca method needs at least 2 pairs")
    if method == "classic":
        pairs, read = pairs[:1], "last"
    texts = [p for p, _ in pairs] + [n for _, n in pairs]
    steps = 1000
    part = steps // 2 if calibrate else steps

    def capture_progress(done: int, total: int) -> None:
        if progress:
            progress(part * done // max(total, 1), steps)

    def calibration_progress(done: int, total: int) -> None:
        if progress:
            progress(part + (steps - part) * done // max(total, 1), steps)

    pooled, norms = capture(lab, texts, read, chat, capture_progress)
    pos, neg = pooled[: len(pairs)], pooled[len(pairs):]
    vectors = directions(pos, neg, "mean" if method == "trained" else method)
    scores = fisher_scores(pos, neg, vectors) if len(pairs) > 1 else np.linalg.norm(
        vectors, axis=1) / norms
    fixed = layer is not None or method == "trained"
    if layer is None:
        layer = recommend_layer(scores)
    elif isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not (
            0 <= layer < len(norms)):
        raise InvalidArgumentError(f"layer must be an int in 0 … {len(norms) - 1}, got {layer!r}")
    trained = None
    if method == "trained":
        vectors[layer], trained = train.train_vector(lab, pairs, int(layer), vectors[layer],
                                                     float(norms[layer]), seed=seed,
                                                     progress=progress)
    concept = Concept(name=name, vectors=vectors, norms=norms, layer=layer,
                      strength=DEFAULT_STRENGTH,
                      model_fingerprint=lab.fingerprint, model_name=lab.name, method=method,
                      read=read, template="chat" if chat else "raw", pairs=pairs, **meta)
    concept.extra.update({"model_hint": lab.model_type, "fisher_layer": layer,
                          "layer_scores": [round(float(s), 4) for s in scores]})
    if trained is not None:
        concept.extra["trained"] = trained
    if instruction:
        concept.extra["instruction"] = str(instruction)
    if calibrate and not concept.extra.get("zero_vector"):
        cal = calibrate_concept(lab, concept, blocks=[int(layer)] if fixed else None,
                                instruction=instruction,
                                progress=calibration_progress if progress else None)
        apply_calibration(concept, cal)
    return concept
