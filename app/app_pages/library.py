"""Library: list, inspect, delete, mix, import and export concepts (GGUF control vectors)."""

import tempfile
from datetime import datetime
from pathlib import Path

import pandas as pd
import streamlit as st

from app import state, ui, uploads
from mlx_steer import Concept, charts, lens
from mlx_steer.catalogue import builtin_spec
from mlx_steer.concept import validate_name
from mlx_steer.errors import MlxSteerError

MAX_GGUF = uploads.MAX_GGUF

lab = state.lab()
L = lab.num_layers

st.title(":material/library_books: Concept library")
st.caption(f"Concepts for **{lab.name}** (fingerprint {lab.fingerprint[:12]}). Concepts made "
           "for another model are refused, never silently misapplied.")


def row(name: str) -> dict:
    ready = ui.concept_ready(lab, name)
    saved = name in lab.library
    out = {"name": name, "source": "library" if saved else "built-in",
           "status": "ready" if ready else "not extracted yet"}
    if not ready and name in lab.concepts.builtins():
        spec = builtin_spec(name)
        out.update(category=spec.get("category"), pairs=len(spec.get("pairs", [])))
    if ready:
        try:
            c = lab.concept(name)
            out.update(category=c.category, method=c.method, block=c.layer,
                       alpha=round(c.strength, 3), pairs=len(c.pairs),
                       created=datetime.fromtimestamp(c.created).strftime("%Y-%m-%d %H:%M"))
        except MlxSteerError as e:
            out["status"] = f"unreadable: {e}"
    return out


names = lab.concepts.names()
table = [row(n) for n in names]
st.session_state["library_table"] = table
st.dataframe(pd.DataFrame(table), hide_index=True, width="stretch")
missing = [r["name"] for r in table if r["status"] == "not extracted yet"]
if missing and st.button(f"Extract the {len(missing)} missing built-ins now",
                         key="lib_builtins_btn",
                         help="Otherwise each is extracted the first time it is used."):
    bar = st.progress(0.0, text="Extracting built-in concepts…")
    with state.model_lock():
        lab.ensure_builtins(progress=ui.progress_callback(bar, "concepts"))
    bar.empty()
    st.rerun()

tab_inspect, tab_mix, tab_import, tab_export, tab_delete = st.tabs(
    ["Inspect", "Mix", "Import GGUF", "Export GGUF", "Delete"])

with tab_inspect:
    name = ui.concept_select(lab, "lib_inspect")
    if st.button("Inspect", key="lib_inspect_btn") or st.session_state.get("lib_shown") == name:
        try:
            c = ui.get_concept(lab, name)
            st.session_state["lib_shown"] = name
            st.markdown(f"**{c.name}** — {c.description or c.category}")
            m = st.columns(4)
            m[0].metric("Recommended block", c.layer)
            m[1].metric("Recommended α", f"{c.strength:g}")
            m[2].metric("Method", c.method)
            m[3].metric("Pairs", len(c.pairs))
            recs = [{"layer": i, "‖v‖ / median‖h‖": c.vector_norm(i) / float(c.norms[i])}
                    for i in range(L)]
            ui.chart(charts.metric_chart(recs, "layer", "‖v‖ / median‖h‖"),
                     key="lib_inspect_chart")
            ui.calibration_view(c, "lib_calibration")
            vl = lens.vector_lens(lab, c.vectors[min(L - 1, int(0.85 * L))], k=8)
            st.markdown("Tokens promoted at block "
                        f"{min(L - 1, int(0.85 * L))}: " + ", ".join(
                            f"`{r['token'].strip() or repr(r['token'])}`" for r in vl
                            if r["direction"] == "promotes"))
            if c.pairs:
                with st.expander(f"The {len(c.pairs)} contrast pairs"):
                    st.dataframe(pd.DataFrame(c.pairs, columns=["positive", "negative"]),
                                 hide_index=True, width="stretch")
        except MlxSteerError as e:
            ui.show_error(e)

with tab_mix:
    st.markdown("A mix is a weighted sum of concepts, block by block. With *normalise*, each "
                "vector is first scaled to unit length so weights are shares, and the result "
                "gets the weighted mean of the parts' sizes.")
    examples = ui.prompts_data()["mixes"]

    def use_example(i: int) -> None:
        w = examples[i]["weights"]
        st.session_state["lib_mix_table"] = pd.DataFrame(
            {"concept": list(w), "weight": list(w.values())})
        st.session_state["lib_mix_name"] = validate_name(examples[i]["label"].replace(" ", "_")
                                                         .replace("-", "_"))

    cols = st.columns(len(examples))
    for i, (col, ex) in enumerate(zip(cols, examples)):
        col.button(f"{ex['label']}: " + ", ".join(f"{k} {v:g}" for k, v in ex["weights"].items()),
                   key=f"lib_mix_example_{i}", on_click=use_example, args=(i,))
    st.session_state.setdefault("lib_mix_table", pd.DataFrame(
        {"concept": ["happy", "excited"], "weight": [0.7, 0.3]}))
    edited = st.data_editor(
        st.session_state["lib_mix_table"], num_rows="dynamic", width="stretch",
        key="lib_mix_editor",
        column_config={"concept": st.column_config.SelectboxColumn(options=names, required=True),
                       "weight": st.column_config.NumberColumn(min_value=-5.0, max_value=5.0,
                                                               step=0.05, required=True)})
    normalize = st.checkbox("Normalise", value=True, key="lib_mix_normalize")
    mix_name = st.text_input("Name of the mix", key="lib_mix_name", placeholder="e.g. cheerful")
    if st.button("Create and save the mix", type="primary", key="lib_mix_btn"):
        try:
            parts = [(str(r["concept"]), float(r["weight"])) for r in edited.to_dict("records")
                     if isinstance(r.get("concept"), str) and r.get("weight") is not None]
            if not parts:
                raise ValueError("add at least one concept with a weight")
            loaded = [(ui.get_concept(lab, n), w) for n, w in parts]
            mixed = Concept.mix(loaded, normalize=normalize, name=validate_name(mix_name))
            lab.save_concept(mixed)
            st.session_state["lib_mix"] = {"name": mixed.name, "parts": parts}
            st.success(f"Saved “{mixed.name}” ({mixed.description}). It is in every page's "
                       "concept list now — try it in the Playground.")
        except (MlxSteerError, ValueError) as e:
            ui.show_error(e)

with tab_import:
    st.markdown("Import a llama.cpp / repeng **control vector** (`.gguf` with `direction.N` "
                "float32 tensors). It is checked against this model's hidden size and block "
                f"count; files over {MAX_GGUF // 2**20} MiB are refused.")
    up = st.file_uploader("Control vector", type=["gguf"], key="lib_import_file")
    imp_name = st.text_input("Name", key="lib_import_name",
                             placeholder="defaults to the file name")
    if st.button("Import", key="lib_import_btn", disabled=up is None):
        try:
            c = uploads.import_control_vector(lab, up.name, up.getvalue(), imp_name or None)
            st.success(f"Imported “{c.name}”: strongest at block {c.layer}, α = {c.strength:.3g}.")
        except (MlxSteerError, ValueError) as e:
            ui.show_error(e)

with tab_export:
    ex_name = ui.concept_select(lab, "lib_export_concept")
    which = st.radio("Layers", ["default", "all"], horizontal=True, key="lib_export_layers",
                     format_func={"default": "the recommended block at the recommended "
                                  "strength (llama.cpp reproduces the lab's steer at scale 1)",
                                  "all": "every block's raw vector"}.get)
    if st.button("Prepare the file", key="lib_export_btn"):
        try:
            c = ui.get_concept(lab, ex_name)
            with tempfile.TemporaryDirectory() as d:
                path = c.to_gguf(Path(d) / f"{c.name}.gguf", layers=which)
                st.session_state["lib_export"] = {"name": f"{c.name}.gguf",
                                                  "data": path.read_bytes()}
        except MlxSteerError as e:
            ui.show_error(e)
    exp = st.session_state.get("lib_export")
    if exp:
        st.download_button(f"Download {exp['name']} ({len(exp['data']) / 1024:.0f} KiB)",
                           exp["data"], file_name=exp["name"], icon=":material/download:",
                           mime="application/octet-stream", key="lib_export_download")

with tab_delete:
    saved = lab.library.names()
    if not saved:
        st.info("Your library is empty: built-in concepts cannot be deleted, only your own "
                "concepts, mixes and imports.")
    else:
        del_name = st.selectbox("Concept", saved, key="lib_delete_concept")
        sure = st.checkbox(f"Yes, delete “{del_name}”", key="lib_delete_sure")
        if st.button("Delete", key="lib_delete_btn", disabled=not sure):
            try:
                lab.concepts.delete(del_name)
                st.session_state["lib_deleted"] = del_name
                st.session_state.pop("lib_delete_sure", None)
                st.rerun()
            except MlxSteerError as e:
                ui.show_error(e)
    if st.session_state.get("lib_deleted"):
        st.success(f"Deleted “{st.session_state['lib_deleted']}”.")
