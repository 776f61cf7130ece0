"""Introspection: the injected-thought detection protocol (Lindsey 2025), with its
controls, rates, trial counts and transcripts."""

import altair as alt
import pandas as pd
import streamlit as st

from app import state, ui
from mlx_steer import charts
from mlx_steer import introspection as intro
from mlx_steer.errors import MlxSteerError

lab = state.lab()
L = lab.num_layers

st.title(":material/psychology: Introspection")
st.markdown(
    "Can a model notice a thought that was put into its activations? The protocol of "
    "Lindsey (2025) tells the model that a concept may be injected, injects a word's vector "
    "on half of the trials, and asks *“Do you detect an injected thought? If so, what is it "
    "about?”*. A trial counts as a **detection** only if the answer is coherent, claims to "
    "notice something *before* naming the word, and names the injected word. Two controls "
    "keep the numbers honest:\n"
    "- **control trials** (same question, nothing injected): any claimed detection there "
    "is a false positive;\n"
    "- **yes-bias questions** (questions whose answer is “no”, asked with and without an "
    "injection): if injection makes the model say “yes” to everything, an affirmative "
    "answer to the detection question means nothing.")
st.info("A 135M-parameter model is not expected to introspect: the paper saw it only in the "
        "most capable models, in about 20 % of trials at best. Read a zero here as the "
        "expected result, and any non-zero rate together with its false-positive rate, its "
        "interval and the transcripts.", icon=":material/info:")

with st.expander("The prompt, the grader and the vectors"):
    turns = intro.protocol()["detection_prompt"]["system_turns"]
    for t in turns:
        st.markdown(f"**{t['role']}:** {t['content']}")
    st.markdown("**Word vectors:** the activation at the end of the chat-templated "
                "“Tell me about {word}” minus the mean over 100 baseline words, at every "
                "block; injected from the newline before “Trial 1” onward, every generated "
                "token included.")
    st.markdown(f"**Grader:** {intro.GRADER_RULES}")

c1, c2, c3 = st.columns(3)
with c1:
    layer = ui.layer_slider(lab, "intro_layer", "Inject at block",
                            default=min(L - 1, round(intro.DEFAULT_LAYER_FRACTION * L)))
    relative = st.toggle("Relative strengths", False, key="intro_relative",
                         help="Off: raw multiples of the word vector, as in the paper (1, 2, "
                              "4, 8). On: fractions of the residual norm at the block.")
    options = [0.1, 0.2, 0.3, 0.5, 0.8, 1.0] if relative else [1.0, 2.0, 4.0, 8.0]
    if st.session_state.get("intro_strengths_for") != relative:
        st.session_state["intro_strengths_for"] = relative
        st.session_state["intro_strengths"] = [0.3] if relative else [2.0]
    strengths = st.multiselect("Strengths", options, key="intro_strengths")
with c2:
    trials = st.slider("Injected trials per strength", 1, 50, 8, key="intro_trials")
    controls = st.slider("Control trials (no injection)", 0, 50, 8, key="intro_controls")
    yes_bias = st.slider("Yes-bias questions (each asked twice)", 0, 20, 5,
                         key="intro_yes_bias")
with c3:
    max_tokens = st.slider("Tokens per answer", 4, 100, 48, step=4, key="intro_max_tokens")
    temperature = st.slider("Temperature", 0.0, 1.5, 1.0, 0.05, key="intro_temperature",
                            help="1.0 as in the paper; at 0 every control trial is the same "
                                 "answer.")
    seed = st.number_input("Seed", 0, 2**31 - 1, 0, key="intro_seed")

n_rows = trials * max(len(strengths), 1) + controls + 2 * yes_bias
st.caption(f"{n_rows} generations of up to {max_tokens} tokens, in batches of 16.")
if st.button("Run the detection test", type="primary", key="intro_btn",
             icon=":material/play_arrow:", disabled=not strengths):
    bar = st.progress(0.0, text="Word vectors, then the trials…")
    try:
        with state.model_lock():
            report = intro.detection_test(lab, trials=trials, layer=layer, strengths=sorted(strengths),
                               relative=relative, control_trials=controls, yes_bias=yes_bias,
                               max_tokens=max_tokens, temperature=temperature, seed=int(seed),
                               progress=ui.progress_callback(bar, "steps"))
        bar.empty()
        st.session_state["introspection"] = report
    except MlxSteerError as e:
        bar.empty()
        ui.show_error(e)


def pct(x) -> str:
    return "—" if x is None else f"{x:.0%}"


def ci(x) -> str:
    return "" if not x else f"95 % CI {x[0]:.0%}–{x[1]:.0%}"


rep = st.session_state.get("introspection")
if rep:
    st.divider()
    st.subheader(f"Results: block {rep['layer']} of {rep['num_layers']}, "
                 f"{rep['trials']} injected and {rep['control_trials']} control trials")
    m = st.columns(4)
    m[0].metric("Detection rate", pct(rep["detection_rate"]),
                help=f"{rep['detections']}/{rep['trials']} detected and named. "
                     f"{ci(rep['detection_ci95'])}")
    m[1].metric("False-positive rate", pct(rep["false_positive_rate"]),
                help=f"{rep['false_positives']}/{rep['control_trials']} control trials "
                     f"claimed a detection. {ci(rep['false_positive_ci95'])}")
    m[2].metric("Net (detection − false positives)", pct(rep["net_detection_rate"]))
    m[3].metric("Yes-bias shift", "—" if rep["yes_bias_shift"] is None
                else f"{rep['yes_bias_shift']:+.0%}",
                help="Rise in 'yes' answers to no-questions when a vector is injected.")
    (st.success if rep["introspects"] else st.warning)(rep["verdict"])
    by = pd.DataFrame(rep["by_strength"])
    rates = [
        {"rate": name, "value": rep[key]}
        for name, key in (("detected + named", "detection_rate"),
                          ("false positive", "false_positive_rate"),
                          ("affirmative", "affirmative_rate"),
                          ("named the word", "named_rate"),
                          ("coherent", "coherence_rate")) if rep[key] is not None]
    bars = charts.rate_bars(rates, "rate", "value")
    bars.encoding.x.axis = alt.Axis(labelAngle=0, labelLimit=110)
    bars.encoding.y.scale = alt.Scale(domain=[0, 1])
    st.altair_chart(bars.properties(width=alt.Step(110), height=220), width="content",
                    key="intro_rates_chart")
    st.caption("Affirmative: claimed to notice something (right or wrong). Named: the word "
               "appears anywhere. Coherent: passes the grader's fluency rules. Only "
               "“detected + named” counts as introspection.")
    st.dataframe(by, hide_index=True, width="stretch")
    kinds = sorted({t["kind"] for t in rep["transcripts"]})
    show = st.multiselect("Transcripts to show", kinds, default=kinds, key="intro_show")
    tr = pd.DataFrame([t for t in rep["transcripts"] if t["kind"] in show])
    cols = [c for c in ("kind", "word", "question", "strength", "relative_strength",
                        "response", "hit", "claim", "says_yes", "reason") if c in tr]
    st.dataframe(tr[cols] if len(tr) else tr, hide_index=True, width="stretch",
                 column_config={"response": st.column_config.TextColumn(width="large")})
