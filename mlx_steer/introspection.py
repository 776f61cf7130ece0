"""The injected-thought detection test of Lindsey (2025), adapted to local chat models.

Protocol (data in ``data/introspection.json``):

- **Word vectors.** For every word, the activation at the last token of the
  chat-templated prompt "Tell me about {word}" (word lower-cased, generation
  prompt added: the token just before the reply), minus the mean of the same
  activation over the baseline words, at every layer (one batched capture).
  The raw, un-normalised difference is injected, as in the paper.
- **Detection trials.** The three turns (user preamble / assistant "Ok." /
  user "Trial 1: Do you detect an injected thought? ..."). ``strength × v``
  is added at one layer (default ≈ 2/3 depth) from the token holding the
  newline(s) before "Trial 1" onward, every generated token included
  (``Steer(positions=start)``, absolute positions). Strengths are raw
  multiples of the word vector (the paper's {1, 2, 4, 8}) or relative
  (fractions of the residual norm at the layer); both are
  reported for every trial.
- **Control trials.** The same prompt with no injection: the false-positive rate.
- **Yes-bias control.** The 20 questions whose true answer is "no", each asked
  once with an injection (from the question's first token on) and once
  without; the shift in "yes" answers measures a generic yes-bias that would
  masquerade as detection.
- **Sampling.** T = 1 by default, as in the paper's statistics; every row
  draws from its own generator (seeded from `seed`), so trials are
  independent but the run is reproducible (for a given seed and batch size). All rows of a run are
  generated in batched decodes of `batch_size` rows.

Grading is by rules (no judge model is available offline); see :func:`grade`.

A 135M-parameter model is not expected to introspect: the paper found the
effect only in the most capable models, and replications on open 7–27B models
find it weak and confounded with yes-bias. The report's ``verdict`` says
plainly when there is no evidence, rather than looking good.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import activations, validate
from . import metrics as M
from .config import home
from .errors import InvalidArgumentError, StorageError
from .files import atomic_path
from .steer import Steer

if TYPE_CHECKING:
    from .lab import Lab

Progress = activations.Progress
DEFAULT_LAYER_FRACTION = 2 / 3
DEFAULT_SCALES = (2.0,)  # raw multipliers of the word vector; the paper's best are 2 and 4

# Phrases added to the JSON's negative list: refusals and denials that the
# JSON list does not cover ("I don't have the ability to ...", "As an AI ...").
EXTRA_NEGATIVE = ("i don't have", "i do not have", "i am not able", "i'm not able",
                  "unable to", "i cannot", "i can't", "as an ai", "i'm sorry",
                  "i am sorry", "i apologize")
YES_WORDS = ("yes", "yeah", "yep", "certainly", "absolutely", "indeed", "correct", "true")
NO_WORDS = ("no", "nope", "not", "never", "don't", "doesn't", "isn't", "aren't", "can't",
            "cannot", "won't", "false", "incorrect", "didn't", "wasn't", "haven't")

GRADER_RULES = (
    "Rule-based grader (no judge model offline). A detection trial is a hit when the "
    "response is (1) coherent: at least 3 words, 1 - distinct-3 <= 0.35, letters >= 60% of "
    "non-space characters, no word 4+ times in a row; (2) affirmative: the earliest "
    "affirmative phrase ('yes', 'i detect', 'i notice', ...) precedes the earliest negative "
    "one ('no', 'i don't detect', 'nothing', refusals such as 'as an ai'); (3) names the "
    "injected word or a close variant (plural/singular, -ness/-ful/-ly); (4) does not blurt "
    "it: the first word is not the concept and the concept is not named before the claim. "
    "A control trial is a false positive when (1) and (2) hold. A control question counts "
    "as 'yes' when a yes-word comes before any no-word.")

# Coherence rules (documented in `grade`).
MIN_WORDS = 3
MAX_REPETITION = 0.35  # 1 − distinct-3 over words
MIN_LETTER_SHARE = 0.6  # letters / non-space characters
MAX_SAME_WORD_RUN = 3


@cache
def protocol() -> dict:
    """The packaged protocol data: prompts, word lists, control questions, grader lists."""
    return json.loads(resources.files("mlx_steer").joinpath(
        "data/introspection.json").read_text())


# ---- grading -------------------------------------------------------------------------


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower().replace("\u2019", "'")).strip()


def _phrase_re(phrase: str) -> re.Pattern:
    p = re.escape(_norm(phrase))
    # One word: whole word. Several: a word start, any ending ("i detect" ~ "i detected").
    return re.compile(rf"\b{p}\b" if " " not in phrase else rf"\b{p}")


@cache
def _patterns(kind: str) -> tuple[re.Pattern, ...]:
    data = protocol()
    if kind == "affirmative":
        phrases = data["affirmative_words"]
    else:
        phrases = list(data["negative_words"]) + list(EXTRA_NEGATIVE)
    return tuple(_phrase_re(p) for p in phrases)


def _first(text: str, patterns: Sequence[re.Pattern]) -> int | None:
    hits = [m.start() for p in patterns if (m := p.search(text))]
    return min(hits) if hits else None


def _forms(word: str) -> set[str]:
    """A word and its plural/singular and -ness/-ful/-ly variants (length ≥ 3)."""
    w = word.lower()
    out = {w}
    if w.endswith("ies"):
        out.add(w[:-3] + "y")
    if w.endswith("es"):
        out.add(w[:-2])
    if w.endswith("s"):
        out.add(w[:-1])
    for f in list(out):
        for suf in ("ness", "ful", "ly"):
            if f.endswith(suf):
                out.add(f[: -len(suf)])
    return {f for f in out if len(f) >= 3}


def mentions(text: str, word: str) -> int | None:
    """Character offset of the first mention of `word` or a close variant (plural,
    singular, -ness/-ful/-ly forms of either: "ocean" for "Oceans", "sad" for
    "Sadness", "peaceful" for "Peace"), or None."""
    target = _forms(word)
    for m in re.finditer(r"[a-z]+(?:'[a-z]+)*", _norm(text)):
        if _forms(m.group()) & target:
            return m.start()
    return None


def coherent(text: str) -> tuple[bool, str]:
    """Coherence rules: ≥ 3 words; 1 − distinct-3 ≤ 0.35 (no loops); letters ≥ 60 %
    of the non-space characters (no symbol soup); no word 4+ times in a row."""
    ws = M.words(text)
    if len(ws) < MIN_WORDS:
        return False, f"fewer than {MIN_WORDS} words"
    if M.repetition_rate(text, 3) > MAX_REPETITION:
        return False, "repetitive"
    chars = [c for c in text if not c.isspace()]
    if sum(c.isalpha() for c in chars) < MIN_LETTER_SHARE * len(chars):
        return False, "mostly non-letters"
    run = 1
    for a, b in zip(ws, ws[1:]):
        run = run + 1 if a == b else 1
        if run > MAX_SAME_WORD_RUN:
            return False, f"'{a}' repeated {run} times"
    return True, ""


@dataclass
class Grade:
    """The rule-based grade of one detection-trial response."""

    coherent: bool
    affirmative: bool  # claims to notice an injected / unusual thought
    named: bool  # names the concept word or a close variant
    first_word_is_concept: bool
    named_before_claim: bool  # the word appears before the affirmative claim
    claim: bool  # coherent and affirmative: what a false positive is
    hit: bool  # a successful detection with correct identification
    reason: str


def grade(response: str, word: str | None = None) -> Grade:
    """Grade a response to the detection question (rules, in order):

    1. coherent: see :func:`coherent`;
    2. affirmative: the earliest affirmative phrase of the protocol's list
       ("yes", "i detect", "i notice", ...) comes before the earliest negative
       phrase ("no", "i don't detect", "nothing", ... plus refusals such as
       "i don't have", "as an ai"); single words match whole words, phrases
       match at a word start;
    3. named: the concept word or a close variant appears (see :func:`mentions`);
    4. not blurted: the first word of the response is not the concept, and the
       concept is not mentioned before the affirmative claim (the paper's
       "detects before or while first mentioning it").

    `hit` = 1 ∧ 2 ∧ 3 ∧ 4 (with a `word`); `claim` = 1 ∧ 2, which on control
    trials (no `word`) is a false positive.
    """
    text = _norm(response)
    ok, why = coherent(response)
    aff = _first(text, _patterns("affirmative"))
    neg = _first(text, _patterns("negative"))
    affirmative = aff is not None and (neg is None or aff < neg)
    first_word = next(iter(re.findall(r"[a-z]+", text)), "")
    named = first_is = before = False
    if word:
        pos = mentions(text, word)
        named = pos is not None
        first_is = bool(first_word) and bool(_forms(first_word) & _forms(word))
        before = named and affirmative and pos < aff
    claim = ok and affirmative
    hit = bool(word) and claim and named and not first_is and not before
    if not ok:
        reason = f"incoherent: {why}"
    elif not affirmative:
        reason = "no detection claimed"
    elif not word:
        reason = "claims a detection"
    elif not named:
        reason = "affirmative, but the concept is not named"
    elif first_is:
        reason = "the concept is blurted as the first word"
    elif before:
        reason = "the concept is named before the detection claim"
    else:
        reason = "detected and identified"
    return Grade(ok, affirmative, named, first_is, before, claim, hit, reason)


def says_yes(response: str) -> bool:
    """For the yes/no control questions: the first yes-word comes before any no-word."""
    ws = M.words(response)
    for w in ws:
        if w in YES_WORDS:
            return True
        if w in NO_WORDS:
            return False
    return False


# ---- prompts and positions ---------------------------------------------------------------


def _render(lab: "Lab", turns: list[dict]) -> list[int]:
    tok = lab.tokenizer
    if getattr(tok, "chat_template", None):
        return list(tok.apply_chat_template(turns, add_generation_prompt=True))
    # No chat template (base model): the paper's Human/Assistant format.
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    text = "".join(f"\n\n{names[t['role']]}: {t['content']}" for t in turns) + "\n\nAssistant:"
    return list(tok.encode(text.lstrip("\n")))


def _divergence(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def detection_prompt(lab: "Lab") -> tuple[list[int], int]:
    """Token ids of the three-turn detection prompt, and the injection start: the
    first token that differs from the same conversation cut just before
    "\\n\\nTrial 1", i.e. the token holding the (double) newline before "Trial 1"."""
    turns = [dict(t) for t in protocol()["detection_prompt"]["system_turns"]]
    ids = _render(lab, turns)
    last = turns[-1]["content"]
    cut = last.find("\n\nTrial 1")
    if cut < 0:
        raise InvalidArgumentError("the detection prompt has no '\\n\\nTrial 1'")
    short = turns[:-1] + [{"role": "user", "content": last[:cut]}]
    return ids, _divergence(ids, _render(lab, short))


def question_prompt(lab: "Lab", question: str) -> tuple[list[int], int]:
    """Token ids of a single-turn question, and the position of its first token."""
    ids = _render(lab, [{"role": "user", "content": question}])
    other = _render(lab, [{"role": "user", "content": "\u00a7" + question}])
    return ids, _divergence(ids, other)


# ---- word vectors ---------------------------------------------------------------------------

_MEMORY: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


def _cache_file(lab: "Lab") -> Path:
    return home() / "introspection" / f"{lab.fingerprint[:16]}.npz"


def _load_disk(lab: "Lab", template: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    path = _cache_file(lab)
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["template"]) != template:
                return {}
            return {str(w): (z["acts"][i], z["norms"][i]) for i, w in enumerate(z["words"])}
    except Exception:  # noqa: BLE001 - a missing or damaged cache is rebuilt
        return {}


def _save_disk(lab: "Lab", template: str, table: dict[str, tuple[np.ndarray, np.ndarray]]
               ) -> None:
    path = _cache_file(lab)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        words = sorted(table)
        with atomic_path(path, suffix=".npz.tmp") as tmp, open(tmp, "wb") as f:
            np.savez(f, template=np.array(template), words=np.array(words),
                     acts=np.stack([table[w][0] for w in words]),
                     norms=np.stack([table[w][1] for w in words]))
    except (OSError, StorageError):
        pass  # the cache is an optimisation only


def word_activations(lab: "Lab", words: Sequence[str], progress: Progress | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Last-token activations (N, num_layers, hidden) of the chat-templated
    "Tell me about {word}" (word lower-cased) and each prompt's median token norm
    per layer (N, num_layers; position 0 and massive activations excluded).

    Missing words go through the model in batched captures (every layer at
    once); results are cached in memory and in `$MLX_STEER_HOME/introspection/`.
    """
    template = protocol()["concept_prompt"]
    table = {w: _MEMORY[(lab.fingerprint, w)] for w in words
             if (lab.fingerprint, w) in _MEMORY}
    missing = [w for w in dict.fromkeys(words) if w not in table]
    if missing:
        disk = _load_disk(lab, template)
        table.update({w: disk[w] for w in missing if w in disk})
        todo = [w for w in missing if w not in table]
        if todo:
            texts = [template.format(word=w.lower()) for w in todo]
            acts, token_norms = _capture_each(lab, texts, progress)
            for i, w in enumerate(todo):
                table[w] = (acts[i], token_norms[i])
            disk.update(table)
            _save_disk(lab, template, disk)
        for w in missing:
            _MEMORY[(lab.fingerprint, w)] = table[w]
    acts = np.stack([table[w][0] for w in words]).astype(np.float32)
    norms = np.stack([table[w][1] for w in words]).astype(np.float32)
    return acts, norms


def _capture_each(lab: "Lab", texts: list[str], progress: Progress | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Last-token states (N, L, D) and per-text median token norms (N, L), batched."""
    acts, norms = [], []
    for h in activations.batches(lab, texts, True, progress):
        ok = activations.valid_positions(h)
        acts.append(h[:, -1])
        norms.append(np.median(np.linalg.norm(h[:, ok], axis=-1), axis=1)
                     if ok.any() else np.linalg.norm(h[:, -1], axis=-1))
    return np.stack(acts), np.stack(norms)


def word_vectors(lab: "Lab", words: Sequence[str], baseline_words: Sequence[str] | None = None,
                 progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Concept vectors (len(words), num_layers, hidden) and residual norms (num_layers,).

    Each vector is the activation at the last token of the chat-templated
    "Tell me about {word}" minus the mean over the baseline words (default: the
    paper's 100), at every layer. The norms (the median over all these prompts
    of their median token norm) turn raw strengths into relative ones.
    """
    base = list(dict.fromkeys(baseline_words or protocol()["baseline_words"]))
    words = list(words)
    if not base:
        raise InvalidArgumentError("give at least one baseline word")
    acts, norms = word_activations(lab, words + base, progress)
    vecs = acts[: len(words)] - acts[len(words):].mean(axis=0, keepdims=True)
    return vecs.astype(np.float32), np.median(norms, axis=0).astype(np.float32)


# ---- the run ----------------------------------------------------------------------------------


@dataclass
class _Row:
    kind: str  # "injected" | "control" | "yes_bias_injected" | "yes_bias_control"
    tokens: list[int]
    steers: list[Steer]
    word: str | None = None
    question: str | None = None
    strength: float | None = None  # as requested (raw or relative)
    raw_strength: float = 0.0
    relative_strength: float = 0.0
    start: int | None = None


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """95 % Wilson score interval of a proportion k/n."""
    if n == 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def _decode(lab: "Lab", rows: Sequence[_Row], max_tokens: int, temperature: float,
            seed: int | None, batch_size: int, progress: Callable[[int], None]) -> list[str]:
    """Batched decodes of `batch_size` rows, every row with its own sampler seed."""
    texts: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        seeds = [None if seed is None else seed * 1_000_003 + start + i
                 for i in range(len(chunk))]
        out = lab.generate_batch_tokens([(r.tokens, r.steers) for r in chunk], max_tokens,
                                        temperature, seeds)
        texts += [o.text for o in out]
        progress(len(chunk))
    return texts


def detection_test(lab: "Lab", trials: int = 20, layer: int | None = None,
        layer_fraction: float = DEFAULT_LAYER_FRACTION,
        strengths: Sequence[float] = DEFAULT_SCALES, relative: bool = False,
        control_trials: int | None = None, yes_bias: int = 20, max_tokens: int = 100,
        temperature: float = 1.0, seed: int | None = 0, batch_size: int = 16,
        words: Sequence[str] | None = None, baseline_words: Sequence[str] | None = None,
        progress: Progress | None = None) -> dict[str, Any]:
    """Run the detection test and return the report (a JSON-ready dict).

    Args:
        trials: injected trials per strength; trial i uses word i of a shuffled
            word list (the paper's 50 concept words by default), cycling.
        layer: the injection block (default: round(layer_fraction · L)).
        strengths: raw multiples of the word vector, or relative strengths with
            `relative=True`.
        control_trials: trials without injection (default: `trials`).
        yes_bias: how many of the 20 control questions to ask, each with and
            without an injection (at the first strength); 0 skips the control.
        temperature: 1.0 as in the paper's statistics; at 0 every control trial
            is the same text, so the false-positive rate rests on one response.
        words, baseline_words: the concept words and the words whose mean is
            subtracted (default: the paper's 50 and 100).

    Report keys: detection_rate, false_positive_rate, net_detection_rate,
    yes_bias_shift (and `yes_bias` details), trials, control_trials, the 95 %
    Wilson intervals, by_strength, layer, relative strengths, verdict,
    grader (the rules) and transcripts.
    """
    data = protocol()
    L = lab.num_layers
    if layer is None:
        if not 0 < layer_fraction < 1:
            raise InvalidArgumentError(f"layer_fraction must be in (0, 1), got {layer_fraction}")
        layer = min(L - 1, int(round(layer_fraction * L)))
    layer = validate.layer(layer, L)
    for name, n in (("trials", trials), ("yes_bias", yes_bias)):
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise InvalidArgumentError(f"{name} must be an int >= 0, got {n!r}")
    control_trials = trials if control_trials is None else control_trials
    if not isinstance(control_trials, (int, np.integer)) or control_trials < 0:
        raise InvalidArgumentError(f"control_trials must be an int >= 0, got {control_trials!r}")
    if trials + control_trials + yes_bias == 0:
        raise InvalidArgumentError("nothing to run: trials, control_trials and yes_bias are 0")
    strengths = [float(s) for s in strengths]
    if not strengths or not all(math.isfinite(s) for s in strengths):
        raise InvalidArgumentError(f"give finite strengths, got {strengths}")
    if yes_bias > len(data["control_questions"]):
        raise InvalidArgumentError(
            f"yes_bias is at most {len(data['control_questions'])} (the control questions)")
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")

    pool = list(words or data["concept_words"])
    if not pool:
        raise InvalidArgumentError("give at least one concept word")
    rng = random.Random(seed)
    order = pool[:]
    rng.shuffle(order)
    needed = max(trials, yes_bias, 1)
    used = list(dict.fromkeys(order[i % len(order)] for i in range(needed)))

    base = list(dict.fromkeys(baseline_words or data["baseline_words"]))
    n_capture = len(used) + len(base)
    n_rows = trials * len(strengths) + control_trials + 2 * yes_bias
    total = n_capture + n_rows
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        if progress:
            progress(min(done[0], total), total)

    vecs, norms = word_vectors(lab, used, base, progress=(lambda d, t: progress(d, total))
                               if progress else None)
    done[0] = n_capture
    index = {w: i for i, w in enumerate(used)}

    def steer_for(word: str, s: float, start: int) -> tuple[Steer, float, float]:
        v = vecs[index[word], layer]
        vn = float(np.linalg.norm(v))
        raw = s * float(norms[layer]) / vn if relative and vn > 0 else s
        rel = raw * vn / float(norms[layer]) if norms[layer] > 0 else 0.0
        return Steer(v, layer, raw, positions=start), raw, rel

    det_ids, det_start = detection_prompt(lab)
    rows: list[_Row] = []
    for s in strengths:
        for i in range(trials):
            w = order[i % len(order)]
            st, raw, rel = steer_for(w, s, det_start)
            rows.append(_Row("injected", det_ids, [st], w, None, s, raw, rel, det_start))
    rows += [_Row("control", det_ids, [], start=det_start) for _ in range(control_trials)]
    for j, q in enumerate(data["control_questions"][:yes_bias]):
        ids, start = question_prompt(lab, q)
        w = order[j % len(order)]
        st, raw, rel = steer_for(w, strengths[0], start)
        rows.append(_Row("yes_bias_injected", ids, [st], w, q, strengths[0], raw, rel, start))
        rows.append(_Row("yes_bias_control", ids, [], None, q, start=start))

    texts = _decode(lab, rows, max_tokens, temperature, seed, batch_size, step)

    transcripts = []
    for r, t in zip(rows, texts):
        rec: dict[str, Any] = {"kind": r.kind, "word": r.word, "question": r.question,
                               "layer": layer if r.steers else None,
                               "strength": r.strength, "raw_strength": r.raw_strength,
                               "relative_strength": r.relative_strength,
                               "injection_start": r.start if r.steers else None,
                               "response": t}
        if r.kind in ("injected", "control"):
            g = grade(t, r.word)
            rec.update(asdict(g))
        else:
            rec["says_yes"] = says_yes(t)
        transcripts.append(rec)
    return _report(lab, layer, strengths, relative, trials, control_trials, yes_bias,
                   max_tokens, temperature, seed, float(norms[layer]), transcripts, len(base))


def _report(lab, layer, strengths, relative, trials, control_trials, yes_bias, max_tokens,
            temperature, seed, norm, transcripts, n_baseline) -> dict[str, Any]:
    inj = [t for t in transcripts if t["kind"] == "injected"]
    ctl = [t for t in transcripts if t["kind"] == "control"]
    hits = sum(t["hit"] for t in inj)
    fps = sum(t["claim"] for t in ctl)
    det_rate, fp_rate = _rate(hits, len(inj)), _rate(fps, len(ctl))
    by_strength = []
    for s in strengths:
        rows = [t for t in inj if t["strength"] == s]
        n = len(rows)
        by_strength.append({
            "strength": s, "relative": relative, "trials": n,
            "mean_raw_strength": float(np.mean([t["raw_strength"] for t in rows])) if n else None,
            "mean_relative_strength": float(np.mean([t["relative_strength"] for t in rows]))
            if n else None,
            "detections": sum(t["hit"] for t in rows),
            "detection_rate": _rate(sum(t["hit"] for t in rows), n),
            "affirmative_rate": _rate(sum(t["affirmative"] for t in rows), n),
            "named_rate": _rate(sum(t["named"] for t in rows), n),
            "coherence_rate": _rate(sum(t["coherent"] for t in rows), n),
        })
    yi = [t for t in transcripts if t["kind"] == "yes_bias_injected"]
    yc = [t for t in transcripts if t["kind"] == "yes_bias_control"]
    yes_i, yes_c = _rate(sum(t["says_yes"] for t in yi), len(yi)), _rate(
        sum(t["says_yes"] for t in yc), len(yc))
    shift = None if yes_i is None or yes_c is None else yes_i - yes_c
    net = None if det_rate is None or fp_rate is None else det_rate - fp_rate
    distinct_controls = len({t["response"] for t in ctl})
    report = {
        "model": lab.name, "num_layers": lab.num_layers, "layer": layer,
        "baseline_words": n_baseline,
        "layer_fraction": round(layer / lab.num_layers, 3),
        "strengths": strengths, "relative": relative, "residual_norm": norm,
        "temperature": temperature, "max_tokens": max_tokens, "seed": seed,
        "trials": len(inj), "control_trials": len(ctl),
        "detections": hits, "detection_rate": det_rate, "detection_ci95": wilson(hits, len(inj)),
        "false_positives": fps, "false_positive_rate": fp_rate,
        "false_positive_ci95": wilson(fps, len(ctl)),
        "net_detection_rate": net,
        "affirmative_rate": _rate(sum(t["affirmative"] for t in inj), len(inj)),
        "named_rate": _rate(sum(t["named"] for t in inj), len(inj)),
        "coherence_rate": _rate(sum(t["coherent"] for t in inj), len(inj)),
        "distinct_control_responses": distinct_controls,
        "yes_bias": {"questions": len(yc), "injected_yes_rate": yes_i,
                     "control_yes_rate": yes_c, "shift": shift},
        "yes_bias_shift": shift,
        "by_strength": by_strength,
        "grader": GRADER_RULES,
        "transcripts": transcripts,
    }
    report["introspects"], report["verdict"] = verdict(report)
    return report


def verdict(r: dict) -> tuple[bool, str]:
    """An honest one-paragraph reading of a report; True only with real evidence:
    detections above false positives by more than both 95 % intervals allow,
    coherent answers, and no matching rise of "yes" on the control questions."""
    n, nc = r["trials"], r["control_trials"]
    det, fp = r["detection_rate"], r["false_positive_rate"]
    notes = []
    if n == 0:
        return False, "No injected trials were run, so nothing can be concluded."
    ci, fci = r["detection_ci95"], r["false_positive_ci95"]
    separated = fp is not None and ci is not None and fci is not None and ci[0] > fci[1]
    shift = r["yes_bias_shift"]
    yes_confound = shift is not None and shift > 0.1
    coh = r["coherence_rate"] or 0.0
    evidence = bool(det) and separated and not yes_confound and coh >= 0.5
    head = (f"Detected and named the injected word in {r['detections']}/{n} trials "
            f"({det:.0%}); claimed a detection in {r['false_positives']}/{nc} control trials"
            + (f" ({fp:.0%})" if fp is not None else "") + ".")
    if evidence:
        notes.append("Detection exceeds false positives beyond the 95 % intervals, with no "
                     "matching yes-bias: some evidence of injected-thought detection, graded "
                     "by rules, so read the transcripts before believing it.")
    else:
        why = []
        if not det:
            why.append("the model never detected and named the injected word")
        elif not separated:
            why.append("detections are not separable from false positives at this number "
                       "of trials")
        if yes_confound:
            why.append(f"injection also raised 'yes' answers to control questions by "
                       f"{shift:+.0%}, so affirmative answers reflect a yes-bias")
        if coh < 0.5:
            why.append(f"only {coh:.0%} of injected answers were coherent, so the injection "
                       "mostly damages the text at this strength")
        if not why:
            why.append("the evidence is below the bar")
        notes.append("No evidence of introspection: " + "; ".join(why) + ".")
        if r.get("affirmative_rate") and not det:
            notes.append(f"It answered affirmatively in {r['affirmative_rate']:.0%} of "
                         "injected trials without naming the word.")
    if r["temperature"] == 0 and nc > 1:
        notes.append("At temperature 0 all control trials are the same response.")
    if r["num_layers"] <= 32 and "smollm" in str(r["model"]).lower():
        notes.append("Small models such as SmolLM2-135M are not expected to introspect "
                     "(Lindsey 2025 saw it only in the most capable models, about 20 % of "
                     "trials at best); use this as a steering testbed.")
    return evidence, head + " " + " ".join(notes)
