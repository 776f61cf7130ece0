"""Playground: baseline and steered side by side, streamed, same seed."""

import pandas as pd
import streamlit as st

from app import state, streaming, ui
from mlx_steer.errors import MlxSteerError

lab = state.lab()
L = lab.num_layers

st.title(":material/sports_esports: Steering playground")

DEMO = {"prompt": "Tell me about artificial intelligence", "concept": "enthusiastic"}


def load_demo() -> None:
    st.session_state["pg_prompt"] = DEMO["prompt"]
    st.session_state["pg_concept"] = DEMO["concept"]
    st.session_state.pop("pg_defaults_for", None)  # recommended block and strength
    st.session_state["pg_relative"] = True


st.session_state.setdefault("pg_prompt", ui.prompts_data()["neutral"][3])
c_prompt, c_demo = st.columns([5, 1], vertical_alignment="bottom")
with c_prompt:
    prompt = st.text_area("Prompt", key="pg_prompt", height=80,
                          placeholder="e.g. Tell me about the weather")
with c_demo:
    st.button("Load demo", icon=":material/auto_awesome:", key="pg_demo_btn", on_click=load_demo,
              help=f"“{DEMO['prompt']}” with “{DEMO['concept']}” at its recommended "
                   "block and strength.")

c1, c2, c3 = st.columns(3)
concept = ui.steering_concept(lab, "pg", c1)
with c1:
    st.caption(concept.description or f"{concept.category} concept")
with c2:
    layer = ui.layer_slider(lab, "pg_layer", default=concept.layer)
with c3:
    strength, relative = ui.strength_controls(concept, layer, "pg")
op = ui.op_select("pg_op")
every = op == "ablate" and st.checkbox(
    "Ablate at every block and the embedding output", True, key="pg_ablate_all",
    help="Off: only at the chosen block. On: every write into the residual stream, as "
         "weight orthogonalisation (`mlx-steer bake --ablate`) does.")

with st.expander("Generation settings"):
    g1, g2, g3, g4 = st.columns(4)
    positions = g1.selectbox("Steer which tokens", list(ui.POSITIONS), key="pg_positions",
                             format_func=ui.POSITIONS.get)
    max_tokens = g2.slider("Max new tokens", 8, 200, 60, step=4, key="pg_max_tokens")
    temperature = g3.slider("Temperature", 0.0, 1.5, 0.0, 0.05, key="pg_temperature",
                            help="0 = greedy. Above 0 both sides sample with the same seed.")
    seed = g4.number_input("Seed", 0, 2**31 - 1, 0, key="pg_seed")

go = st.button("Generate", type="primary", key="pg_generate_btn", disabled=not prompt.strip())
left, right = st.columns(2)
left.markdown("**Without steering**")
right.markdown(f"**With “{concept.name}”**")
slots = (left.empty(), right.empty())
if go:
    try:
        steer = concept.steer("all" if every else layer, strength, relative=relative,
                              positions=positions, op=op)
        base, steered = streaming.stream_pair(lab, prompt, steer, slots, max_tokens, temperature,
                                       int(seed))
        st.session_state["playground"] = {
            "prompt": prompt, "baseline": base, "steered": steered,
            "summary": ui.injection_summary(concept, "all" if every else layer, strength,
                                            relative, positions, L, op),
            "settings": {"max_tokens": max_tokens, "temperature": temperature,
                         "seed": int(seed)}}
    except MlxSteerError as e:
        ui.show_error(e)

res = st.session_state.get("playground")
if res:
    ui.text_box(res["baseline"], slots[0])
    ui.text_box(res["steered"], slots[1])
    if res["prompt"] != prompt:
        st.caption(f"(Outputs for the earlier prompt “{res['prompt']}”.)")
    summ = res["summary"]
    with st.container(border=True):
        st.markdown("**Injection summary**")
        st.dataframe(pd.DataFrame([summ]), hide_index=True, width="stretch")
        st.caption(
            f"Same prompt tokens and the same seed on both sides "
            f"({'greedy' if res['settings']['temperature'] == 0 else 'sampled'}), so the "
            "difference comes from the vector alone. What to look for: the concept's tone "
            "or topic in the right-hand text while it stays fluent. If nothing changes, "
            "raise α or move to a later block; if the text falls apart, lower α.")
else:
    ui.empty_boxes(slots, "press Generate")
