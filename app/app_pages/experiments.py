"""Experiments: layer analysis, strength explorer and concept mixing, each a single
batched decode with a baseline row and measured metrics."""

import pandas as pd
import streamlit as st

from app import state, ui
from mlx_steer import charts
from mlx_steer import experiments as ex
from mlx_steer.errors import MlxSteerError

lab = state.lab()
L = lab.num_layers

st.title(":material/science: Experiments")
st.markdown(
    "Every experiment runs all its variants **and an unsteered baseline** as rows of one "
    "batched generation with the same seed, so rows differ only by their steering. Each row "
    "is then scored: the concept's own score (sentiment or marker words), next-token KL from "
    "the baseline, perplexity of the text under the *unsteered* model (fluency), repetition, "
    "and the projection on the concept direction.")

METRICS = {
    "concept_score": "concept score (the concept's own evaluation)",
    "sentiment": "sentiment (VADER, −1…1)",
    "marker_rate": "marker-word rate",
    "kl_divergence": "next-token KL from the baseline (nats)",
    "perplexity": "perplexity under the unsteered model",
    "repetition_rate": "repetition (1 − distinct-3)",
    "distinct_2": "distinct-2",
    "projection": "projection on the concept direction",
}
TEXT_COLS = ["label", "layer", "strength", "text", "concept_score", "sentiment",
             "kl_divergence", "perplexity", "repetition_rate"]


def metric_select(key: str) -> str:
    return st.selectbox("Metric to plot", list(METRICS), format_func=METRICS.get, key=key)


def run_with_progress(fn, *args, **kw):
    bar = st.progress(0.0, text="Generating every row in one batch…")
    try:
        with state.model_lock():
            out = fn(lab, *args, progress=ui.progress_callback(bar, "decode steps + scoring"),
                     **kw)
        bar.empty()
        return out
    except MlxSteerError as e:
        bar.empty()
        ui.show_error(e)
        return None


def show_records(records: list[dict], x: str, metric: str, key: str) -> None:
    base = next((r for r in records if r["is_baseline"]), None)
    rows = [r for r in records if not r["is_baseline"] or r.get("kind") == "strength"]
    bval = base.get(metric) if base else None
    ui.chart(charts.metric_chart(rows, x, metric, baseline=bval if bval is not None else None),
             key=f"{key}_chart")
    st.caption(f"{METRICS[metric]} per {x}" + (f"; dashed line: the unsteered baseline "
                                                f"({bval:.3g})" if bval is not None else ""))
    records_table(records)


def show_bars(records: list[dict], metric: str, key: str, extra_cols: tuple = ()) -> None:
    """One bar per row (mixes, methods), then the rows' table."""
    ui.chart(charts.rate_bars([{"label": r["label"], metric: r.get(metric)} for r in records],
                              "label", metric), key=f"{key}_chart")
    records_table(records, extra_cols)


def records_table(records: list[dict], extra_cols: tuple = ()) -> None:
    frame = pd.DataFrame(records)
    st.dataframe(frame[[c for c in [*extra_cols, *TEXT_COLS] if c in frame]], hide_index=True,
                 width="stretch",
                 column_config={"text": st.column_config.TextColumn(width="large")})


def tokens_slider(key: str, default: int = 40) -> int:
    return st.slider("Tokens per row", 4, 120, default, step=4, key=key)


tab_layers, tab_strength, tab_mix, tab_methods = st.tabs(
    ["Layer analysis", "Strength explorer", "Mixing", "Methods & operations"])

with tab_layers:
    st.markdown("The same concept injected at several blocks — each block with **its own "
                "vector** and the same **relative** strength, so a later block is not "
                "simply a weaker push.")
    c1, c2 = st.columns(2)
    with c1:
        prompt = st.text_input("Prompt", ui.prompts_data()["neutral"][0], key="exp_layer_prompt")
        name = ui.concept_select(lab, "exp_layer_concept")
    with c2:
        alpha = st.slider("Strength α (relative)", 0.0, 1.5, 0.3, 0.05, key="exp_layer_alpha")
        default_layers = ex.default_layers(L)
        layers = st.multiselect("Blocks", list(range(L)), default=default_layers,
                                key="exp_layer_layers")
        max_tokens = tokens_slider("exp_layer_tokens")
    metric = metric_select("exp_layer_metric")
    if st.button("Run layer analysis", type="primary", key="exp_layer_btn",
                 disabled=not layers):
        try:
            concept = ui.get_concept(lab, name)
            recs = run_with_progress(ex.layer_analysis, prompt, concept, sorted(layers), alpha,
                                     max_tokens=max_tokens)
            if recs is not None:
                st.session_state["exp_layer"] = recs
        except MlxSteerError as e:
            ui.show_error(e)
    if st.session_state.get("exp_layer"):
        show_records(st.session_state["exp_layer"], "layer", metric, "exp_layer")

with tab_strength:
    st.markdown("One concept at one block over a range of relative strengths; α = 0 is the "
                "baseline.")
    c1, c2 = st.columns(2)
    with c1:
        s_prompt = st.text_input("Prompt", ui.prompts_data()["neutral"][1],
                                 key="exp_strength_prompt")
        s_name = ui.concept_select(lab, "exp_strength_concept")
    try:
        s_concept = ui.get_concept(lab, s_name)
    except MlxSteerError as e:
        ui.show_error(e)
        st.stop()
    with c2:
        s_layer = ui.layer_slider(lab, "exp_strength_layer", default=s_concept.layer)
        strengths = st.multiselect("Strengths α", [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5],
                                   default=list(ex.DEFAULT_STRENGTHS), key="exp_strength_values")
        s_tokens = tokens_slider("exp_strength_tokens")
    s_metric = metric_select("exp_strength_metric")
    if st.button("Run strength explorer", type="primary", key="exp_strength_btn",
                 disabled=not strengths):
        recs = run_with_progress(ex.strength_explorer, s_prompt, s_concept, sorted(strengths),
                                 s_layer, max_tokens=s_tokens)
        if recs is not None:
            st.session_state["exp_strength"] = recs
    if st.session_state.get("exp_strength"):
        show_records(st.session_state["exp_strength"], "strength", s_metric, "exp_strength")

with tab_mix:
    st.markdown("Mix concepts as `name:weight` items separated by commas. Each part is also "
                "run alone at the same block and strength, next to the baseline.")
    mixes = ui.prompts_data()["mixes"]

    def set_mix(i: int) -> None:
        st.session_state["exp_mix_spec"] = ", ".join(
            f"{k}:{v:g}" for k, v in mixes[i]["weights"].items())

    cols = st.columns(len(mixes))
    for i, (col, m) in enumerate(zip(cols, mixes)):
        col.button(m["label"], key=f"exp_mix_example_{i}", on_click=set_mix, args=(i,),
                   help=", ".join(f"{k}:{v:g}" for k, v in m["weights"].items()))
    st.session_state.setdefault("exp_mix_spec", "happy:0.7, excited:0.3")
    spec = st.text_input("Concepts and weights", key="exp_mix_spec")
    c1, c2 = st.columns(2)
    with c1:
        m_prompt = st.text_input("Prompt", ui.prompts_data()["neutral"][2], key="exp_mix_prompt")
        normalize = st.checkbox("Normalise the parts first", True, key="exp_mix_normalize")
        save = st.checkbox("Save the mix to the library", False, key="exp_mix_save")
        m_name = st.text_input("Name (optional)", key="exp_mix_name",
                               placeholder="default: mix-happy70-excited30")
    with c2:
        m_alpha = st.slider("Strength α (relative)", 0.0, 1.5, 0.3, 0.05, key="exp_mix_alpha")
        m_layer = ui.layer_slider(lab, "exp_mix_layer", default=int(0.5 * L))
        m_tokens = tokens_slider("exp_mix_tokens")
    m_metric = metric_select("exp_mix_metric")

    parts, problems = [], []
    known = set(lab.concepts.names())
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        n, sep, w = item.partition(":")
        try:
            weight = float(w) if sep else None
        except ValueError:
            weight = None
        if weight is None:
            problems.append(f"“{item}” is not name:weight")
        elif n.strip() not in known:
            problems.append(f"no concept “{n.strip()}” (known: {', '.join(sorted(known))})")
        else:
            parts.append((n.strip(), weight))
    for p in problems:
        st.warning(p)
    if st.button("Run the mix", type="primary", key="exp_mix_btn",
                 disabled=bool(problems) or not parts):
        try:
            loaded = [(ui.get_concept(lab, n), w) for n, w in parts]
            out = run_with_progress(ex.mix, m_prompt, loaded, normalize=normalize,
                                    layer=m_layer, strength=m_alpha, save=save,
                                    name=m_name or None, max_tokens=m_tokens)
            if out is not None:
                mixed, recs = out
                st.session_state["exp_mix"] = recs
                if save:
                    st.success(f"Saved “{mixed.name}”: it is in every page's concept list now.")
        except MlxSteerError as e:
            ui.show_error(e)
    if st.session_state.get("exp_mix"):
        show_bars(st.session_state["exp_mix"], m_metric, "exp_mix")

with tab_methods:
    st.markdown("One concept's pairs extracted again with each method — **mean** difference, "
                "first **pca** component, a **trained** vector (bi-directional preference "
                "objective, slower) — at the concept's block, and each vector applied with "
                "the chosen operation at the same relative strength, as rows of one batched "
                "decode next to the baseline.")
    c1, c2 = st.columns(2)
    with c1:
        v_prompt = st.text_input("Prompt", ui.prompts_data()["neutral"][4],
                                 key="exp_methods_prompt")
        v_name = ui.concept_select(lab, "exp_methods_concept")
        v_methods = st.multiselect("Methods", ["mean", "pca", "trained"],
                                   default=["mean", "pca"], key="exp_methods_methods",
                                   help="“trained” runs a short optimisation first (about "
                                        "a minute per concept on a laptop CPU).")
    with c2:
        v_op = ui.op_select("exp_methods_op")
        v_alpha = st.slider("Strength α (relative)", 0.0, 1.5, 0.3, 0.05,
                            key="exp_methods_alpha", disabled=v_op == "ablate")
        v_tokens = tokens_slider("exp_methods_tokens")
    v_metric = metric_select("exp_methods_metric")
    if st.button("Compare the methods", type="primary", key="exp_methods_btn",
                 disabled=not v_methods):
        try:
            v_concept = ui.get_concept(lab, v_name)
            bar = st.progress(0.0, text="Extracting with each method…")
            recs = run_with_progress(
                ex.method_comparison, v_prompt, v_concept, v_methods, v_alpha, op=v_op,
                extract_progress=ui.progress_callback(bar, "extraction"),
                max_tokens=v_tokens)
            bar.empty()
            if recs is not None:
                st.session_state["exp_methods"] = recs
        except MlxSteerError as e:
            ui.show_error(e)
    if st.session_state.get("exp_methods"):
        show_bars(st.session_state["exp_methods"], v_metric, "exp_methods", ("op",))
