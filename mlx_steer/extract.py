"""Concept extraction: every layer from one batched pass, plus measured defaults.

Recommended defaults (documented rule):
- layer: among blocks 0.3·L … 0.7·L, the one where the pooled activations of
  the positive and negative texts separate best along the concept direction
  (Fisher score: gap of the class means over the pooled standard deviation);
- strength: the largest relative strength on a grid whose next-token KL
  divergence from the unsteered model, averaged over neutral chat prompts,
  stays within `KL_TARGET` nats — strong enough to show, weak enough to stay
  fluent (science notes: α_rel 0.1–0.5 is the useful band; KL > 2 nats breaks text).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from . import train
from .concept import Concept
from .errors import InvalidArgumentError
from .metrics import log_softmax, massive_positions

if TYPE_CHECKING:
    from .lab import Lab

METHODS = ("mean", "pca", "classic", "trained")
READS = ("last", "mean")
KL_TARGET = 1.0
ALPHA_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8)
BATCH = 32
Progress = Callable[[int, int], None]


def neutral_prompts(n: int | None = None) -> list[str]:
    data = json.loads(resources.files("mlx_steer").joinpath("data/prompts.json").read_text())
    return data["neutral"][:n]


def _valid_positions(h: np.ndarray) -> np.ndarray:
    """Positions to read from one text's (L, T, D) states: not 0, not massive."""
    bad = np.zeros(h.shape[1], bool)
    for layer in h:
        bad |= massive_positions(layer)
    bad[0] = True
    return ~bad


def capture(lab: "Lab", texts: Sequence[str], read: str = "last", chat: bool = False,
            progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled states (N, L, D) of every text, and median token norms (L,).

    Texts go through the model in left-padded batches, every layer at once.
    """
    if read not in READS:
        raise InvalidArgumentError(f"read must be one of {READS}, got {read!r}")
    pooled, token_norms = [], []
    for start in range(0, len(texts), BATCH):
        for h in lab.hidden_states_batch(texts[start:start + BATCH], chat=chat):
            ok = _valid_positions(h)
            token_norms.append(np.linalg.norm(h[:, ok], axis=-1))
            if read == "last" or not ok.any():
                pooled.append(h[:, -1])
            else:
                pooled.append(h[:, ok].mean(axis=1))
        if progress:
            progress(min(start + BATCH, len(texts)), len(texts))
    every = np.concatenate(token_norms, axis=1)
    if every.shape[1] == 0:
        raise InvalidArgumentError("every text is a single token: no positions to measure")
    norms = np.median(every, axis=1)
    return np.stack(pooled).astype(np.float32), norms.astype(np.float32)


def residual_norms(lab: "Lab", texts: Sequence[str] | None = None) -> np.ndarray:
    """Median residual token norm per layer over neutral prompts (position 0 excluded)."""
    return capture(lab, list(texts or neutral_prompts()), read="last", chat=True)[1]


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


def calibrate_strength(lab: "Lab", concept: Concept, layer: int,
                       prompts: Sequence[str] | None = None,
                       grid: Sequence[float] = ALPHA_GRID,
                       target: float = KL_TARGET) -> tuple[float, list[float]]:
    """Largest grid strength whose mean next-token KL stays within `target` nats.

    One batched pass: every (prompt, strength) row plus unsteered rows.
    Returns the chosen relative strength and the mean KL at each grid point.
    """
    prompts = list(prompts or neutral_prompts(3))
    rows = [(p, None) for p in prompts]
    rows += [(p, concept.steer(layer, a)) for a in grid for p in prompts]
    out = lab.generate_batch_tokens(rows, max_tokens=1)
    base = [log_softmax(r.first_logprobs) for r in out[: len(prompts)]]
    kls = []
    for i in range(len(grid)):
        chunk = out[len(prompts) * (i + 1): len(prompts) * (i + 2)]
        kl = [float(np.sum(np.exp(b) * (b - log_softmax(r.first_logprobs))))
              for b, r in zip(base, chunk)]
        kls.append(float(np.mean(kl)))
    ok = [a for a, k in zip(grid, kls) if k <= target]
    return (max(ok) if ok else grid[0]), kls


def extract(lab: "Lab", name: str, pairs: Sequence[tuple[str, str]], method: str = "mean",
            read: str = "last", chat: bool = False, progress: Progress | None = None,
            calibrate: bool = True, layer: int | None = None, seed: int = 0,
            **meta) -> Concept:
    """A concept from (positive, negative) text pairs, with a vector for every layer.

    `layer` replaces the recommended block. `method="trained"` trains the vector at
    that block (default: the one the mean difference recommends) with
    `mlx_steer.train` (seeded by `seed`); the other blocks keep the mean difference.
    """
    from .library import validate_name

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
    pooled, norms = capture(lab, texts, read, chat, progress)
    pos, neg = pooled[: len(pairs)], pooled[len(pairs):]
    vectors = directions(pos, neg, "mean" if method == "trained" else method)
    scores = fisher_scores(pos, neg, vectors) if len(pairs) > 1 else np.linalg.norm(
        vectors, axis=1) / norms
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
    concept = Concept(name=name, vectors=vectors, norms=norms, layer=layer, strength=0.25,
                      model_fingerprint=lab.fingerprint, model_name=lab.name, method=method,
                      read=read, template="chat" if chat else "raw", pairs=pairs, **meta)
    concept.extra.update({"model_hint": lab.model_type,
                          "layer_scores": [round(float(s), 4) for s in scores]})
    if trained is not None:
        concept.extra["trained"] = trained
    if calibrate and not concept.extra.get("zero_vector"):
        concept.strength, kls = calibrate_strength(lab, concept, layer)
        concept.extra["kl_grid"] = dict(zip(map(str, ALPHA_GRID), map(float, kls)))
    return concept
