"""Experiments: every variant is a row of ONE batched decode, with numbers per row.

Each experiment builds :class:`Variant` rows (a prompt and its steering) and
hands them to :func:`run`, which

1. adds an unsteered baseline row for every distinct prompt that has none;
2. generates every row in one batched decode (``lab.generate_batch_tokens``)
   with the same seed, so rows differ only by their steering (and prompt);
3. scores every row in batched teacher-forced passes (see :func:`run`) and
   returns tidy records: one flat dict per row, ready for pandas / Altair.

Record fields (always present; a metric that cannot be computed is ``None``):

- ``row``, ``kind`` ("baseline", "compare", "layer", "strength", "mix",
  "component", "eval", "prompted", "calibration"), ``is_baseline``, ``prompt``, ``concept``, ``layer``,
  ``strength`` (relative: ‖raw·v‖ / median residual norm at the layer), ``raw_strength`` (multiplier of the layer's raw vector),
  ``positions``, ``text``, ``n_tokens``, ``finish_reason``, ``seed``,
  ``temperature``;
- ``sentiment``: VADER compound in [-1, 1];
- ``marker_rate``: fraction of words that are the concept's marker words
  (its JSON spec's ``markers``; a mix uses the union of its parts');
- ``perplexity``: exp(mean NLL) of the generated tokens under the UNSTEERED
  model, prompt as context (coherence; loops score low, hence...);
- ``repetition_rate``: 1 − distinct-3 over words; ``distinct_2``; ``words``;
- ``kl_divergence``: KL(p_baseline ‖ p_row) in nats of the first generated
  token's distribution, against the baseline row of the same prompt;
- ``projection``: mean ⟨h, v̂⟩ at the steered layer over the generated
  positions of the row's teacher-forced trace WITH its steering (so it
  includes the injected raw·‖v‖ at that layer; see :func:`run` for how it is
  computed without a second pass); ``projection_baseline``: the same for
  the baseline row of that prompt, unsteered; ``text_projection``: the row's
  own text through the unsteered model (does the text itself carry the
  concept, independent of the injection?);
- ``expression`` (with ``run(..., expression=True)``): how much more likely the
  row's text becomes under the unsteered model when the prompt carries the
  concept's style instruction, in nats per generated token (mean log p(text |
  prompt + instruction) − mean log p(text | prompt)); concept-agnostic, no
  judge model; ``expression_baseline``: the same for the baseline row's text;
- ``instruction``: set on a prompted row (kind "prompted", the prompting
  baseline: the prompt plus the concept's instruction, unsteered; its
  perplexity and expression are taken against the plain prompt like any row);
- ``eval_kind`` and ``concept_score``: the concept's own evaluation (spec's
  ``eval``): direction × sentiment, marker rate, word count × direction, or
  the rate of words from the concept's emotion-lexicon categories ("lexicon").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from . import distributed
from .activations import Progress
from . import metrics as M
from .catalogue import BUILTINS, builtin_spec
from .concept import Concept, validate_name
from .errors import InvalidArgumentError
from .files import jsonable
from .lens import layer_stage
from .prompts import default_instruction, neutral_prompts, with_instruction
from .scoring import METRIC_BATCH, ScoreEntry, score
from .steer import Positions, Steer, as_steers

if TYPE_CHECKING:
    from .lab import Lab

Record = dict[str, Any]
ConceptLike = Union[Concept, str]

DEFAULT_STRENGTHS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.8)
METRIC_FIELDS = ("sentiment", "marker_rate", "marker_rate_baseline", "perplexity",
                 "repetition_rate", "distinct_2", "words", "kl_divergence", "projection",
                 "projection_baseline", "text_projection", "concept_score",
                 "concept_score_baseline", "expression", "expression_baseline")


@dataclass
class Variant:
    """One row of an experiment: a prompt, its steering and how to label it."""

    prompt: str
    steers: list[Steer] = field(default_factory=list)
    kind: str = "baseline"
    concept: Concept | None = None
    layer: int | None = None
    strength: float = 0.0  # relative
    raw_strength: float = 0.0
    positions: Positions = "all"
    label: str = ""
    extra: dict = field(default_factory=dict)
    markers: list[str] | None = None  # default: the concept's markers
    instruction: str = ""  # a prompted row: sent as `prompt` + instruction, unsteered

    @property
    def is_baseline(self) -> bool:
        return not self.instruction and all(s.is_noop for s in self.steers)

    @property
    def sent_prompt(self) -> str:
        """What the model is given (the prompt, plus the instruction of a prompted row)."""
        return with_instruction(self.prompt, self.instruction)


# ---- concept helpers ------------------------------------------------------------


def resolve(lab: "Lab", concept: ConceptLike) -> Concept:
    """A Concept object from a Concept or a name (library first, then built-ins)."""
    if isinstance(concept, Concept):
        return concept
    if isinstance(concept, str):
        return lab.concept(concept)
    raise InvalidArgumentError(f"expected a Concept or a concept name, got {concept!r}")


def _spec(name: str) -> dict | None:
    return builtin_spec(name) if name in BUILTINS else None


def concept_markers(concept: Concept | None) -> list[str]:
    """Marker words of a concept: `extra["markers"]`, its built-in spec's, or a mix's parts'."""
    if concept is None:
        return []
    if concept.extra.get("markers"):
        return list(concept.extra["markers"])
    spec = _spec(concept.name)
    if spec is not None:
        return list(spec.get("markers", []))
    out: list[str] = []
    for part, _w in concept.extra.get("mix", []):
        spec = _spec(part)
        for m in (spec or {}).get("markers", []):
            if m not in out:
                out.append(m)
    return out


def concept_instruction(concept: Concept | None) -> str:
    """The concept's style instruction ("Answer in a happy tone."): `extra["instruction"]`,
    its built-in spec's, else one made from its name."""
    if concept is None:
        return ""
    if concept.extra.get("instruction"):
        return str(concept.extra["instruction"])
    spec = _spec(concept.name)
    if spec is not None and spec.get("instruction"):
        return str(spec["instruction"])
    return default_instruction(concept.name)


def concept_eval(concept: Concept | None) -> dict | None:
    """The concept's evaluation rule ({"kind": "sentiment"|"markers"|"length"|"lexicon", ...})."""
    if concept is None:
        return None
    if concept.extra.get("eval"):
        return dict(concept.extra["eval"])
    spec = _spec(concept.name)
    return dict(spec["eval"]) if spec and "eval" in spec else None


def text_metrics(text: str, markers: Sequence[str] = ()) -> dict[str, float]:
    """Model-free metrics of one text (the same definitions every record uses)."""
    return {
        "sentiment": M.sentiment(text),
        "marker_rate": M.marker_rate(text, markers) if markers else 0.0,
        "repetition_rate": M.repetition_rate(text, 3),
        "distinct_2": M.distinct_n(text, 2),
        "words": len(M.words(text)),
    }


def concept_score(rule: dict | None, m: Mapping[str, Any]) -> float | None:
    """Score of a row under the concept's evaluation rule (higher = more of the concept)."""
    if not rule:
        return None
    kind, d = rule.get("kind"), float(rule.get("direction", 1))
    if kind == "sentiment":
        return d * m["sentiment"]
    if kind == "markers":
        return m["marker_rate"]
    if kind == "length":
        return d * m["words"]
    if kind == "lexicon":
        return M.lexicon_rate(m["text"], rule["categories"])
    return None


# ---- variants -----------------------------------------------------------------------


def steered_variant(prompt: str, concept: Concept, layer: int | None = None,
                    strength: float | None = None, relative: bool = True,
                    positions: Positions = "all", kind: str = "steered",
                    label: str = "", op: str = "add") -> Variant:
    """A row steering `concept` at `layer` (default: its recommended layer) with that
    layer's own vector; `strength` relative unless `relative=False` (then raw).

    `op` is "add", "cap" or "ablate" (default layer for "ablate": "all", every write
    into the residual stream, with the recommended layer's direction)."""
    if op == "ablate":
        layer = "all" if layer is None else layer
        steers = as_steers(concept.steer(layer, positions=positions, op=op))
        at = concept.layer if not isinstance(layer, int) else layer
        return Variant(prompt, steers, kind, concept, at, 0.0, 0.0, positions,
                       label or f"{concept.name} ablate L{layer}", extra={"op": op})
    layer = concept.layer if layer is None else layer
    steer = concept.steer(layer, strength, relative, positions, op=op)
    raw = steer.strength
    if strength is None:
        rel = concept.strength
    elif relative:
        rel = float(strength)
    else:
        rel = concept.raw_to_relative(steer.layer, raw)
    name = concept.name if op == "add" else f"{concept.name} {op}"
    return Variant(prompt, [steer], kind, concept, steer.layer, rel, raw, positions,
                   label or f"{name} L{steer.layer} α{rel:.3g}", extra={"op": op})


def prompted_variant(prompt: str, concept: Concept, instruction: str | None = None,
                     label: str = "") -> Variant:
    """The prompting baseline: the same prompt with the concept's style instruction
    (default: :func:`concept_instruction`), unsteered. Scored against the plain prompt."""
    instruction = concept_instruction(concept) if instruction is None else instruction
    if not instruction.strip():
        raise InvalidArgumentError("a prompted row needs a non-empty instruction")
    return Variant(prompt, [], "prompted", concept, concept.layer, 0.0, 0.0,
                   label=label or f"{concept.name} (prompted)", instruction=instruction)


def _prompts(prompt: str | Sequence[str]) -> list[str]:
    ps = [prompt] if isinstance(prompt, str) else list(prompt)
    if not ps:
        raise InvalidArgumentError("give at least one prompt")
    return ps


def default_layers(num_layers: int, include: int | None = None) -> list[int]:
    """Every max(1, L//8)-th block from 0, plus `include` (the recommended layer)."""
    layers = set(range(0, num_layers, max(1, num_layers // 8)))
    if include is not None:
        layers.add(int(include))
    return sorted(layers)


# ---- the engine ------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray | None:
    n = float(np.linalg.norm(v))
    return None if n == 0 or not math.isfinite(n) else (np.asarray(v, np.float64) / n)


def with_baselines(variants: Sequence[Variant]) -> list[Variant]:
    """`variants` preceded by an unsteered row for each prompt that has no baseline row."""
    variants = list(variants)
    have = {v.prompt for v in variants if v.is_baseline}
    extra: dict[str, Variant] = {}
    for v in variants:
        if v.prompt not in have:
            b = extra.setdefault(v.prompt, Variant(v.prompt, kind="baseline",
                                                   label="baseline", markers=[]))
            b.extra.setdefault("_who", set()).add((id(v.concept), v.layer))
            b.extra.setdefault("_concepts", []).append(v.concept)
            for m in concept_markers(v.concept):
                if m not in b.markers:
                    b.markers.append(m)
    for b in extra.values():
        # One concept at one layer for this prompt: the baseline is that concept at
        # strength 0 (so it has a projection and the concept's evaluation too).
        who, cs = b.extra.pop("_who"), b.extra.pop("_concepts")
        if len(who) == 1 and cs[0] is not None:
            b.concept, b.layer = cs[0], next(iter(who))[1]
    return list(extra.values()) + variants


def run(lab: "Lab", variants: Sequence[Variant], *, max_tokens: int = 60,
        temperature: float = 0.0, seed: int | None = 0, top_p: float = 1.0,
        chat: bool = True, baselines: bool = True, score: bool = True,
        markers: Sequence[str] | None = None, progress: Progress | None = None,
        metric_batch: int = METRIC_BATCH, group=None,
        timeout: float | None = None, expression: bool = False) -> list[Record]:
    """Generate every variant as a row of one batched decode and score each row.

    Args:
        variants: the rows; prompts may differ between rows.
        baselines: add an unsteered row for each prompt that has no baseline row.
        score: compute the model-based metrics (perplexity, projections); the
            text metrics and the first-token KL cost nothing and are always there.
        markers: marker words to count (default: each row's concept's markers).
        progress: called as progress(done, total): decode steps, then scoring passes.
        group: an `mx.distributed` group of several ranks (`distributed.world()`
            under `mlx.launch`), each with the whole model: each rank runs a
            contiguous share of the rows (with the baseline rows its share refers
            to) as one batch, and every rank returns all the records, equal to a
            single-process run. A failing rank makes every rank raise.
        timeout: seconds a rank waits for the others (see `distributed.timeout_s`).
        expression: also score each concept row's expression (see the module notes;
            one more teacher-forced sequence per row and per baseline).

    Scoring: every row's generated tokens go through the unsteered model once
    after its prompt (perplexity, text_projection), in batches of `metric_batch`,
    capturing only the probed blocks; each distinct prompt is computed once and
    its cache shared by its rows (`scoring.score_shared`). The steered projection
    needs no second pass when nothing upstream of the probed block is steered
    (the usual case): there the steered state is exactly the unsteered state
    plus the deltas added at that block on the positions their rule covers.
    Rows steered upstream get a steered teacher-forced pass as well.
    """
    variants = list(variants)
    if not variants:
        raise InvalidArgumentError("an experiment needs at least one row")
    if baselines:
        variants = with_baselines(variants)
    kw = dict(max_tokens=max_tokens, temperature=temperature, seed=seed, top_p=top_p,
              chat=chat, score=score, markers=markers, progress=progress,
              metric_batch=metric_batch, expression=expression)
    if distributed.size(group) > 1:
        if lab.group is not None:
            raise InvalidArgumentError(
                "this model is sharded across the ranks, so every rank runs every row: "
                "give the group to load() or to the experiment, not to both")
        return _run_shared(lab, variants, group, timeout, **kw)
    return tidy(_records(lab, variants, **kw))


def tidy(records: Sequence[Record]) -> list[Record]:
    """Uniform columns (first-appearance order; None where a row lacks one), plain values."""
    keys = list(dict.fromkeys(k for rec in records for k in rec))
    return [{k: jsonable(rec.get(k)) for k in keys} for rec in records]


def rank_rows(variants: Sequence[Variant], rank: int, size: int) -> tuple[range, list[int]]:
    """The rows (indices into `variants`, baselines included) that `rank` of `size`
    reports, and the rows it decodes: those plus the first baseline row of each of
    their prompts, which KL and the baseline columns compare with."""
    own = distributed.share(len(variants), rank, size)
    first_base: dict[str, int] = {}
    for i, v in enumerate(variants):
        if v.is_baseline:
            first_base.setdefault(v.prompt, i)
    need = sorted(set(own) | {first_base[variants[i].prompt] for i in own
                              if variants[i].prompt in first_base})
    return own, need


def _run_shared(lab: "Lab", variants: list[Variant], group, timeout: float | None,
                **kw) -> list[Record]:
    """This rank's share of the rows, gathered with every other rank's (see `run`)."""
    for v in variants:  # a bad row raises its typed error on every rank, before any work
        lab.check_input(lab.encode(v.sent_prompt, kw["chat"]), v.steers, kw["max_tokens"])
    own, need = rank_rows(variants, distributed.rank(group), distributed.size(group))

    def mine() -> list[Record]:
        if not need:
            return []
        recs = _records(lab, [variants[i] for i in need], **kw)
        out = []
        for i, rec in zip(need, recs):
            if i in own:
                rec["row"] = i
                out.append({k: jsonable(x) for k, x in rec.items()})
        return out

    parts = distributed.gather_results(mine, group, what="experiment grid", timeout=timeout)
    return tidy([rec for part in parts for rec in part])


def _records(lab: "Lab", variants: list[Variant], *, max_tokens: int, temperature: float,
             seed: int | None, top_p: float, chat: bool, score: bool,
             markers: Sequence[str] | None, progress: Progress | None,
             metric_batch: int, expression: bool = False) -> list[Record]:
    """One record per variant (in order; baselines already added), before `tidy`."""
    n_scores = 0
    if score:
        # Unsteered sequences (shared contexts) and steered ones make separate passes.
        n_rows = len(variants)
        if expression:  # one instructed sequence per concept row (a baseline's shared)
            n_rows += sum(v.concept is not None for v in variants)
        n_steered = sum(not v.is_baseline and v.layer is not None and _needs_steered_pass(v)
                        for v in variants)
        n_scores = math.ceil(n_rows / metric_batch) + math.ceil(n_steered / metric_batch)
    total = max_tokens + n_scores
    done = [0]

    def gen_progress(step: int, _n: int) -> None:
        done[0] = step
        if progress:
            progress(step, total)

    results = lab.generate_batch_tokens([(v.sent_prompt, v.steers) for v in variants],
                                        max_tokens=max_tokens, temperature=temperature,
                                        seed=seed, chat=chat, top_p=top_p,
                                        progress=gen_progress)
    done[0] = max_tokens
    if progress:
        progress(done[0], total)

    base_of: dict[str, int] = {}
    for i, v in enumerate(variants):
        if v.is_baseline and v.prompt not in base_of:
            base_of[v.prompt] = i

    records: list[Record] = []
    for i, (v, r) in enumerate(zip(variants, results)):
        mk = (list(markers) if markers is not None else v.markers if v.markers is not None
              else concept_markers(v.concept))
        tm = text_metrics(r.text, mk)
        b = base_of.get(v.prompt)
        btm = text_metrics(results[b].text, mk) if b is not None else None
        kl = (M.kl_divergence(results[b].first_logprobs, r.first_logprobs)
              if b is not None else None)
        rec: Record = {
            "row": i, "kind": v.kind, "is_baseline": v.is_baseline, "label": v.label,
            "prompt": v.prompt, "concept": v.concept.name if v.concept else None,
            "layer": v.layer, "strength": float(v.strength),
            "raw_strength": float(v.raw_strength),
            "positions": v.positions, "text": r.text, "n_tokens": len(r.tokens),
            "finish_reason": r.finish_reason, "seed": seed, "temperature": temperature,
            **tm, "kl_divergence": kl, "perplexity": None, "projection": None,
            "projection_baseline": None, "text_projection": None,
            "marker_rate_baseline": btm["marker_rate"] if btm else None,
            "eval_kind": None, "concept_score": None, "concept_score_baseline": None,
            "instruction": v.instruction or None, "expression": None,
            "expression_baseline": None,
        }
        rule = concept_eval(v.concept)
        if rule:
            rec["eval_kind"] = rule.get("kind")
            rec["concept_score"] = concept_score(rule, {**tm, "text": r.text})
            if btm is not None:
                rec["concept_score_baseline"] = concept_score(rule, {**btm,
                                                                     "text": results[b].text})
        rec.update(v.extra)
        records.append(rec)

    if score:
        _score(lab, variants, results, records, base_of, chat, metric_batch,
               (lambda: _tick(done, total, progress)), expression)
        if progress:
            progress(total, total)
    return records


def _tick(done: list[int], total: int, progress: Progress | None) -> None:
    done[0] += 1
    if progress:
        progress(min(done[0], total), total)


def _needs_steered_pass(v: Variant) -> bool:
    """False when nothing upstream of the probed block is steered and only additions are:
    the steered output there is exactly the unsteered one plus the steers added, so the
    projection needs no extra pass."""
    return not all(s.op == "add" and isinstance(s.layer, int) and s.layer >= v.layer
                   for s in v.steers)


def _added_projection(steers: Sequence[Steer], layer: int, unit: np.ndarray, prompt_len: int,
                      n_gen: int) -> float:
    """Mean over the generated positions of ⟨Σ active deltas at `layer`, unit⟩."""
    pos = np.arange(prompt_len, prompt_len + n_gen)
    total = np.zeros(n_gen)
    for s in steers:
        if s.layer != layer or s.strength == 0.0:
            continue
        start, end = s.window(prompt_len)
        total += ((pos >= start) & (pos < end)) * float(s.delta.astype(np.float64) @ unit)
    return float(total.mean())


def _score(lab, variants, results, records, base_of, chat, metric_batch, tick,
           expression: bool = False) -> None:
    unsteered: dict[int, ScoreEntry] = {}
    entries: list[ScoreEntry] = []
    prompt_toks = {p: lab.encode(p, chat) for p in {v.prompt for v in variants}}
    for i, (v, r) in enumerate(zip(variants, results)):
        if not r.tokens:
            continue
        toks = prompt_toks[v.prompt]
        e = ScoreEntry(toks + r.tokens, len(toks), [], len(r.tokens), nll=True)
        unsteered[i] = e
        entries.append(e)
    steered: dict[int, ScoreEntry] = {}
    added: dict[int, float] = {}
    for i, v in enumerate(variants):
        if i not in unsteered:
            continue
        ue = unsteered[i]
        if v.layer is not None and v.concept is not None:
            unit = _unit(v.concept.vectors[v.layer])
            if unit is None:
                continue
            key = f"p{i}"
            ue.probes.append((v.layer, unit, "text_" + key))
            if v.is_baseline:
                ue.probes.append((v.layer, unit, key))
            elif not _needs_steered_pass(v):
                added[i] = _added_projection(v.steers, v.layer, unit, ue.prompt_len, ue.n_gen)
            else:
                se = ScoreEntry(ue.tokens, ue.prompt_len, list(v.steers), ue.n_gen, nll=False,
                            probes=[(v.layer, unit, key)])
                steered[i] = se
                entries.append(se)
            b = base_of.get(v.prompt)
            if b is not None and b in unsteered and b != i:
                unsteered[b].probes.append((v.layer, unit, "base_" + key))
    # Expression: the row's text (and its prompt's baseline text) under the unsteered
    # model told to write in the concept's way, against the plain prompt.
    instructed: dict[tuple[int, str], ScoreEntry] = {}
    if expression:
        for i, v in enumerate(variants):
            if i not in unsteered or v.concept is None:
                continue
            instr = v.instruction or concept_instruction(v.concept)
            b = base_of.get(v.prompt)
            for j in {i} | ({b} if b is not None and b in unsteered else set()):
                if (j, instr) not in instructed:
                    toks = lab.encode(with_instruction(variants[j].prompt, instr), chat)
                    src = unsteered[j]
                    instructed[(j, instr)] = e = ScoreEntry(
                        toks + src.tokens[src.prompt_len:], len(toks), [], src.n_gen, nll=True)
                    entries.append(e)
    for e in entries:
        e.steers = lab.check_input(e.tokens, e.steers)
    score(lab, entries, metric_batch, tick)
    for i, ue in unsteered.items():
        rec, key = records[i], f"p{i}"
        rec["perplexity"] = math.exp(ue.out["nll"])
        rec["text_projection"] = ue.out.get("text_" + key)
        if i in added:
            rec["projection"] = ue.out["text_" + key] + added[i]
        else:
            rec["projection"] = steered.get(i, ue).out.get(key)
        b = base_of.get(variants[i].prompt)
        if b is not None and b in unsteered:
            rec["projection_baseline"] = (unsteered[b].out.get("base_" + key)
                                          if b != i else ue.out.get(key))
        if expression and variants[i].concept is not None:
            instr = variants[i].instruction or concept_instruction(variants[i].concept)
            rec["expression"] = ue.out["nll"] - instructed[(i, instr)].out["nll"]
            if b is not None and (b, instr) in instructed:
                rec["expression_baseline"] = (unsteered[b].out["nll"]
                                              - instructed[(b, instr)].out["nll"])


# ---- experiments ------------------------------------------------------------------------


def compare(lab: "Lab", prompt: str | Sequence[str], concept: ConceptLike,
            layer: int | None = None, strength: float | None = None, *,
            relative: bool = True, positions: Positions = "all", op: str = "add",
            prompted: bool = False, **run_kw) -> list[Record]:
    """Baseline and steered rows for each prompt, one batch (2 rows per prompt; with
    `prompted`, a third: the prompting baseline, see :func:`prompted_variant`)."""
    c = resolve(lab, concept)
    rows = []
    for p in _prompts(prompt):
        rows.append(steered_variant(p, c, layer, strength, relative, positions,
                                    kind="compare", op=op))
        if prompted:
            rows.append(prompted_variant(p, c))
    return run(lab, rows, **run_kw)


def layer_variants(prompt: str | Sequence[str], concept: Concept,
                   layers: Sequence[int] | None = None, strength: float | None = None,
                   relative: bool = True, positions: Positions = "all") -> list[Variant]:
    """One row per (prompt, layer), each layer steered with THAT layer's own vector."""
    layers = default_layers(concept.num_layers, concept.layer) if layers is None else list(layers)
    if not layers:
        raise InvalidArgumentError("give at least one layer")
    return [steered_variant(p, concept, layer, strength, relative, positions, kind="layer")
            for p in _prompts(prompt) for layer in layers]


def layer_analysis(lab: "Lab", prompt: str | Sequence[str], concept: ConceptLike,
                   layers: Sequence[int] | None = None, strength: float | None = None, *,
                   relative: bool = True, positions: Positions = "all",
                   **run_kw) -> list[Record]:
    """One concept over several layers (default: every L//8-th and the recommended
    one), each with its own layer's vector, at one strength (relative by default, so
    residual-norm growth does not confound "where" with "how hard"), plus the
    baseline row. Records carry `stage` (the depth band of the layer)."""
    c = resolve(lab, concept)
    rows = layer_variants(prompt, c, layers, strength, relative, positions)
    for v in rows:
        v.extra["stage"] = layer_stage(v.layer, c.num_layers)["key"]
        v.extra["depth"] = round(v.layer / c.num_layers, 3)
    return run(lab, rows, **run_kw)


def strength_variants(prompt: str | Sequence[str], concept: Concept,
                      strengths: Sequence[float] = DEFAULT_STRENGTHS,
                      layer: int | None = None, relative: bool = True,
                      positions: Positions = "all") -> list[Variant]:
    """One row per (prompt, strength); strength 0 is added first when missing."""
    ss = [float(s) for s in strengths]
    if not ss:
        raise InvalidArgumentError("give at least one strength")
    if 0.0 not in ss:
        ss = [0.0] + ss
    out = []
    for p in _prompts(prompt):
        for s in ss:
            v = steered_variant(p, concept, layer, s, relative, positions, kind="strength")
            if s == 0.0:
                v.label = "baseline (strength 0)"
            out.append(v)
    return out


def strength_explorer(lab: "Lab", prompt: str | Sequence[str], concept: ConceptLike,
                      strengths: Sequence[float] = DEFAULT_STRENGTHS,
                      layer: int | None = None, *, relative: bool = True,
                      positions: Positions = "all", **run_kw) -> list[Record]:
    """One concept at one layer over a list of strengths (relative unless
    `relative=False`), 0 included: the strength-0 row is the baseline."""
    c = resolve(lab, concept)
    return run(lab, strength_variants(prompt, c, strengths, layer, relative, positions),
               **run_kw)


def method_comparison(lab: "Lab", prompt: str | Sequence[str], concept: ConceptLike,
                      methods: Sequence[str] = ("mean", "pca", "trained"),
                      strength: float | None = None, *, op: str = "add",
                      positions: Positions = "all", seed: int = 0,
                      extract_progress: Progress | None = None,
                      **run_kw) -> list[Record]:
    """The concept's pairs extracted with each method at the concept's block, each
    vector steering (`op`) at the same relative strength (default: the concept's),
    as rows of one batched decode next to the baseline. Rows are labelled by method."""
    c = resolve(lab, concept)
    if not c.pairs:
        raise InvalidArgumentError(f"{c.name!r} has no stored pairs to extract again")
    if not methods:
        raise InvalidArgumentError("give at least one method")
    rule, markers = concept_eval(c), concept_markers(c)
    alpha = c.strength if strength is None else float(strength)
    variants = []
    for i, m in enumerate(methods):
        if m == c.method:
            v = c
        else:
            step = (None if extract_progress is None else
                    (lambda d, t, i=i: extract_progress(i * t + d, len(methods) * t)))
            v = lab.extract(f"{c.name[:48]}-{m}", c.pairs, method=m, read=c.read,
                            chat=c.template == "chat", layer=c.layer, seed=seed,
                            calibrate=False, progress=step)
        if rule:
            v.extra["eval"] = rule
        for p in _prompts(prompt):
            variants.append(steered_variant(p, v, None if op == "ablate" else c.layer,
                                            alpha, True, positions, kind="method",
                                            label=m, op=op))
            variants[-1].markers = markers
            variants[-1].extra["method"] = m
    return run(lab, variants, **run_kw)


def mix_concepts(lab: "Lab", parts: Sequence[tuple[ConceptLike, float]] | Mapping[str, float],
                 normalize: bool = True, name: str | None = None,
                 layer: int | None = None, strength: float | None = None) -> Concept:
    """A weighted mix (see `Concept.mix`) with meaningful defaults: layer = the
    heaviest part's recommended layer, strength = the |weight|-weighted mean of
    the parts' recommended relative strengths."""
    items = list(parts.items()) if isinstance(parts, Mapping) else list(parts)
    if not items:
        raise InvalidArgumentError("a mix needs at least one concept:weight")
    resolved = [(resolve(lab, c), float(w)) for c, w in items]
    if all(w == 0 for _, w in resolved):
        raise InvalidArgumentError("every mix weight is 0")
    if name is None:  # a name the library accepts (no dots): mix-happy70-excited30
        import re

        name = "mix-" + "-".join(
            re.sub(r"[^a-z0-9_]", "", c.name.lower()) + ("m" if w < 0 else "")
            + str(round(abs(w) * 100)) for c, w in resolved)[:60]
    mixed = Concept.mix(resolved, normalize=normalize, name=validate_name(name))
    heaviest = max(resolved, key=lambda cw: abs(cw[1]))[0]
    wsum = sum(abs(w) for _, w in resolved)
    mixed.layer = heaviest.layer if layer is None else mixed.check_layer(layer)
    mixed.strength = (sum(abs(w) * c.strength for c, w in resolved) / wsum
                      if strength is None else float(strength))
    markers = concept_markers(mixed)
    if markers:
        mixed.extra["markers"] = markers
    return mixed


def mix(lab: "Lab", prompt: str | Sequence[str],
        parts: Sequence[tuple[ConceptLike, float]] | Mapping[str, float], *,
        normalize: bool = True, layer: int | None = None, strength: float | None = None,
        relative: bool = True, positions: Positions = "all", name: str | None = None,
        save: bool = False, include_parts: bool = True, **run_kw
        ) -> tuple[Concept, list[Record]]:
    """Mix concepts, generate with the mix (and, with `include_parts`, each part
    alone at the same layer and strength) next to the baseline; optionally save
    the mix to the model's library. Returns (mixed concept, records)."""
    items = list(parts.items()) if isinstance(parts, Mapping) else list(parts)
    items = [(resolve(lab, c), w) for c, w in items]
    mixed = mix_concepts(lab, items, normalize, name, layer,
                         strength if relative else None)
    layer = mixed.layer
    # Parts alone: the same layer and strength as the mix (its default: relative).
    part_strength, part_relative = ((strength, relative) if strength is not None
                                    else (mixed.strength, True))
    rows = []
    for p in _prompts(prompt):
        if include_parts:
            rows += [steered_variant(p, c, layer, part_strength, part_relative, positions,
                                     kind="component") for c, _w in items]
        rows.append(steered_variant(p, mixed, layer, strength, relative, positions,
                                    kind="mix"))
    records = run(lab, rows, **run_kw)
    # Under several ranks one of them saves (every rank has the same records).
    if save and distributed.is_lead(run_kw.get("group") or lab.group):
        path = lab.save_concept(mixed)
        for r in records:
            if r["kind"] == "mix":
                r["saved"] = str(path)
    return mixed, records


def evaluate(lab: "Lab", concepts: Sequence[ConceptLike] | ConceptLike,
             prompts: Sequence[str] | None = None, layer: int | None = None,
             strength: float | None = None, *, relative: bool = True,
             positions: Positions = "all", prompted: bool = False,
             **run_kw) -> list[Record]:
    """Each concept at its recommended (or the given) layer and strength on several
    prompts (default: 4 neutral ones), next to shared baseline rows, in one batch;
    with `prompted`, also each concept's prompting baseline (kind "prompted").
    Summarise with :func:`summarize`."""
    cs = [concepts] if isinstance(concepts, (Concept, str)) else list(concepts)
    if not cs:
        raise InvalidArgumentError("give at least one concept")
    ps = list(prompts) if prompts else neutral_prompts(4)
    resolved = [resolve(lab, c) for c in cs]
    rows = [steered_variant(p, c, layer, strength, relative, positions, kind="eval")
            for c in resolved for p in ps]
    if prompted:
        rows += [prompted_variant(p, c) for c in resolved for p in ps]
    return run(lab, rows, **run_kw)


def summarize(records: Sequence[Record],
              by: Sequence[str] = ("kind", "concept", "layer", "strength")) -> list[Record]:
    """Mean of every numeric metric per group (None values skipped), with `n`.

    Groups of steered rows also get `<metric>_delta`: their mean minus the mean
    of the baseline rows of the same prompts.
    """
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
    base: dict[str, Record] = {}
    for r in records:
        if r.get("is_baseline"):
            base.setdefault(r["prompt"], r)

    def mean(rows, f):
        vals = [r[f] for r in rows if isinstance(r.get(f), (int, float))
                and not isinstance(r.get(f), bool)]
        return float(np.mean(vals)) if vals else None

    out = []
    for key, rows in groups.items():
        s: Record = dict(zip(by, key))
        s["n"] = len(rows)
        for f in METRIC_FIELDS:
            s[f] = mean(rows, f)
        if not all(r.get("is_baseline") for r in rows):
            brows = [base[r["prompt"]] for r in rows if r["prompt"] in base]
            for f in ("sentiment", "perplexity", "repetition_rate"):
                b0 = mean(brows, f)
                s[f + "_delta"] = None if s[f] is None or b0 is None else s[f] - b0
            for f in ("marker_rate", "projection", "concept_score", "expression"):
                b0 = mean([{"x": r.get(f + "_baseline")} for r in rows], "x")
                s[f + "_delta"] = None if s[f] is None or b0 is None else s[f] - b0
        out.append(s)
    return out
