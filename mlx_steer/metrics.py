"""Cheap, model-free metrics over text, logits and hidden states."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache

import numpy as np

from .errors import InvalidArgumentError

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


@cache
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def words(text: str) -> list[str]:
    """Lowercased word tokens; apostrophes inside words are kept ("don't")."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def sentiment(text: str) -> float:
    """VADER compound score in [-1, 1]."""
    return float(_analyzer().polarity_scores(text)["compound"])


def marker_rate(text: str, markers: Sequence[str]) -> float:
    """Fraction of word tokens covered by marker words or phrases.

    A multi-word marker counts once per occurrence, as the number of words it
    spans; a word covered by several markers counts once.
    """
    tokens = words(text)
    if not tokens:
        return 0.0
    covered = np.zeros(len(tokens), dtype=bool)
    for marker in markers:
        phrase = words(marker)
        n = len(phrase)
        if n == 0:
            continue
        for i in range(len(tokens) - n + 1):
            if tokens[i : i + n] == phrase:
                covered[i : i + n] = True
    return float(covered.mean())


@cache
def _lexicon() -> dict[str, frozenset[str]]:
    from empath import Empath

    return {name: frozenset(t for t in terms if t and _WORD.fullmatch(t))
            for name, terms in Empath().cats.items()}


def lexicon_categories() -> list[str]:
    """Names of the Empath lexicon's categories ("anger", "fear", "zest", ...)."""
    return sorted(_lexicon())


def lexicon_rate(text: str, categories: Sequence[str]) -> float:
    """Fraction of word tokens that belong to any of the given Empath lexicon categories
    (Fast et al., 2016: word lists such as "anger", "nervousness", "zest", "pride")."""
    lex = _lexicon()
    unknown = [c for c in categories if c not in lex]
    if unknown or not categories:
        raise InvalidArgumentError(f"unknown lexicon categories {unknown or list(categories)}; "
                                   f"known: {', '.join(sorted(lex))}")
    vocab = frozenset().union(*(lex[c] for c in categories))
    tokens = words(text)
    return sum(t in vocab for t in tokens) / len(tokens) if tokens else 0.0


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tokens = words(text)
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(text: str, n: int = 2) -> float:
    """Distinct n-grams / total n-grams over word tokens; 0.0 when fewer than n words."""
    grams = _ngrams(text, n)
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(text: str, n: int = 3) -> float:
    """1 − distinct-n over word tokens; 0.0 when fewer than n words."""
    grams = _ngrams(text, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(p‖q) in nats between the next-token distributions of two 1-D logit vectors."""
    p_logits, q_logits = np.asarray(p_logits), np.asarray(q_logits)
    if p_logits.ndim != 1 or p_logits.shape != q_logits.shape:
        raise ValueError(f"need two 1-D logit vectors of equal length, got {p_logits.shape} and {q_logits.shape}")
    log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)
    return max(float(np.sum(np.exp(log_p) * (log_p - log_q))), 0.0)


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean NLL) of `targets` (T,) under `logits` (T, V)."""
    logits, targets = np.asarray(logits), np.asarray(targets)
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"need logits (T, V) and targets (T,), got {logits.shape} and {targets.shape}")
    if targets.shape[0] == 0:
        raise ValueError("perplexity of an empty sequence is undefined")
    log_probs = log_softmax(logits)[np.arange(targets.shape[0]), targets.astype(np.int64)]
    return float(np.exp(-log_probs.mean()))


def projection(hidden: np.ndarray, direction: np.ndarray, exclude_first: bool = True) -> np.ndarray:
    """⟨h, v̂⟩ for hidden (L, T, D) and direction (L, D) or (D,); returns (L, T) float64.

    With `exclude_first`, column 0 is NaN: position 0 is the attention sink and
    carries massive activations, so it is never read.
    """
    h = np.asarray(hidden, dtype=np.float64)
    v = np.asarray(direction, dtype=np.float64)
    if h.ndim != 3:
        raise ValueError(f"hidden must be (L, T, D), got {h.shape}")
    if v.ndim == 1:
        v = np.broadcast_to(v, (h.shape[0], v.shape[0]))
    if v.shape != (h.shape[0], h.shape[2]):
        raise ValueError(f"direction must be (L, D) or (D,) for hidden {h.shape}, got {np.shape(direction)}")
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("direction has zero norm")
    out = np.einsum("ltd,ld->lt", h, v / norms)
    if exclude_first and out.shape[1]:
        out[:, 0] = np.nan
    return out


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarities (N, N) of the rows of `vectors` (N, D); zero rows give 0."""
    x = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """Scores (N, 2) on the first two principal components of the centred rows.

    Each component's sign is fixed so that its largest-|value| loading is positive;
    missing components (N or D < 2) are zero columns.
    """
    x = np.asarray(vectors, dtype=np.float64)
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:2]
    peaks = components[np.arange(len(components)), np.abs(components).argmax(axis=1)]
    components = components * np.where(peaks < 0, -1.0, 1.0)[:, None]
    scores = np.zeros((x.shape[0], 2))
    scores[:, : len(components)] = centred @ components.T
    return scores


def massive_positions(hidden_layer: np.ndarray) -> np.ndarray:
    """Positions (T,) to exclude in one layer's (T, D) activations.

    True at position 0 and wherever max|a| > 100 and > 1000 × the layer's median |a|.
    """
    a = np.abs(np.asarray(hidden_layer, dtype=np.float64))
    if a.ndim != 2:
        raise ValueError(f"hidden_layer must be (T, D), got {a.shape}")
    if a.size == 0:
        return np.zeros(a.shape[0], dtype=bool)
    peak = a.max(axis=1)
    mask = (peak > 100) & (peak > 1000 * np.median(a))
    mask[0] = True
    return mask
