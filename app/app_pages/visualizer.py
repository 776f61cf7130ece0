"""Visualizer: projection heat-maps (baseline, steered, difference) on the same tokens,
a concept map and the concepts' cosine matrix."""

import streamlit as st

from app import state, ui
from mlx_steer import charts, lens
from mlx_steer.errors import MlxSteerError

lab = state.lab()
L = lab.num_layers

st.title(":material/biotech: Activation visualizer")
st.markdown(
    "How strongly does each token's activation point along the concept direction, block by "
    "block? The steered continuation is generated first; then **the same tokens** are run "
    "through the model with and without the vector, and each block's output is measured "
    "**after** the injection. So the difference panel shows only what the vector did — "
    "not two different samples.")

c1, c2, c3 = st.columns(3)
with c1:
    prompt = st.text_input("Prompt", "The meeting went", key="viz_prompt")
concept = ui.steering_concept(lab, "viz", c1)
with c2:
    layer = ui.layer_slider(lab, "viz_layer", "Inject at block", default=concept.layer)
    max_tokens = st.slider("Tokens to generate", 4, 64, 24, step=4, key="viz_max_tokens")
with c3:
    strength, relative = ui.strength_controls(concept, layer, "viz")
    t1, t2 = st.columns(2)
    temperature = t1.slider("Temperature", 0.0, 1.5, 0.0, 0.05, key="viz_temperature")
    seed = t2.number_input("Seed", 0, 2**31 - 1, 0, key="viz_seed")

if st.button("Visualize activations", icon=":material/visibility:", type="primary", key="viz_btn"):
    bar = st.progress(0.0, text="Generating baseline and steered continuations…")
    try:
        steer = concept.steer(layer, strength, relative=relative)
        with state.model_lock():
            run = lens.projection_run(lab, prompt, steer, concept.vectors, max_tokens,
                                      temperature, int(seed),
                                      progress=ui.progress_callback(bar, "decoding"))
        bar.progress(1.0, text="Replayed the steered tokens with and without the vector")
        st.session_state["viz"] = {"run": run, "concept": concept.name,
                                   "summary": ui.injection_summary(
                                       concept, layer, strength, relative, "all", L)}
    except MlxSteerError as e:
        bar.empty()
        ui.show_error(e)

res = st.session_state.get("viz")
if res:
    run: lens.ProjectionRun = res["run"]
    a, b = st.columns(2)
    a.markdown("**Unsteered output**")
    with a:
        ui.text_box(run.baseline_text)
    b.markdown(f"**Steered output** (“{res['concept']}”, block {run.layer}, "
               f"α {res['summary']['alpha']:g})")
    with b:
        ui.text_box(run.steered_text)
    show_template = st.checkbox("Show the chat-template tokens too", key="viz_show_template")
    start = 1 if show_template else run.first_shown
    base, steered, labels = run.window(start)
    trip = charts.heatmap_triptych(base, steered, labels, injection_layer=run.layer,
                                   diverging=True)
    titles = ["Unsteered: projection on the concept direction",
              "Steered (same tokens): projection on the concept direction",
              "Steered − unsteered"]
    for i, (panel, title) in enumerate(zip(trip.hconcat, titles)):
        ui.chart(panel.properties(title=title, width="container", height=max(180, 9 * L)),
                 key=f"viz_heatmap_{i}")
    st.caption(
        f"Each cell is ⟨h, v̂⟩: block output h at that token, projected on the concept's "
        f"unit vector *of that block*. Rows are blocks (the dashed line marks the injection "
        f"block {run.layer}), columns are tokens: the prompt, the template's turn markers, "
        "then the steered continuation (both rows use exactly these tokens). Position 0 is "
        "left out (attention sink). Below the injection block the difference is exactly 0; "
        f"at it, every steered token moves by exactly ‖injected‖ = "
        f"{res['summary']['‖injected‖']:g}; above it you see how the model carries (or "
        "washes out) the push. A large projection is evidence that the direction is "
        "present, not proof of what the model “thinks”.")

st.divider()
st.subheader("Concept map")
st.markdown("All concepts' vectors at one block: a 2-D PCA of their directions (unit "
            "vectors, same block for all — not mixed with activations or other blocks) and "
            "their pairwise cosine similarities.")
ready = [n for n in lab.concepts.names() if ui.concept_ready(lab, n)]
missing = [n for n in lab.concepts.builtins() if not ui.concept_ready(lab, n)]
if st.session_state.get("viz_map_ready") != ready:  # new concepts: offer them all again
    st.session_state["viz_map_ready"] = ready
    st.session_state.pop("viz_map_concepts", None)
m1, m2 = st.columns([3, 1], vertical_alignment="bottom")
with m1:
    chosen = st.multiselect("Concepts", ready, default=ready, key="viz_map_concepts")
with m2:
    if missing and st.button(f"Extract the {len(missing)} missing built-ins",
                             key="viz_builtins_btn"):
        bar = st.progress(0.0, text="Extracting built-in concepts…")
        with state.model_lock():
            lab.ensure_builtins(progress=ui.progress_callback(bar, "concepts"))
        bar.empty()
        st.session_state.pop("viz_map_concepts", None)
        st.rerun()
map_layer = ui.layer_slider(lab, "viz_map_layer", "Block", default=layer)
if len(chosen) < 2:
    st.info("Choose at least two concepts (extract the built-ins, or make your own in the "
            "Concept creator).")
else:
    with state.model_lock():
        vectors = {n: lab.concept(n).vectors[map_layer] for n in chosen}
    space = lens.concept_space(vectors)
    st.session_state["viz_map"] = {"layer": map_layer, **space}
    c_map, c_cos = st.columns([1, 1])
    with c_map:
        ui.chart(charts.concept_map_padded(
            space["points"], space["names"],
            highlight=concept.name if concept.name in chosen else None), key="viz_map_chart")
        st.caption(f"PC1 and PC2 explain {space['explained'][0]:.0%} and "
                   f"{space['explained'][1]:.0%} of the variance of the directions. "
                   f"Red: the concept chosen above. Scroll to zoom, drag to pan.")
    with c_cos:
        st.altair_chart(charts.cosine_heatmap(space["cosine"], space["names"]),
                        key="viz_cos_chart")
        cos, names = space["cosine"], space["names"]
        pairs = [(float(cos[i, j]), names[i], names[j]) for i in range(len(names))
                 for j in range(i + 1, len(names))]
        hi, lo = max(pairs), min(pairs)
        st.caption(f"Mean cosine between different concepts: "
                   f"{space['mean_offdiag_cosine']:.2f}. Most alike: {hi[1]} and {hi[2]} "
                   f"({hi[0]:.2f}); least alike: {lo[1]} and {lo[2]} ({lo[0]:.2f}). "
                   "Contrast pairs that share a template (e.g. the emotions' “I feel …” "
                   "sentences) also share a direction, so cosines are not pure meaning.")
