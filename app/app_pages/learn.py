"""Learn: the layer explorer, logit lens, embeddings vs activations, add vs replace,
strength and baseline lessons, and a quiz — all computed from the loaded model."""

import numpy as np
import pandas as pd
import streamlit as st

from app import state, ui
from mlx_steer import activations, charts, lens, metrics
from mlx_steer.errors import MlxSteerError

lab = state.lab()
L = lab.num_layers

st.title(":material/school: Learn")
st.caption(f"Every number and chart here is computed from **{lab.name}** as you read.")

(tab_layers, tab_lens, tab_emb, tab_add, tab_strength, tab_base, tab_quiz) = st.tabs(
    ["Layers", "Logit lens", "Activations vs embeddings", "Why add?", "Strength",
     "Baselines", "Quiz"])

# ---- layers ---------------------------------------------------------------------
with tab_layers:
    st.subheader("What each depth does")
    layer = ui.layer_slider(lab, "learn_layer", "Select a block", default=int(0.6 * L))
    stage = lens.layer_stage(layer, L)
    bands = lens.depth_bands(L)
    ui.chart(charts.depth_band_chart(bands, layer), key="learn_bands_chart")
    c1, c2 = st.columns([3, 2])
    with c1:
        st.markdown(f"### {ui.STAGE_ICONS[stage['key']]} Block {layer} / {L - 1}: {stage['title']}")
        st.markdown(f"**What happens here.** {stage['what']}\n\n"
                    f"**Steering here.** {stage['effect']}")
    with c2:
        st.dataframe(pd.DataFrame([{"band": b["key"],
                                    "blocks": f"{b['first']}–{b['last']}",
                                    "role": b["title"]} for b in bands]),
                     hide_index=True, width="stretch")
    st.markdown("#### The residual stream grows with depth")
    neutral = ui.prompts_data()["neutral"]
    norms = state.memo(lab, ("residual_norms",), lambda: activations.residual_norms(lab, neutral, chat=False))
    st.session_state["learn_norms"] = norms
    ui.chart(charts.norm_per_layer(norms, "Median token norm ‖h‖ after each block "
                                   "(position 0 excluded)"), key="learn_norm_chart")
    growth = (norms[-1] / norms[0]) ** (1 / max(L - 1, 1))
    st.markdown(
        f"Over {len(neutral)} neutral prompts the typical activation grows from "
        f"**{norms[0]:.0f}** after block 0 to **{norms[-1]:.0f}** after block {L - 1} "
        f"(×{growth:.3f} per block on average; at block {layer}: **{norms[layer]:.0f}**). "
        "A fixed vector is therefore a big push early and a whisper late — which is why "
        "the lab measures strength **relative** to this norm. Position 0 is left out: it "
        "is the attention sink, with activations hundreds of times larger than any other "
        "token's.")

# ---- logit lens --------------------------------------------------------------------
with tab_lens:
    st.subheader("What would the model say if it stopped here?")
    st.markdown("The **logit lens** applies the model's final norm and unembedding to the "
                "output of every block at the last position: the top tokens show how the "
                "prediction forms with depth.")
    lens_prompt = st.text_input("Prompt", "The capital of France is", key="learn_lens_prompt")
    k = st.slider("Top tokens per block", 1, 8, 5, key="learn_lens_k")
    try:
        recs = state.memo(lab, ("logit_lens", lens_prompt, k),
                          lambda: lens.logit_lens(lab, lens_prompt, k=k))
        ui.chart(charts.logit_lens_chart(recs), key="learn_lens_chart")
        top = [r for r in recs if r["rank"] == 1]
        first = next((r for r in top if r["token_id"] == top[-1]["token_id"]), top[-1])
        st.markdown(f"The final prediction **{top[-1]['token']!r}** "
                    f"(p = {top[-1]['prob']:.2f}) first becomes the top token at block "
                    f"**{first['layer']}**. Early blocks mostly predict generic tokens: the "
                    "answer is assembled in the middle and late blocks.")
    except MlxSteerError as e:
        ui.show_error(e)

# ---- embeddings vs activations -------------------------------------------------------
with tab_emb:
    st.subheader("Activations are contextual; embeddings are not")
    st.markdown("An **embedding** is a fixed row of a table: the same token always gets the "
                "same vector. An **activation** is what the model computes from the token "
                "*and its context*. Steering acts on activations.")
    c1, c2, c3 = st.columns(3)
    word = c1.text_input("Word", "bank", key="learn_emb_word")
    ctx_a = c2.text_input("Context A", "I sat on the river bank and watched the water.",
                          key="learn_emb_a")
    ctx_b = c3.text_input("Context B", "I deposited my salary at the bank this morning.",
                          key="learn_emb_b")
    emb_layer = ui.layer_slider(lab, "learn_emb_layer", "Compare at block", default=L // 2)
    if st.button("Compare", key="learn_emb_btn", type="primary"):
        try:
            with state.model_lock():
                st.session_state["learn_emb"] = lens.embedding_vs_activation(
                    lab, word, ctx_a, ctx_b, emb_layer)
        except (MlxSteerError, ValueError) as e:
            ui.show_error(e)
    res = st.session_state.get("learn_emb")
    if res:
        m1, m2 = st.columns(2)
        m1.metric(f"Embedding cosine of {res['token']!r}", f"{res['embedding_cosine']:.3f}",
                  help="Identical rows of the embedding table.")
        m2.metric(f"Activation cosine after block {res['layer']}",
                  f"{res['activation_cosine']:.3f}",
                  delta=f"{res['activation_cosine'] - res['embedding_cosine']:.3f}")
        ui.chart(charts.metric_chart(res["records"], "layer", "cosine"),
                 key="learn_emb_chart")
        st.caption("Layer −1 is the input embedding (cosine exactly 1). Every block mixes in "
                   "context, so the same token drifts apart in the two sentences.")

# ---- add vs replace ------------------------------------------------------------------
with tab_add:
    st.subheader("Why we add a vector instead of replacing the activation")
    st.markdown("Steering computes **h ← h + α·median‖h‖·v̂**: the original activation — "
                "everything the model knows about the prompt so far — is kept, and nudged. "
                "Replacing h with the vector throws that information away. Try both:")
    c1, c2 = st.columns(2)
    with c1:
        add_name = ui.concept_select(lab, "learn_add_concept")
        add_prompt = st.text_input("Prompt", ui.prompts_data()["neutral"][0],
                                   key="learn_add_prompt")
    with c2:
        add_layer = ui.layer_slider(lab, "learn_add_layer", default=int(0.5 * L))
        add_alpha = st.slider("α (size of the vector, relative)", 0.05, 1.0, 0.3, 0.05,
                              key="learn_add_alpha")
    if st.button("Demonstrate", key="learn_add_btn", type="primary"):
        try:
            concept = ui.get_concept(lab, add_name)
            with st.status("Three greedy continuations (replacing needs two full passes "
                           "per token)…") as status, state.model_lock():
                st.session_state["learn_add"] = lens.add_vs_replace(
                    lab, add_prompt, concept.vectors[add_layer], add_layer, add_alpha,
                    max_tokens=st.session_state.get("learn_add_tokens", 10))
                status.update(label="Unsteered, added and replaced: done", state="complete")
        except MlxSteerError as e:
            ui.show_error(e)
    res = st.session_state.get("learn_add")
    if res:
        cols = st.columns(3)
        titles = {"baseline": "Unsteered", "add": "Add (steering)", "replace": "Replace"}
        for col, mode in zip(cols, ("baseline", "add", "replace")):
            with col:
                st.markdown(f"**{titles[mode]}**")
                ui.text_box(res[mode]["text"])
                st.metric("Next-token KL from unsteered", f"{res[mode]['kl']:.2f} nats")
        ui.chart(charts.grouped_bars(res["records"], "token", "prob", "mode",
                                     "Top next tokens at the first generated step"),
                 key="learn_add_chart")
        st.caption(f"Both interventions use a vector of norm {res['injected_norm']:.0f} "
                   f"(α = {res['alpha']:g} of the median norm {res['norm']:.0f} at block "
                   f"{res['layer']}), at every position except 0. Adding shifts the "
                   "distribution; replacing destroys it.")

# ---- strength ----------------------------------------------------------------------
with tab_strength:
    st.subheader("Strength: a fraction of the residual norm")
    st.markdown("| α | what usually happens |\n|---|---|\n"
                "| 0.05–0.1 | subtle or no visible change |\n"
                "| 0.1–0.5 | the useful band: the concept shows, the text stays fluent |\n"
                "| 0.5–1 | strong; repetitions and odd words start |\n"
                "| ≥ 1 | the vector dominates: incoherent text |")
    c1, c2 = st.columns(2)
    with c1:
        s_name = ui.concept_select(lab, "learn_strength_concept")
    with c2:
        s_prompt = st.text_input("Prompt", ui.prompts_data()["neutral"][1],
                                 key="learn_strength_prompt")
    if st.button("Run a strength sweep", key="learn_strength_btn", type="primary"):
        try:
            concept = ui.get_concept(lab, s_name)
            alphas = [0.0, 0.1, 0.25, 0.5, 1.0]
            bar = st.progress(0.0, text="Generating all strengths in one batch…")
            rows = [(s_prompt, concept.steer(strength=a) if a else None) for a in alphas]
            with state.model_lock():
                texts = lab.generate_batch(
                    rows, max_tokens=st.session_state.get("learn_strength_tokens", 32),
                    progress=ui.progress_callback(bar, "decoding"))
            bar.empty()
            st.session_state["learn_strength"] = [
                {"alpha": a, "layer": concept.layer, "text": t,
                 "sentiment": metrics.sentiment(t), "distinct-2": metrics.distinct_n(t, 2)}
                for a, t in zip(alphas, texts)]
        except MlxSteerError as e:
            ui.show_error(e)
    res = st.session_state.get("learn_strength")
    if res:
        st.dataframe(pd.DataFrame(res), hide_index=True, width="stretch",
                     column_config={"text": st.column_config.TextColumn(width="large")})
        ui.chart(charts.metric_chart(res, "alpha", "distinct-2"), key="learn_strength_chart")
        st.caption(f"At block {res[0]['layer']}. distinct-2 (share of distinct word pairs) "
                   "falls when the text starts repeating itself.")

# ---- baselines -----------------------------------------------------------------------
with tab_base:
    st.subheader("The baseline decides what the vector means")
    st.markdown("A concept vector is *positive minus baseline*. If the baseline differs from "
                "the positive text in more than the concept (topic, length, punctuation), "
                "that difference is in the vector too. Compare one pair with a matched and "
                "with a mismatched baseline against the built-in concept:")
    c1, c2, c3 = st.columns(3)
    pos = c1.text_input("Positive", "I feel absolutely joyful and wonderful!",
                        key="learn_base_pos")
    matched = c2.text_input("Matched baseline", "I feel neutral today.",
                            key="learn_base_matched")
    mismatched = c3.text_input("Mismatched baseline", "The train to Paris leaves at noon.",
                               key="learn_base_mismatched")
    b_name = ui.concept_select(lab, "learn_base_concept", "Compare with")
    if st.button("Compare baselines", key="learn_base_btn", type="primary"):
        try:
            ref = ui.get_concept(lab, b_name)
            with state.model_lock():
                h = lab.hidden_states_batch([pos, matched, mismatched])
            v_match = h[0][:, -1] - h[1][:, -1]
            v_mis = h[0][:, -1] - h[2][:, -1]
            rows = []
            for i in range(L):
                cm = metrics.cosine_matrix(np.stack([ref.vectors[i], v_match[i], v_mis[i]]))
                rows.append({"layer": i, "cosine": float(cm[0, 1]), "baseline": "matched"})
                rows.append({"layer": i, "cosine": float(cm[0, 2]), "baseline": "mismatched"})
            st.session_state["learn_base"] = {"records": rows, "concept": b_name}
        except MlxSteerError as e:
            ui.show_error(e)
    res = st.session_state.get("learn_base")
    if res:
        ui.chart(charts.metric_chart(res["records"], "layer", "cosine", color="baseline"),
                 key="learn_base_chart")
        mean = pd.DataFrame(res["records"]).groupby("baseline")["cosine"].mean()
        st.markdown(f"Mean cosine with the built-in “{res['concept']}” (built from many "
                    f"pairs): matched **{mean.get('matched', float('nan')):.2f}**, "
                    f"mismatched **{mean.get('mismatched', float('nan')):.2f}**. One pair "
                    "is noisy; the built-ins average many matched pairs.")

# ---- quiz ------------------------------------------------------------------------------
with tab_quiz:
    st.subheader("Check yourself")
    quiz = ui.prompts_data()["quiz"]
    with st.form("learn_quiz_form"):
        answers = [st.radio(q["question"], q["options"], index=None, key=f"learn_quiz_{i}")
                   for i, q in enumerate(quiz)]
        submitted = st.form_submit_button("Check answers")
    if submitted:
        score = sum(a == q["options"][q["answer"]] for a, q in zip(answers, quiz))
        st.session_state["learn_quiz_score"] = score
        st.markdown(f"**{score} / {len(quiz)}**")
        for i, (a, q) in enumerate(zip(answers, quiz), start=1):
            ok = a == q["options"][q["answer"]]
            (st.success if ok else st.warning)(
                f"{i}. {q['options'][q['answer']]} — {q['explanation']}")
