"""Model analyses for the lab's Learn and Visualizer pages (no UI code here).

Every function takes a loaded :class:`~mlx_steer.Lab` (or plain arrays) and
returns numpy arrays, plain dicts or tidy records (lists of dicts, one per row)
that the chart builders in :mod:`mlx_steer.charts` accept.

Conventions: "layer ℓ" is the output of decoder block ℓ,
after any steering at that block; position 0 (the attention sink, with massive
activations) is never read into a statistic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import metrics
from .steer import Steer, SteerLike, as_steers

# ---- depth bands -------------------------------------------------------------

BANDS = (
    # (upper fraction of depth, key, icon, title, what happens, steering effect)
    (0.25, "early", "🔤", "Token & syntax processing",
     "Blocks close to the input mostly resolve which token this is, its spelling and its "
     "immediate neighbours.",
     "Steering here disturbs grammar and word identity more than meaning; the effect is "
     "often noise."),
    (0.50, "middle-early", "💭", "Concept formation",
     "Words are combined into phrases and entities; abstract features start to form.",
     "Topics can be nudged, but the vector may be re-interpreted by later blocks."),
    (0.75, "middle-late", "🎯", "Abstract features: tone, style, intent",
     "Tone, sentiment, style and intent are represented as fairly linear directions.",
     "Often a good place to steer tone and style at a modest relative strength; each "
     "concept's recommended block is measured, and may sit a little earlier."),
    (1.01, "late", "📝", "Output decision making",
     "The residual stream is turned into a choice of the next token.",
     "Steering here changes word choice directly: it can work, but often needs more "
     "strength and gives less coherent text."),
)


def layer_stage(layer: int, num_layers: int) -> dict:
    """The depth band of block `layer` in a model with `num_layers` blocks."""
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is outside 0 … {num_layers - 1}")
    frac = layer / num_layers
    for upper, key, icon, title, what, effect in BANDS:
        if frac < upper:
            return {"key": key, "icon": icon, "title": title, "what": what, "effect": effect,
                    "recommended": key == "middle-late"}
    raise AssertionError("unreachable")


def depth_bands(num_layers: int) -> list[dict]:
    """One record per band: key, icon, title, first, last (block indices), what, effect."""
    out: list[dict] = []
    for layer in range(num_layers):
        st = layer_stage(layer, num_layers)
        if out and out[-1]["key"] == st["key"]:
            out[-1]["last"] = layer
        else:
            out.append({**st, "first": layer, "last": layer})
    return out


# ---- model pieces ------------------------------------------------------------------


def _final_norm(lab) -> Callable[[mx.array], mx.array]:
    return lab.model.model.norm


def _unembed_raw(lab, h: mx.array) -> mx.array:
    """Unembedding (no final norm) of (..., D) → (..., vocab) logits."""
    head = getattr(lab.model, "lm_head", None)
    if head is not None:
        return head(h)
    return lab.model.model.embed_tokens.as_linear(h)


def unembed(lab, hidden: np.ndarray) -> np.ndarray:
    """Logits the model would give if block outputs `hidden` (..., D) were the last layer:
    final norm, then unembedding. float32 (..., vocab)."""
    dtype = lab.model.model.norm.weight.dtype
    h = mx.array(np.asarray(hidden, dtype=np.float32)).astype(dtype)
    out = _unembed_raw(lab, _final_norm(lab)(h)).astype(mx.float32)
    mx.eval(out)
    return np.array(out)


def embeddings(lab, token_ids: Sequence[int]) -> np.ndarray:
    """Input embeddings of `token_ids`: float32 (n, D)."""
    e = lab.model.model.embed_tokens(mx.array(list(token_ids))).astype(mx.float32)
    mx.eval(e)
    return np.array(e)


def token_text(lab, token_id: int) -> str:
    """One token as text (leading spaces kept), for labels."""
    return lab.tokenizer.decode([int(token_id)])


def visible(text: str) -> str:
    """A token's text for display: newlines and tabs as ↵ ⇥, a blank token's spaces as ·."""
    s = text.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")
    return s if s.strip() else (s.replace(" ", "·") or "∅")


def token_labels(lab, tokens: Sequence[int]) -> list[str]:
    """Display labels of tokens (see `visible`)."""
    return [visible(token_text(lab, t)) for t in tokens]


# ---- residual norms -----------------------------------------------------------------


def _token_norm_mask(layer_hidden: np.ndarray) -> np.ndarray:
    return ~metrics.massive_positions(layer_hidden)


# ---- logit lens ---------------------------------------------------------------------


def _topk(probs: np.ndarray, k: int) -> np.ndarray:
    idx = np.argpartition(-probs, min(k, probs.shape[-1] - 1))[:k]
    return idx[np.argsort(-probs[idx], kind="stable")]


def logit_lens(lab, text: str | Sequence[int], k: int = 5, chat: bool = False,
               steer: SteerLike = None, position: int = -1,
               layers: Sequence[int] | None = None) -> list[dict]:
    """Top-k next tokens the model would predict at `position` if it stopped after each block.

    Returns records layer, rank (1-based), token (display text, see `visible`),
    token_id, prob — the final norm and
    the unembedding applied to each block's output. At the last block this is the
    model's real next-token distribution.
    """
    tr = lab.trace(text, steer, chat=chat)
    layers = range(lab.num_layers) if layers is None else layers
    h = tr.hidden[list(layers), position]  # (n, D)
    logp = metrics.log_softmax(unembed(lab, h))
    recs = []
    for layer, lp in zip(layers, logp):
        p = np.exp(lp)
        for rank, i in enumerate(_topk(p, k), start=1):
            recs.append({"layer": int(layer), "rank": rank,
                         "token": visible(token_text(lab, i)),
                         "token_id": int(i), "prob": float(p[i])})
    return recs


def vector_lens(lab, vector: np.ndarray, k: int = 10) -> list[dict]:
    """Tokens a direction promotes and suppresses: top/bottom-k of W_U·(g ⊙ v̂).

    `g` is the final norm's gain. Records: direction
    ("promotes"|"suppresses"), rank, token, token_id, score (logit per unit of v̂).
    """
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    n = np.linalg.norm(v)
    if n == 0 or not np.isfinite(n):
        raise ValueError("the vector has zero or non-finite norm")
    g = np.array(_final_norm(lab).weight.astype(mx.float32))
    x = mx.array((v / n * g).astype(np.float32)).astype(lab.model.model.norm.weight.dtype)
    scores = _unembed_raw(lab, x[None]).astype(mx.float32)
    mx.eval(scores)
    s = np.array(scores)[0].astype(np.float64)
    recs = []
    for direction, sign in (("promotes", 1.0), ("suppresses", -1.0)):
        for rank, i in enumerate(_topk(sign * s, k), start=1):
            recs.append({"direction": direction, "rank": rank,
                         "token": visible(token_text(lab, i)),
                         "token_id": int(i), "score": float(s[i])})
    return recs


# ---- embeddings vs activations -------------------------------------------------------


def word_position(lab, text: str, word: str) -> tuple[list[int], int]:
    """Token ids of `text` (no template) and the index of the last token of the last
    occurrence of `word`."""
    at = text.rfind(word)
    if at < 0:
        raise ValueError(f"{word!r} does not occur in {text!r}")
    tokens = lab.encode(text)
    upto = lab.encode(text[:at + len(word)])
    if tokens[:len(upto)] != upto:
        raise ValueError(f"{word!r} tokenizes differently when followed by the rest of the text")
    return tokens, len(upto) - 1


def embedding_vs_activation(lab, word: str, context_a: str, context_b: str,
                            layer: int | None = None) -> dict:
    """The same word in two contexts: identical input embedding, different activations.

    Returns word, token (its last token's text), token_id, positions (a, b), layer,
    embedding_cosine (exactly 1 when both contexts give the word the same token),
    activation_cosine (at `layer`), and records (layer, cosine) for every block with
    layer −1 standing for the input embedding.
    """
    ta, pa = word_position(lab, context_a, word)
    tb, pb = word_position(lab, context_b, word)
    if ta[pa] != tb[pb]:
        raise ValueError(
            f"{word!r} ends in a different token in the two contexts "
            f"({token_text(lab, ta[pa])!r} vs {token_text(lab, tb[pb])!r}); "
            "use the word with the same spacing in both")
    if pa == 0 or pb == 0:
        raise ValueError("put the word after the first token: position 0 is the attention "
                         "sink and is never read")
    layer = lab.num_layers // 2 if layer is None else int(layer)
    if not 0 <= layer < lab.num_layers:
        raise ValueError(f"layer {layer} is outside 0 … {lab.num_layers - 1}")
    ha = lab.hidden_states(context_a)[:, pa]
    hb = lab.hidden_states(context_b)[:, pb]
    emb = embeddings(lab, [ta[pa], tb[pb]])

    def cos(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))

    per_layer = [cos(ha[i], hb[i]) for i in range(lab.num_layers)]
    records = [{"layer": -1, "cosine": cos(emb[0], emb[1]), "what": "input embedding"}]
    records += [{"layer": i, "cosine": c, "what": "block output"}
                for i, c in enumerate(per_layer)]
    return {
        "word": word, "token": token_text(lab, ta[pa]), "token_id": int(ta[pa]),
        "positions": (pa, pb), "layer": layer,
        "embedding_cosine": records[0]["cosine"],
        "embedding_identical": bool(np.array_equal(emb[0], emb[1])),
        "activation_cosine": per_layer[layer],
        "records": records,
    }


# ---- add vs replace -------------------------------------------------------------------


def replace_steers(hidden_layer: np.ndarray, target: np.ndarray, layer: int,
                   start: int = 1) -> list[Steer]:
    """Steers that make block `layer`'s output equal `target` at every position >= start.

    `hidden_layer` (T, D) is that block's unsteered output. Steer k (positions >= k)
    adds d_k − d_{k−1} with d_t = target − h_t, so position t receives exactly d_t;
    positions before `layer`'s output are unaffected, so h_t stays valid.
    """
    h = np.asarray(hidden_layer, dtype=np.float64)
    tgt = np.asarray(target, dtype=np.float64)
    steers, prev = [], np.zeros(h.shape[1])
    for t in range(start, h.shape[0]):
        d = tgt - h[t]
        steers.append(Steer((d - prev).astype(np.float32), layer, 1.0, positions=t))
        prev = d
    return steers


def _greedy_replaced(lab, tokens: list[int], n: int, target: np.ndarray,
                     layer: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation with block `layer`'s output replaced by `target` at every
    position but 0; full forward passes (two per token). Returns tokens, first logits."""
    out: list[int] = []
    first = None
    eos = set(lab.tokenizer.eos_token_ids)
    for _ in range(n):
        seq = tokens + out
        h = lab.trace(seq).hidden[layer]
        logits = lab.trace(seq, replace_steers(h, target, layer), prompt_len=len(tokens)).logits[-1]
        if first is None:
            first = logits
        nxt = int(np.argmax(logits))
        if nxt in eos:
            break
        out.append(nxt)
    return out, first


def add_vs_replace(lab, prompt: str, vector: np.ndarray, layer: int,
                   alpha: float = 0.3, max_tokens: int = 10, chat: bool = True,
                   k: int = 5) -> dict:
    """Why steering adds a vector instead of replacing the residual stream.

    Three greedy continuations of `prompt`: unsteered; with α·median‖h‖·v̂ *added* to
    block `layer`'s output (all positions but 0); with that output *replaced* by the same
    vector at every position but 0. The replacement is exact: per-position steers that
    cancel the original activation (see `replace_steers`).

    Returns per mode ("baseline", "add", "replace"): text, tokens, top (top-k next tokens
    at the first generated step, as records mode, rank, token, prob) and kl (that step's
    next-token KL from the baseline, nats). Also `records` (all top rows), `norm`
    (median‖h‖ at the layer over the prompt) and `injected_norm`.
    """
    tokens = lab.encode(prompt, chat=chat)
    P = len(tokens)
    h_layer = lab.trace(tokens).hidden[layer]
    keep = _token_norm_mask(h_layer)
    norm = float(np.median(np.linalg.norm(h_layer[keep].astype(np.float64), axis=-1))) \
        if keep.any() else float(np.linalg.norm(h_layer[-1]))
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    injected = (alpha * norm * v / np.linalg.norm(v)).astype(np.float32)
    base_row, add_row = lab.generate_batch_tokens(
        [(prompt, None), (prompt, Steer(injected, layer, 1.0))], max_tokens=max_tokens,
        chat=chat)
    rep_tokens, rep_first = _greedy_replaced(lab, tokens, max_tokens, injected, layer)
    results = {"baseline": (base_row.tokens, base_row.first_logprobs),
               "add": (add_row.tokens, add_row.first_logprobs),
               "replace": (rep_tokens, rep_first)}
    out: dict = {"layer": layer, "alpha": alpha, "norm": norm, "prompt_tokens": P,
                 "injected_norm": float(np.linalg.norm(injected))}
    base_logits = results["baseline"][1]
    records = []
    for name, (new, first) in results.items():
        p = np.exp(metrics.log_softmax(first))
        top = [{"mode": name, "rank": r, "token": visible(token_text(lab, i)),
                "prob": float(p[i])}
               for r, i in enumerate(_topk(p, k), start=1)]
        records += top
        out[name] = {"text": lab.tokenizer.decode(new), "tokens": new, "top": top,
                     "kl": metrics.kl_divergence(base_logits, first)}
    out["records"] = records
    return out


# ---- projections on a concept direction, teacher-forced -----------------------------


@dataclass
class ProjectionRun:
    """Baseline vs steered projections on the same tokens (the steered run's)."""

    tokens: list[int]
    labels: list[str]
    prompt_len: int
    baseline: np.ndarray  # (L, T) float64, column 0 NaN
    steered: np.ndarray  # (L, T)
    steered_text: str
    baseline_text: str
    layer: int  # injection layer (first steer's)
    first_shown: int  # first column worth showing (the user's text, past the template)

    @property
    def diff(self) -> np.ndarray:
        return self.steered - self.baseline

    def window(self, start: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        s = self.first_shown if start is None else start
        return self.baseline[:, s:], self.steered[:, s:], self.labels[s:]

    def records(self, start: int | None = None) -> list[dict]:
        """Tidy rows: layer, position, token, baseline, steered, diff (NaN cells dropped)."""
        s = self.first_shown if start is None else start
        out = []
        for layer in range(self.baseline.shape[0]):
            for t in range(s, self.baseline.shape[1]):
                b, st_ = self.baseline[layer, t], self.steered[layer, t]
                if np.isfinite(b) and np.isfinite(st_):
                    out.append({"layer": layer, "position": t, "token": self.labels[t],
                                "baseline": float(b), "steered": float(st_),
                                "diff": float(st_ - b)})
        return out


def _user_text_start(lab, tokens: list[int], prompt: str) -> int:
    """Index where the user's own text starts inside a chat-templated prompt (≥ 1)."""
    own = lab.tokenizer.encode(prompt)
    n = len(own)
    for i in range(len(tokens) - n, 0, -1):
        if tokens[i:i + n] == own:
            return i
    return 1


def projection_run(lab, prompt: str, steer: SteerLike, direction: np.ndarray,
                   max_tokens: int = 24, temperature: float = 0.0, seed: int | None = 0,
                   chat: bool = True, progress=None) -> ProjectionRun:
    """Project baseline and steered activations on `direction` for the same tokens.

    The steered continuation is generated first (with the baseline, in one batch, same
    seed); then prompt + steered tokens are replayed with and without the steer
    (teacher-forced), and each block's output — measured after injection — is projected
    on `direction` ((D,) or per-layer (L, D), normalised per layer). Position 0 is NaN.
    """
    steers = as_steers(steer)
    if not steers:
        raise ValueError("projection_run needs a steer")
    rows = lab.generate_batch_tokens([(prompt, None), (prompt, steers)], max_tokens=max_tokens,
                                     temperature=temperature, seed=seed, chat=chat,
                                     progress=progress)
    prompt_tokens = lab.encode(prompt, chat=chat)
    seq = prompt_tokens + rows[1].tokens
    P = len(prompt_tokens)
    base = lab.trace(seq, None, prompt_len=P)
    steered = lab.trace(seq, steers, prompt_len=P)
    d = np.asarray(direction, dtype=np.float64)
    return ProjectionRun(
        tokens=seq, labels=token_labels(lab, seq), prompt_len=P,
        baseline=metrics.projection(base.hidden, d),
        steered=metrics.projection(steered.hidden, d),
        steered_text=rows[1].text, baseline_text=rows[0].text,
        layer=steers[0].layer,
        first_shown=_user_text_start(lab, prompt_tokens, prompt) if chat else 1,
    )


# ---- concept space --------------------------------------------------------------------


def concept_space(vectors: dict[str, np.ndarray]) -> dict:
    """2-D PCA map and cosine matrix of concept vectors taken at one layer.

    Vectors are normalised first, so the map shows directions, not sizes. Returns
    names, points (N, 2), cosine (N, N), explained (variance ratio of PC1, PC2) and
    mean_offdiag_cosine.
    """
    names = list(vectors)
    if len(names) < 2:
        raise ValueError("a concept map needs at least 2 concepts")
    x = np.stack([np.asarray(vectors[n], dtype=np.float64).reshape(-1) for n in names])
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("a concept vector has zero norm")
    unit = x / norms
    points = metrics.pca_2d(unit)
    centred = unit - unit.mean(axis=0)
    sv = np.linalg.svd(centred, compute_uv=False) ** 2
    explained = (sv[:2] / sv.sum()) if sv.sum() > 0 else np.zeros(2)
    explained = np.pad(explained, (0, 2 - len(explained)))
    points[:, explained < 1e-9] = 0.0  # a missing dimension (e.g. 2 concepts): exactly 0
    cos = metrics.cosine_matrix(x)
    off = cos[~np.eye(len(names), dtype=bool)]
    return {"names": names, "points": points, "cosine": cos,
            "explained": tuple(float(e) for e in explained),
            "mean_offdiag_cosine": float(off.mean())}
