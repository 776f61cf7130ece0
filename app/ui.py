"""Widgets and renderers shared by the pages (no model logic: that lives in mlx_steer)."""

from __future__ import annotations

import contextlib
import json
from importlib import resources

import altair as alt
import streamlit as st

import mlx_steer
from mlx_steer import lens
from mlx_steer.errors import MlxSteerError

from . import state

STAGE_ICONS = {"early": ":material/text_fields:", "middle-early": ":material/lightbulb:",
               "middle-late": ":material/adjust:", "late": ":material/edit_note:"}
ALPHA_RANGE = (-1.0, 1.5)
RAW_LIMIT = 1000.0
POSITIONS = {
    "all": "every token (but position 0)",
    "prompt": "prompt tokens only",
    "generated": "generated tokens only",
}


@st.cache_data(show_spinner=False)
def prompts_data() -> dict:
    return json.loads(resources.files("mlx_steer").joinpath("data/prompts.json").read_text())


# ---- text ----------------------------------------------------------------------


_INERT = {c: f"&#{ord(c)};" for c in "&<>\"'\\`*_{}[]()#+-!|~$:="}


def verbatim(text: str) -> str:
    """`text` as inert HTML: HTML, Markdown and LaTeX characters as entities, newlines
    as <br>, so st.markdown shows exactly the model's characters."""
    return "".join(_INERT.get(c, c) for c in text).replace("\n", "<br>")


def text_box(text: str, placeholder=None, cursor: bool = False, empty: str = "…") -> None:
    """Model text shown verbatim (no Markdown interpretation), wrapped, in a box."""
    body = verbatim(text) if text else f"<span style='opacity:.5'>{empty}</span>"
    target = placeholder if placeholder is not None else st
    target.markdown(
        "<div class='mlx-steer-text' style='white-space:pre-wrap;border:1px solid "
        "rgba(128,128,128,.35);border-radius:.5rem;padding:.6rem .8rem;min-height:3rem;"
        f"font-size:.95rem'>{body}{'▌' if cursor else ''}</div>",
        unsafe_allow_html=True)


def empty_boxes(slots, note: str) -> None:
    """Each text box of `slots` empty, showing `note` (what to press)."""
    for slot in slots:
        text_box("", slot, empty=note)


def show_error(e: Exception) -> None:
    if isinstance(e, MlxSteerError):
        st.error(str(e))
    else:
        st.error(f"{type(e).__name__}: {e}")


# ---- concepts ------------------------------------------------------------------


def concept_ready(lab: mlx_steer.Lab, name: str) -> bool:
    """True when using `name` needs no extraction (library or cached built-in)."""
    try:
        return lab.concepts.is_ready(name)
    except MlxSteerError:
        return False


def concept_select(lab: mlx_steer.Lab, key: str, label: str = "Concept",
                   default: str = "happy", help: str | None = None) -> str:
    names = lab.concepts.names()
    if key in st.session_state and st.session_state[key] not in names:
        del st.session_state[key]
    index = names.index(default) if default in names else 0

    kwargs = {} if key in st.session_state else {"index": index}
    name = st.selectbox(label, names, key=key, **kwargs,
                        help=help or "The 17 built-in concepts and your library. Built-ins "
                        "are extracted for this model the first time they are used.")
    if not concept_ready(lab, name):
        st.caption(f"“{name}” is extracted for this model on first use (a few seconds).")
    return name


def get_concept(lab: mlx_steer.Lab, name: str) -> mlx_steer.Concept:
    """Load a concept; a built-in used for the first time is extracted with a status."""
    if concept_ready(lab, name):
        with state.model_lock():
            return lab.concept(name)
    with st.status(f"Extracting the built-in concept “{name}” for {lab.name} "
                   "(first use only)…", expanded=False) as s:
        with state.model_lock():
            c = lab.concept(name)
        s.update(label=f"Extracted “{name}”: recommended block {c.layer}, "
                       f"strength α={c.strength:g}", state="complete")
    return c


def apply_concept_defaults(prefix: str, concept: mlx_steer.Concept) -> None:
    """When the chosen concept changes, reset the layer and strength widgets to its
    recommendation (before they are drawn)."""
    marker = f"{prefix}_defaults_for"
    which = (concept.model_fingerprint, concept.name)
    if st.session_state.get(marker) != which:
        st.session_state[marker] = which
        st.session_state[f"{prefix}_layer"] = int(concept.layer)
        st.session_state[f"{prefix}_alpha"] = float(min(max(round(concept.strength, 2),
                                                            ALPHA_RANGE[0]), ALPHA_RANGE[1]))
        raw = concept.relative_to_raw(concept.layer, concept.strength)
        st.session_state[f"{prefix}_raw"] = float(min(max(round(raw, 2), -RAW_LIMIT),
                                                      RAW_LIMIT))


def steering_concept(lab: mlx_steer.Lab, prefix: str, column) -> mlx_steer.Concept:
    """The page's concept: its select box `<prefix>_concept` drawn in `column`, loaded
    (the page stops with the error if it cannot be), its recommended block and
    strength put into the page's `<prefix>_` controls."""
    with column:
        name = concept_select(lab, f"{prefix}_concept")
    try:
        concept = get_concept(lab, name)
    except MlxSteerError as e:
        show_error(e)
        st.stop()
    apply_concept_defaults(prefix, concept)
    return concept


def layer_slider(lab: mlx_steer.Lab, key: str, label: str = "Layer (block)",
                 default: int | None = None, help: str | None = None) -> int:
    """A block slider sized from the loaded model."""
    last = lab.num_layers - 1
    if key in st.session_state and not 0 <= st.session_state[key] <= last:
        del st.session_state[key]
    value = min(default if default is not None else int(0.6 * lab.num_layers), last)
    kwargs = {} if key in st.session_state else {"value": value}
    layer = st.slider(label, 0, last, step=1, key=key, **kwargs,
                      help=help or f"0 … {last}: the output of that decoder block.")
    stage = lens.layer_stage(layer, lab.num_layers)
    st.caption(f"{STAGE_ICONS[stage['key']]} **{stage['title']}** — block {layer} of {last} "
               f"({stage['key']} band)")
    return layer


def strength_controls(concept: mlx_steer.Concept, layer: int, prefix: str) -> tuple[float, bool]:
    """Relative strength (default) or raw multiplier; returns (value, relative)."""
    relative = st.toggle("Relative strength α", value=True,
                         key=f"{prefix}_relative",
                         help="α is a fraction of the residual norm: α = ‖strength·v‖ / "
                              "median‖h‖ at the layer. Useful band ≈ 0.1–0.5; "
                              "near 1 the text breaks down. Raw multipliers do not transfer "
                              "between layers or models.")
    if relative:
        kwargs = {} if f"{prefix}_alpha" in st.session_state else {"value": float(concept.strength)}
        alpha = st.slider("Strength α", *ALPHA_RANGE, step=0.01, key=f"{prefix}_alpha", **kwargs)
        raw = concept.relative_to_raw(layer, alpha)
        st.caption(f"= raw multiplier {raw:.2f} of ‖v‖ = {concept.vector_norm(layer):.1f}; "
                   f"median ‖h‖ at block {layer} = {float(concept.norms[layer]):.0f}. "
                   f"Recommended: α = {concept.strength:g} at block {concept.layer}.")
        return alpha, True
    default_raw = concept.relative_to_raw(layer, concept.strength)
    kwargs = {} if f"{prefix}_raw" in st.session_state else {
        "value": float(min(max(round(default_raw, 2), -RAW_LIMIT), RAW_LIMIT))}
    raw = st.number_input("Raw strength (multiplies v)", -RAW_LIMIT, RAW_LIMIT, step=0.5,
                          key=f"{prefix}_raw", **kwargs)
    st.caption(f"= α {concept.raw_to_relative(layer, raw):.3f} of the residual norm at block "
               f"{layer}.")
    return raw, False


# ---- progress and charts -----------------------------------------------------------


def progress_callback(bar, text: str):
    def cb(done: int, total: int) -> None:
        with contextlib.suppress(Exception):
            bar.progress(min(done / max(total, 1), 1.0), text=f"{text} ({done}/{total})")
    return cb


def calibration_view(concept: mlx_steer.Concept, key: str) -> None:
    """The calibration grid a concept's defaults were chosen from, as a chart and a caption."""
    from mlx_steer import charts

    cal = concept.extra.get("calibration")
    if not cal:
        st.caption("No calibration recorded: the defaults are the separation block at "
                   f"α = {concept.strength:g}.")
        return
    recs = [{"α": g["strength"], "expression (nats/token)": g["expression"],
             "block": g["layer"], "coherent": g["coherent"],
             "perplexity ×": g["ppl_ratio"], "distinct-2 ×": g["distinct2_ratio"]}
            for g in cal["grid"]]
    st.session_state[key + "_records"] = recs
    chart(charts.metric_chart(recs, "α", "expression (nats/token)", color="block",
                              baseline=0.0), key=key + "_chart")
    verdict = ("expresses the concept" if concept.extra.get("steers") else
               "**no candidate both expressed the concept and kept the text coherent** "
               "(reported as not steering)")
    st.caption(
        f"How the defaults were chosen: greedy continuations of {len(cal['prompts'])} "
        f"calibration prompts at every block × α above, scored under the unsteered model. "
        f"Expression: how much more likely the text becomes when the prompt says "
        f"“{cal['instruction']}”. The default (block {concept.layer}, α = "
        f"{concept.strength:g}) is, of the candidates that stay coherent (perplexity ≤ 1.5× "
        f"and distinct-2 ≥ 0.85× the unsteered text) and express the concept, the one whose "
        f"text moves the model's activations furthest along the concept; it {verdict}.")


def chart(c: alt.TopLevelMixin, key: str | None = None, **kw):
    return st.altair_chart(c, width="stretch", key=key, **kw)


OPS = {"add": "add the vector",
       "ablate": "ablate its direction (remove the component)",
       "cap": "cap the component along it at α"}


def op_select(key: str) -> str:
    """The operation on the residual stream: add (default), ablate or cap."""
    return st.radio("Operation", list(OPS), key=key, format_func=OPS.get, horizontal=True,
                    help="add: h + α·v. ablate: h − (h·v̂)v̂ (α ignored; at every block "
                         "and the embedding output unless one block is chosen). cap: the "
                         "component along v̂ is held at most at α × the median residual "
                         "norm of the block.")


def injection_summary(concept: mlx_steer.Concept, layer: int, strength: float,
                      relative: bool, positions: str, num_layers: int,
                      op: str = "add") -> dict:
    """What was injected, in numbers (shown under the playground outputs)."""
    if op == "ablate":
        return {"concept": concept.name, "operation": "ablate", "layer": str(layer),
                "direction from block": concept.layer, "positions": positions}
    raw = concept.relative_to_raw(layer, strength) if relative else strength
    alpha = concept.raw_to_relative(layer, raw)
    stage = lens.layer_stage(layer, num_layers)
    return {
        "concept": concept.name, "operation": op, "layer": layer, "stage": stage["title"],
        "alpha": round(alpha, 4), "raw strength": round(raw, 4),
        ("cap on h·v̂" if op == "cap" else "‖injected‖"):
            round((raw if op == "cap" else abs(raw)) * concept.vector_norm(layer), 2),
        "median ‖h‖ at layer": round(float(concept.norms[layer]), 2),
        "positions": positions,
    }
