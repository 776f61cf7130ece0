"""The Streamlit lab through `streamlit.testing.v1.AppTest`, on the embedded model.

Every page renders, its main button produces output (read from `st.session_state`),
and its charts carry the right data (the Vega-Lite spec's Arrow datasets). Few tokens
per generation keep the whole file within a few minutes on two CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

pytestmark = pytest.mark.model

APP = Path(__file__).resolve().parents[1] / "app" / "Home.py"
TIMEOUT = 300
PAIRS = ("I love this sunny day, it makes me so glad! | This is a day, it is a day.\n"
         "What a wonderful, joyful party we had! | We had a party with some people.\n"
         "My heart is full of happiness tonight. | My schedule is full of tasks tonight.")


@pytest.fixture(scope="module", autouse=True)
def app_env():
    """The run's concept cache (MLX_STEER_HOME, set by conftest) and no warm-up thread
    outliving a test; the concepts the tests save are removed afterwards."""
    import os

    assert os.environ.get("MLX_STEER_HOME"), "conftest isolates the concept cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLX_STEER_APP_WARMUP", "0")
    yield
    mp.undo()
    m = lab()
    for name in ("test_glad", "test_mix", "test_exp_mix", "test_broken"):
        if name in m.library:
            m.concepts.delete(name)


def open_page(page: str | None = None, **session):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    for k, v in session.items():
        at.session_state[k] = v
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    if page:
        at.switch_page(f"app_pages/{page}.py").run()
        ok(at)
    return at


def ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def charts(at) -> list[tuple[dict, list[pd.DataFrame]]]:
    """(Vega-Lite spec, datasets as DataFrames) of every chart on the page."""
    out = []
    for el in at.get("vega_lite_chart"):
        spec = json.loads(el.proto.spec)
        frames = [pa.ipc.open_stream(d.data.data).read_pandas() for d in el.proto.datasets]
        out.append((spec, frames))
    return out


def chart_with(at, *columns: str, exact: bool = False) -> pd.DataFrame:
    """The dataset that has all `columns` (or exactly them); exactly one must match."""
    found = [f for _, frames in charts(at) for f in frames
             if (set(columns) == set(f.columns) if exact else set(columns) <= set(f.columns))]
    assert len(found) == 1, f"{len(found)} datasets with {columns}"
    return found[0]


def lab():
    """The app's own cached model (st.cache_resource persists across AppTests)."""
    from app import state

    return state._load(None)


# ---- Home ----------------------------------------------------------------------------


def test_home_renders_and_the_demo_streams_baseline_and_happy():
    at = open_page(home_max_tokens=8)
    assert "mlx-steer lab" in at.title[0].value
    assert at.sidebar.selectbox(key="model_choice").value.startswith("SmolLM2")
    assert any("30 blocks" in c.value for c in at.sidebar.caption)
    at.button(key="home_demo_btn").click().run()
    ok(at)
    demo = at.session_state["home_demo"]
    assert demo["baseline"] and demo["steered"] and demo["baseline"] != demo["steered"]
    m = lab()
    assert demo["baseline"] == m.generate(demo["prompt"], max_tokens=8)
    assert demo["steered"] == m.generate(demo["prompt"], m.concept("happy").steer(),
                                         max_tokens=8)


def test_unavailable_model_falls_back_with_a_reason(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = open_page()
    at.sidebar.selectbox(key="model_choice").select("Mistral-7B-Instruct v0.2 (4-bit)").run()
    assert not at.exception
    if at.sidebar.error:  # not cached here: a clear message, and the embedded model
        assert "Using the embedded model" in at.sidebar.error[0].value
        assert any("30 blocks" in c.value for c in at.sidebar.caption)


# ---- Learn ---------------------------------------------------------------------------


def test_learn_charts_are_computed_from_the_model():
    at = open_page("learn")
    m = lab()
    norms = chart_with(at, "layer", "norm")
    assert list(norms["layer"]) == list(range(m.num_layers))
    np.testing.assert_allclose(norms["norm"], at.session_state["learn_norms"])
    assert norms["norm"].iloc[-1] > 5 * norms["norm"].iloc[0]  # the residual stream grows
    lens_rows = chart_with(at, "layer", "rank", "token", "prob")
    assert len(lens_rows) == m.num_layers * 5
    last = lens_rows[(lens_rows.layer == m.num_layers - 1) & (lens_rows["rank"] == 1)]
    assert last.token.iloc[0] == " Paris"
    assert at.slider(key="learn_layer").max == m.num_layers - 1
    bands = chart_with(at, "band", "first", "end")
    assert bands["first"].iloc[0] == 0 and bands["end"].iloc[-1] == m.num_layers


def test_learn_embeddings_add_vs_replace_strength_baselines_quiz():
    at = open_page("learn", learn_add_tokens=3, learn_strength_tokens=6)
    at.button(key="learn_emb_btn").click().run()
    ok(at)
    emb = at.session_state["learn_emb"]
    assert emb["embedding_identical"] and emb["activation_cosine"] < 0.99
    assert len(chart_with(at, "layer", "cosine", "what")) == lab().num_layers + 1

    at.button(key="learn_add_btn").click().run()
    ok(at)
    res = at.session_state["learn_add"]
    assert res["replace"]["kl"] > res["add"]["kl"] > 0 == res["baseline"]["kl"]
    assert set(chart_with(at, "mode", "token", "prob")["mode"]) == {"baseline", "add", "replace"}

    at.button(key="learn_strength_btn").click().run()
    ok(at)
    rows = at.session_state["learn_strength"]
    assert [r["alpha"] for r in rows] == [0.0, 0.1, 0.25, 0.5, 1.0]
    assert rows[0]["text"] != rows[-1]["text"]
    assert list(chart_with(at, "alpha", "distinct-2")["alpha"]) == [0.0, 0.1, 0.25, 0.5, 1.0]

    at.button(key="learn_base_btn").click().run()
    ok(at)
    base = pd.DataFrame(at.session_state["learn_base"]["records"])
    assert set(base.baseline) == {"matched", "mismatched"}

    quiz = json.loads((Path(__file__).parents[1] / "mlx_steer/data/prompts.json")
                      .read_text())["quiz"]
    for i, q in enumerate(quiz):
        at.radio(key=f"learn_quiz_{i}").set_value(q["options"][q["answer"]])
    at.button[-1].click().run()  # the form's submit button
    ok(at)
    assert at.session_state["learn_quiz_score"] == len(quiz)


# ---- Concept creator -------------------------------------------------------------------


@pytest.fixture(scope="module")
def created():
    """A concept made and saved through the Concept creator page."""
    at = open_page("concept_creator")
    at.text_input(key="creator_name").set_value("test_glad")
    at.text_area(key="creator_pairs").set_value(PAIRS).run()
    ok(at)
    at.button(key="creator_extract_btn").click().run()
    ok(at)
    charts_before_save = {"rel": chart_with(at, "layer", "value", "series"),
                          "lens": chart_with(at, "direction", "token", "score"),
                          "listed": "test_glad" in lab().concepts.names()}
    at.button(key="creator_save_btn").click().run()
    ok(at)
    return at, charts_before_save


def test_concept_creator_extracts_previews_and_saves(created):
    at, before = created
    c = at.session_state["creator_concept"]
    m = lab()
    assert c.name == "test_glad" and len(c.pairs) == 3
    assert c.vectors.shape == (m.num_layers, m.hidden_size)
    rel = before["rel"]
    ratio = rel[rel.series == "‖v‖ / median‖h‖"]
    np.testing.assert_allclose(ratio["value"], np.linalg.norm(c.vectors, axis=1) / c.norms,
                               rtol=1e-5)
    lens_rows = before["lens"]
    assert set(lens_rows.direction) == {"promotes", "suppresses"} and len(lens_rows) == 20
    assert not before["listed"]  # extracted, not saved yet
    assert at.session_state["creator_saved"]
    assert "test_glad" in m.concepts.names()
    assert m.concept("test_glad").pairs == c.pairs
    assert any("Saved “test_glad”" in s.value for s in at.success)
    # "Try it" streams with st.write_stream and keeps the text
    at.session_state["creator_try_tokens"] = 4
    at.button(key="creator_try_btn").click().run()
    ok(at)
    assert at.session_state["creator_try"] == m.generate(
        at.text_input(key="creator_try_prompt").value, c.steer(), max_tokens=4)
    # The new concept is offered on the other pages at once (no re-initialise click).
    at.switch_page("app_pages/playground.py").run()
    assert "test_glad" in at.selectbox(key="pg_concept").options


def test_concept_creator_reports_bad_pairs():
    at = open_page("concept_creator")
    at.text_area(key="creator_pairs").set_value("no separator on this line").run()
    assert not at.exception
    assert "no '|'" in at.warning[0].value
    assert at.button(key="creator_extract_btn").disabled


# ---- Playground ------------------------------------------------------------------------


def test_playground_generates_baseline_and_steered_side_by_side():
    at = open_page("playground")
    m = lab()
    assert at.slider(key="pg_layer").max == m.num_layers - 1
    assert at.slider(key="pg_layer").value == m.concept("happy").layer  # recommended
    assert at.toggle(key="pg_relative").value  # relative strength by default
    at.slider(key="pg_max_tokens").set_value(8)
    at.slider(key="pg_alpha").set_value(0.6)
    at.button(key="pg_generate_btn").click().run()
    ok(at)
    res = at.session_state["playground"]
    assert res["baseline"] != res["steered"]
    summary = res["summary"]
    assert summary["concept"] == "happy" and summary["alpha"] == pytest.approx(0.6, abs=1e-3)
    steer = m.concept("happy").steer(summary["layer"], 0.6)
    assert res["steered"] == m.generate(res["prompt"], steer, max_tokens=8)


def test_playground_raw_strength_mode():
    at = open_page("playground")
    at.toggle(key="pg_relative").set_value(False).run()
    ok(at)
    m = lab()
    happy = m.concept("happy")
    assert at.number_input(key="pg_raw").value == pytest.approx(
        happy.relative_to_raw(happy.layer, happy.strength), abs=0.01)
    at.number_input(key="pg_raw").set_value(6.0)
    at.slider(key="pg_max_tokens").set_value(8)
    at.selectbox(key="pg_positions").select("generated")
    at.button(key="pg_generate_btn").click().run()
    ok(at)
    res = at.session_state["playground"]
    assert res["summary"]["raw strength"] == 6.0
    assert res["summary"]["alpha"] == pytest.approx(happy.raw_to_relative(happy.layer, 6.0),
                                                     abs=1e-4)
    steer = happy.steer(happy.layer, 6.0, relative=False, positions="generated")
    assert res["steered"] == m.generate(res["prompt"], steer, max_tokens=8)


def test_playground_ablation_and_cap():
    at = open_page("playground")
    m = lab()
    happy = m.concept("happy")
    at.slider(key="pg_max_tokens").set_value(8)
    at.radio(key="pg_op").set_value("ablate").run()
    ok(at)
    assert at.checkbox(key="pg_ablate_all").value  # every block by default
    at.button(key="pg_generate_btn").click().run()
    ok(at)
    res = at.session_state["playground"]
    assert res["summary"]["operation"] == "ablate" and res["summary"]["layer"] == "all"
    assert res["steered"] == m.generate(res["prompt"], happy.ablate(), max_tokens=8)
    at.radio(key="pg_op").set_value("cap").run()
    at.slider(key="pg_alpha").set_value(0.0)
    at.button(key="pg_generate_btn").click().run()
    ok(at)
    res = at.session_state["playground"]
    assert res["summary"]["operation"] == "cap" and res["summary"]["cap on h·v̂"] == 0
    steer = happy.steer(res["summary"]["layer"], 0.0, op="cap")
    assert res["steered"] == m.generate(res["prompt"], steer, max_tokens=8)


def test_playground_demo_button_fills_the_controls():
    at = open_page("playground")
    at.button(key="pg_demo_btn").click().run()
    ok(at)
    assert at.session_state["pg_prompt"] == "Tell me about artificial intelligence"
    c = lab().concept("enthusiastic")
    assert at.slider(key="pg_layer").value == c.layer
    assert at.slider(key="pg_alpha").value == pytest.approx(c.strength, abs=0.01)


# ---- Visualizer ------------------------------------------------------------------------


def test_visualizer_heatmaps_same_tokens_after_injection(created):
    at = open_page("visualizer")
    at.slider(key="viz_max_tokens").set_value(4)
    at.button(key="viz_btn").click().run()
    ok(at)
    run = at.session_state["viz"]["run"]
    layer = run.layer
    heat = [f for _, frames in charts(at) for f in frames
            if {"layer", "position", "token", "value"} <= set(f.columns)]
    assert len(heat) == 3  # unsteered, steered, difference
    diff = heat[2]
    below = diff[diff.layer < layer]["value"]
    assert len(below) and np.all(below == 0.0)
    at_layer = diff[diff.layer == layer]["value"].to_numpy()
    injected = at.session_state["viz"]["summary"]["‖injected‖"]
    np.testing.assert_allclose(at_layer, injected, rtol=1e-3)
    # the columns are the steered run's tokens, after the template's system part
    shown = run.labels[run.first_shown:]
    assert sorted(set(diff.position)) == list(range(len(shown)))
    assert list(diff[diff.layer == layer].sort_values("position").token) == shown
    # concept map: happy and the saved test concept at least
    vm = at.session_state["viz_map"]
    assert {"happy", "test_glad"} <= set(vm["names"])
    pts = chart_with(at, "x", "y", "name", "highlighted")
    np.testing.assert_allclose(pts[["x", "y"]].to_numpy(), vm["points"])
    cos = chart_with(at, "row", "col", "value")
    assert len(cos) == len(vm["names"]) ** 2
    assert cos[cos.row == cos.col]["value"].to_numpy() == pytest.approx(1.0)


# ---- Library ---------------------------------------------------------------------------


def test_library_page_marks_a_corrupt_concept_and_lists_the_rest(created):
    m = lab()
    broken = m.library.dir / "test_broken.json"
    m.save_concept(mlx_steer_concept_copy(m, "test_broken"))
    broken.write_text('{"vectors_file": ' * 3)
    try:
        at = open_page("library")
        table = pd.DataFrame(at.session_state["library_table"]).set_index("name")
        assert table.loc["test_broken", "status"].startswith("unreadable:")
        assert table.loc["test_glad", "status"] == "ready"
        assert {"happy", "sad"} <= set(table.index)
    finally:
        m.concepts.delete("test_broken")


def mlx_steer_concept_copy(m, name):
    from dataclasses import replace

    return replace(m.concept("test_glad"), name=name)


def test_library_lists_inspects_mixes_exports_and_deletes(created):
    at = open_page("library")
    table = pd.DataFrame(at.session_state["library_table"])
    assert {"happy", "sad", "test_glad"} <= set(table.name)
    assert table.set_index("name").loc["test_glad", "source"] == "library"

    at.selectbox(key="lib_inspect").select("test_glad")
    at.button(key="lib_inspect_btn").click().run()
    ok(at)
    recs = chart_with(at, "layer", "‖v‖ / median‖h‖")
    assert len(recs) == lab().num_layers
    # The calibration grid its defaults were chosen from, as a chart.
    grid = lab().concept("test_glad").extra["calibration"]["grid"]
    shown = at.session_state["lib_calibration_records"]
    assert [(r["block"], r["α"]) for r in shown] == [(g["layer"], g["strength"]) for g in grid]

    at.session_state["lib_mix_table"] = pd.DataFrame(
        {"concept": ["happy", "test_glad"], "weight": [0.5, 0.5]})
    at.text_input(key="lib_mix_name").set_value("test_mix")
    at.button(key="lib_mix_btn").click().run()
    ok(at)
    assert at.session_state["lib_mix"]["name"] == "test_mix"
    m = lab()
    mixed = m.concept("test_mix")
    assert mixed.method == "mix" and mixed.layer == m.concept("happy").layer

    at.selectbox(key="lib_export_concept").select("test_mix")
    at.button(key="lib_export_btn").click().run()
    ok(at)
    data = at.session_state["lib_export"]["data"]
    assert data[:4] == b"GGUF"

    at.selectbox(key="lib_delete_concept").select("test_mix")
    at.checkbox(key="lib_delete_sure").check().run()
    at.button(key="lib_delete_btn").click().run()
    ok(at)
    assert "test_mix" not in m.concepts.names()


# ---- Experiments ------------------------------------------------------------------------


def test_experiments_layer_strength_and_mix(created):
    at = open_page("experiments")
    at.slider(key="exp_layer_tokens").set_value(4)
    at.multiselect(key="exp_layer_layers").set_value([6, 18])
    at.button(key="exp_layer_btn").click().run()
    ok(at)
    recs = at.session_state["exp_layer"]
    assert [r["layer"] for r in recs] == [None, 6, 18] and recs[0]["is_baseline"]
    plotted = chart_with(at, "layer", "concept_score", "text")
    assert list(plotted["layer"]) == [6, 18]
    np.testing.assert_allclose(plotted["concept_score"], [r["concept_score"] for r in recs[1:]])

    at.slider(key="exp_strength_tokens").set_value(4)
    at.multiselect(key="exp_strength_values").set_value([0.0, 0.5])
    at.button(key="exp_strength_btn").click().run()
    ok(at)
    recs = at.session_state["exp_strength"]
    assert [r["strength"] for r in recs] == [0.0, 0.5]
    assert recs[1]["kl_divergence"] > 0 == recs[0]["kl_divergence"]

    at.slider(key="exp_mix_tokens").set_value(4)
    at.text_input(key="exp_mix_spec").set_value("happy:0.5, test_glad:0.5")
    at.text_input(key="exp_mix_name").set_value("test_exp_mix")
    at.checkbox(key="exp_mix_save").check().run()
    at.button(key="exp_mix_btn").click().run()
    ok(at)
    kinds = [r["kind"] for r in at.session_state["exp_mix"]]
    assert kinds == ["baseline", "component", "component", "mix"]
    assert "test_exp_mix" in lab().concepts.names()
    bars = chart_with(at, "label", "concept_score", exact=True)
    assert len(bars) == 4

    at.text_input(key="exp_mix_spec").set_value("happy:0.7, friendly:0.3, sad").run()
    assert not at.exception
    assert any("no concept “friendly”" in w.value for w in at.warning)
    assert any("not name:weight" in w.value for w in at.warning)
    assert at.button(key="exp_mix_btn").disabled


def test_experiments_methods_and_operations():
    at = open_page("experiments")
    at.slider(key="exp_methods_tokens").set_value(4)
    at.multiselect(key="exp_methods_methods").set_value(["mean", "pca"])
    at.radio(key="exp_methods_op").set_value("cap")
    at.slider(key="exp_methods_alpha").set_value(0.1)
    at.button(key="exp_methods_btn").click().run()
    ok(at)
    recs = at.session_state["exp_methods"]
    assert [r["label"] for r in recs if not r["is_baseline"]] == ["mean", "pca"]
    assert {r["op"] for r in recs if not r["is_baseline"]} == {"cap"}
    bars = chart_with(at, "label", "concept_score", exact=True)
    assert len(bars) == 3


# ---- Introspection ----------------------------------------------------------------------


def test_introspection_reports_rates_controls_and_transcripts():
    at = open_page("introspection")
    assert at.slider(key="intro_layer").value == round(2 / 3 * lab().num_layers)
    at.slider(key="intro_trials").set_value(2)
    at.slider(key="intro_controls").set_value(2)
    at.slider(key="intro_yes_bias").set_value(1)
    at.slider(key="intro_max_tokens").set_value(6)
    at.button(key="intro_btn").click().run()
    ok(at)
    rep = at.session_state["introspection"]
    assert (rep["trials"], rep["control_trials"]) == (2, 2)
    assert 0.0 <= rep["detection_rate"] <= 1.0 and 0.0 <= rep["false_positive_rate"] <= 1.0
    kinds = [t["kind"] for t in rep["transcripts"]]
    assert kinds.count("injected") == 2 and kinds.count("control") == 2
    assert kinds.count("yes_bias_injected") == kinds.count("yes_bias_control") == 1
    rates = chart_with(at, "rate", "value")
    assert rates.set_index("rate").loc["false positive", "value"] == rep["false_positive_rate"]
    assert any(rep["verdict"] in (a.value) for a in list(at.warning) + list(at.success))


# ---- the model lock ------------------------------------------------------------------------


def test_stream_lock_is_released_when_a_stream_is_abandoned():
    """A stream holds the model lock only while it runs: closing it (what Streamlit does
    when the user navigates away and the script stops) or dropping it releases it."""
    import gc

    from app import state

    lock = state._lock()
    m = lab()
    gen = state.locked(lambda: m.stream("Tell me about trains.", max_tokens=50))
    assert not lock.locked()  # nothing is taken before the stream starts
    next(gen)
    assert lock.locked()
    gen.close()
    assert not lock.locked()

    gen = state.locked(lambda: m.stream("Tell me about trains.", max_tokens=50))
    next(gen)
    del gen
    gc.collect()
    assert not lock.locked()
    with state.model_lock(timeout=1):  # and it can be taken again
        pass


# ---- uploads (the Concept creator's pairs, the Library's control vectors) --------------


def _ui():
    from app import uploads

    return uploads


def test_control_vector_import_round_trip_and_refusals(tmp_path):
    from mlx_steer.errors import CorruptFileError, VectorShapeError
    from mlx_steer.control_vector import write_control_vector

    ui, m = _ui(), lab()
    happy = m.concept("happy")
    path = happy.to_gguf(tmp_path / "happy.gguf", layers="all")
    c = ui.import_control_vector(m, "happy.gguf", path.read_bytes(), "test_imported")
    try:
        assert "test_imported" in m.concepts.names()
        np.testing.assert_allclose(c.vectors[1:], happy.vectors[1:], rtol=1e-6)
    finally:
        m.concepts.delete("test_imported")
    with pytest.raises(ValueError, match="limit"):
        ui.import_control_vector(m, "big.gguf", b"\0" * (ui.MAX_GGUF + 1))
    with pytest.raises(CorruptFileError):
        ui.import_control_vector(m, "junk.gguf", b"not a gguf file at all")
    other = write_control_vector(tmp_path / "other.gguf", {3: np.ones(4096, np.float32)},
                                 "llama", 32)
    with pytest.raises(VectorShapeError, match="another model"):
        ui.import_control_vector(m, "other.gguf", other.read_bytes())
