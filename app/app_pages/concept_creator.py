"""Concept creator: contrast pairs in, a concept for every layer out, previewed and saved."""

import streamlit as st

from app import state, streaming, ui
from app.uploads import MAX_PAIRS
from mlx_steer import charts, lens, pairs as pair_files
from mlx_steer.catalogue import builtin_spec
from mlx_steer.errors import MlxSteerError

lab = state.lab()
L = lab.num_layers

st.title(":material/palette: Concept creator")
st.markdown(
    "A concept is extracted from **contrast pairs**: two texts that differ *only* in the "
    "concept (same topic, similar length). For every block the lab averages "
    "*activation(positive) − activation(negative)* over the pairs, then measures the block "
    "where the pairs separate best and the strongest relative strength that keeps the "
    "next-token distribution within 1 nat of the unsteered model.")


c1, c2 = st.columns([2, 3])
with c1:
    name = st.text_input("Concept name", placeholder="e.g. cheerful", key="creator_name",
                         help="1–64 lowercase letters, digits, '_' or '-'.")
    method = st.selectbox("Method", ["mean", "pca", "classic", "trained"],
                          key="creator_method",
                          help="mean: mean of the pair differences (CAA). pca: first principal "
                               "component of the differences (RepE). classic: the first pair "
                               "only, last token (the original lab's method). trained: a "
                               "vector optimised at the recommended block with a "
                               "bi-directional preference objective (BiPO-style; minutes).")
    read = st.selectbox("Read activations at", ["last", "mean"], key="creator_read",
                        format_func={"last": "the last token", "mean": "the mean over tokens "
                                     "(position 0 excluded)"}.get)
    chat = st.checkbox("Wrap texts in the chat template", key="creator_chat")
    example = st.selectbox("Load an example", ["—", "happy", "pirate", "formal", "brief"],
                           key="creator_example")

    def load_example() -> None:
        ex = st.session_state["creator_example"]
        spec = builtin_spec(ex)
        st.session_state["creator_pairs"] = "\n".join(f"{p} | {n}" for p, n in spec["pairs"])
        st.session_state["creator_name"] = f"my_{ex}"

    st.button("Load example pairs", key="creator_example_btn", disabled=example == "—",
              on_click=load_example)
with c2:
    st.text_area("Pairs — one per line: positive | negative", height=260, key="creator_pairs",
                 placeholder="I feel so joyful today! | I feel so-so today.\n"
                             "What a wonderful party! | What a party.")
    upload = st.file_uploader("…or upload pairs (JSON, JSONL, CSV/TSV, TXT; ≤ 1 MiB)",
                              type=["json", "jsonl", "csv", "tsv", "txt"], key="creator_upload")

with st.expander("Tips for good concepts"):
    st.markdown(
        "- Write pairs that differ **only** in the concept: same topic, same length, same "
        "structure (“The dinner was lovely and I was so glad” | “The dinner was ordinary "
        "and I was fine”).\n"
        "- Use many pairs (10 or more) on varied topics, so that the topics cancel out.\n"
        "- Keep the concept strong and unambiguous on the positive side.\n"
        "- Check the preview: a recommended block in the middle of the model and promoted "
        "tokens that fit the concept are good signs; then try it before saving.")

pairs: list[tuple[str, str]] = []
problems: list[str] = []
try:
    pairs = pair_files.parse_lines(st.session_state.get("creator_pairs", ""))
except ValueError as e:
    problems.append(str(e))
if upload is not None:
    try:
        pairs += pair_files.parse_bytes(upload.getvalue(), upload.name,
                                        limit=pair_files.MAX_BYTES)
    except ValueError as e:  # every parse error is typed (InvalidArgument/CorruptFile)
        problems.append(f"{upload.name}: {e}")
if len(pairs) > MAX_PAIRS:
    problems.append(f"{len(pairs)} pairs; the limit is {MAX_PAIRS}")
for p in problems:
    st.warning(p)
st.caption(f"{len(pairs)} pair(s) ready." + (" More pairs (10+) give cleaner vectors."
                                              if 0 < len(pairs) < 8 else ""))

if st.button("Extract concept", type="primary", key="creator_extract_btn",
             disabled=not pairs or bool(problems)):
    bar = st.progress(0.0, text="Reading activations…")
    try:
        with state.model_lock():
            concept = lab.extract(name, pairs, method=method, read=read, chat=chat,
                                  progress=ui.progress_callback(bar, "texts through the model"),
                                  description=f"made in the lab from {len(pairs)} pairs")
        bar.progress(1.0, text="Extracted")
        st.session_state["creator_concept"] = concept
        st.session_state.pop("creator_saved", None)
        st.session_state.pop("creator_try", None)
    except MlxSteerError as e:
        bar.empty()
        ui.show_error(e)

concept = st.session_state.get("creator_concept")
if concept is not None and concept.model_fingerprint != lab.fingerprint:
    concept = None  # made for another model
if concept is not None:
    st.divider()
    st.subheader(f"Preview: “{concept.name}”")
    m = st.columns(4)
    m[0].metric("Recommended block", concept.layer,
                help=lens.layer_stage(concept.layer, L)["title"])
    m[1].metric("Recommended α", f"{concept.strength:g}")
    m[2].metric("‖v‖ at that block", f"{concept.vector_norm(concept.layer):.1f}")
    m[3].metric("Pairs", len(concept.pairs))
    v = concept.vectors[concept.layer].astype(float)
    st.caption(f"At block {concept.layer}: mean {v.mean():.3f}, std {v.std():.3f}, "
               f"min {v.min():.3f}, max {v.max():.3f}; {100 * (abs(v) < 0.01).mean():.1f} % of "
               f"the {v.size} components are below 0.01 in size.")
    rel = [{"layer": i, "value": concept.vector_norm(i) / float(concept.norms[i]),
            "series": "‖v‖ / median‖h‖"} for i in range(L)]
    scores = concept.extra.get("layer_scores")
    if scores and len(pairs) > 1:
        top = max(scores) or 1.0
        rel += [{"layer": i, "value": s / top, "series": "separation (scaled)"}
                for i, s in enumerate(scores)]
    ui.chart(charts.metric_chart(rel, "layer", "value", color="series"),
             key="creator_norm_chart")
    st.caption("‖v‖ / median‖h‖: how big the concept direction is next to a typical "
               "activation at each block. Separation: how well the positive and negative "
               "texts separate along the vector (the best block within 30–70 % of the depth is "
               "kept as a fallback; the defaults come from the calibration below).")

    ui.calibration_view(concept, "creator_calibration")

    lens_layer = ui.layer_slider(lab, "creator_lens_layer", "Logit lens of the vector at block",
                                 default=int(0.85 * L))
    vl = lens.vector_lens(lab, concept.vectors[lens_layer], k=10)
    ui.chart(charts.grouped_bars([{**r, "score": abs(r["score"])} for r in vl], "token",
                                 "score", "direction",
                                 f"Tokens the vector promotes and suppresses at block "
                                 f"{lens_layer}"), key="creator_lens_chart")
    st.caption("Unembedding of the vector (final-norm gain applied): meaningful mostly in "
               "the last fifth of the blocks; earlier blocks give fragments.")

    with st.expander("Try it before saving"):
        t_prompt = st.text_input("Prompt", ui.prompts_data()["neutral"][0],
                                 key="creator_try_prompt")
        if st.button("Generate with the concept", key="creator_try_btn"):
            try:
                st.session_state["creator_try"] = streaming.stream_one(
                    lab, t_prompt, concept.steer(),
                    st.session_state.get("creator_try_tokens", 40))
            except MlxSteerError as e:
                ui.show_error(e)
        elif st.session_state.get("creator_try"):
            ui.text_box(st.session_state["creator_try"])

    if st.session_state.get("creator_saved"):
        st.success(f"Saved “{concept.name}”: it is now in every page's concept list.")
    else:
        overwrite = True
        if concept.name in lab.concepts.names():
            overwrite = st.checkbox(f"“{concept.name}” already exists: replace it",
                                    key="creator_overwrite")
        if st.button("Save to library", icon=":material/save:", key="creator_save_btn",
                     disabled=not overwrite):
            try:
                st.session_state["creator_saved"] = str(lab.save_concept(concept))
                st.rerun()
            except MlxSteerError as e:
                ui.show_error(e)
