"""Home: what steering is, a one-click demo, the learning path."""

import streamlit as st

from app import state, streaming, ui
from mlx_steer.errors import MlxSteerError

lab = state.lab()

st.title(":material/explore: mlx-steer lab")
st.markdown(
    "**Activation steering** changes what a language model writes without changing its "
    "weights or its prompt: while the model runs, a *concept vector* (a direction such as "
    "“happy” or “pirate”) is **added** to its residual stream after one decoder block,\n\n"
    "$$h_\\ell \\leftarrow h_\\ell + \\alpha \\cdot \\operatorname{median}\\lVert h_\\ell\\rVert"
    " \\cdot \\hat v_\\ell$$\n\n"
    "where α is the *relative strength*: the size of the push as a fraction of a typical "
    "token's activation at that block. Everything on these pages is computed live from "
    f"the loaded model — **{lab.name}**, {lab.num_layers} blocks, hidden size "
    f"{lab.hidden_size}.")

st.subheader("Try it: the same prompt, without and with “happy”")
neutral = ui.prompts_data()["neutral"]
prompt = st.text_input("A neutral prompt", value=neutral[0], key="home_prompt")
go = st.button("Run the demo", icon=":material/play_arrow:", type="primary", key="home_demo_btn",
               help="Greedy decoding, so both columns start from exactly the same place.")

left, right = st.columns(2)
left.markdown("**Without steering**")
right.markdown("**With “happy”**")
slots = (left.empty(), right.empty())
result = st.session_state.get("home_demo")
if go:
    try:
        concept = ui.get_concept(lab, "happy")
        steer = concept.steer()
        base, steered = streaming.stream_pair(lab, prompt, steer, slots,
                                       max_tokens=st.session_state.get("home_max_tokens", 48))
        result = {"prompt": prompt, "baseline": base, "steered": steered,
                  "layer": concept.layer, "alpha": concept.strength}
        st.session_state["home_demo"] = result
    except MlxSteerError as e:
        ui.show_error(e)
if result:
    ui.text_box(result["baseline"], slots[0])
    ui.text_box(result["steered"], slots[1])
    st.caption(f"“happy” added after block {result['layer']} at α = {result['alpha']:g} "
               "(its default, chosen by calibration: the strongest setting that still keeps "
               "the text fluent). Same prompt tokens, greedy decoding: every "
               "difference comes from the injected vector.")
else:
    ui.empty_boxes(slots, "press Run the demo")

st.subheader("Learning path")
c1, c2 = st.columns(2)
TOUR = [("learn", "1 · Learn: what each layer does, the logit lens, why we add", "school"),
        ("playground", "2 · Playground: steer any prompt with any concept", "sports_esports"),
        ("concept_creator", "3 · Concept creator: make your own concept from contrast pairs",
         "palette"),
        ("visualizer", "4 · Visualizer: watch the concept inside the model", "biotech"),
        ("experiments", "5 · Experiments: sweep layers and strengths, mix concepts",
         "science"),
        ("introspection", "6 · Introspection: can the model notice an injected thought?",
         "psychology"),
        ("library", "7 · Library: inspect, mix, import and export concepts", "library_books")]
for i, (page, label, icon) in enumerate(TOUR):
    with (c1 if i < 4 else c2):
        st.page_link(f"app_pages/{page}.py", label=label, icon=f":material/{icon}:")

with st.expander("Tips & tricks"):
    st.markdown(
        "1. Start in the middle-to-late blocks (about 40–75 % of the depth); every concept "
        "comes with a measured recommended block.\n"
        "2. Start from the recommended relative strength α (0.1–0.5 is the useful band), "
        "then move it in small steps.\n"
        "3. Match the baseline: a contrast pair should differ only in the concept.\n"
        "4. Be systematic: change one thing at a time — block, strength or prompt.\n"
        "5. Always compare with the unsteered text; the lab runs both with the same seed.\n"
        "6. Mix carefully: normalised mixes keep the size, raw sums can grow large.\n"
        "7. Clear, concrete concepts (an emotion, a voice) steer better than vague ones.\n"
        "8. Try several prompts: one prompt is an anecdote, not a result.\n"
        "9. Near α = 1 the vector dominates and the text becomes incoherent — that is the "
        "model breaking, not the concept getting stronger.\n"
        "10. Try opposing concepts (or a negative strength) at different blocks.")
