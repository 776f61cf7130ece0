"""Chart builders added for the Streamlit lab, tested through `to_dict()`."""

import altair as alt
import pytest

from mlx_steer import charts, lens


@pytest.fixture(autouse=True)
def _no_row_limit():
    alt.data_transformers.disable_max_rows()


def rows(spec: dict, layer: dict | None = None) -> list[dict]:
    name = (layer if layer and "data" in layer else spec)["data"]["name"]
    return spec["datasets"][name]


def test_grouped_bars_one_panel_per_group_in_record_order():
    recs = [{"mode": m, "rank": r, "token": f"{m}{r}", "prob": 0.5 / r}
            for m in ("baseline", "add", "replace") for r in (1, 2)]
    spec = charts.grouped_bars(recs, "token", "prob", "mode", title="top").to_dict()
    assert spec["facet"]["column"]["field"] == "mode"
    assert spec["facet"]["column"]["sort"] == ["baseline", "add", "replace"]
    inner = spec["spec"]
    assert inner["mark"]["type"] == "bar"
    assert inner["encoding"]["x"]["field"] == "prob"
    assert inner["encoding"]["y"]["field"] == "token"
    assert spec["resolve"]["scale"]["y"] == "independent"
    assert rows(spec) == recs
    assert spec["title"] == "top"


def test_depth_band_chart_covers_the_model_and_marks_the_layer():
    bands = lens.depth_bands(30)
    spec = charts.depth_band_chart(bands, layer=18).to_dict()
    strip, labels, tick = spec["layer"]
    assert strip["mark"]["type"] == "bar" and strip["encoding"]["x2"]["field"] == "end"
    data = rows(spec, strip)
    assert [d["band"] for d in data] == ["early", "middle-early", "middle-late", "late"]
    assert data[0]["first"] == 0 and data[-1]["end"] == 30
    assert all(a["end"] == b["first"] for a, b in zip(data, data[1:]))
    assert strip["encoding"]["x"]["scale"]["domain"] == [0, 30]
    assert labels["mark"]["type"] == "text"
    assert rows(spec, tick)[0]["at"] == 18.5
    # Every layer has a y channel: without one Vega-Lite draws bars and rules 0 px tall.
    assert all("y" in layer["encoding"] for layer in spec["layer"])
    assert len(charts.depth_band_chart(bands).to_dict()["layer"]) == 2


def test_concept_map_padded_keeps_points_and_labels_inside():
    import numpy as np

    pts = np.array([[-0.7, -0.1], [0.2, 0.5], [0.5, -0.4]])
    spec = charts.concept_map_padded(pts, ["excited", "happy", "sad"], highlight="happy").to_dict()
    dots, labels = spec["layer"]
    for layer in (dots, labels):
        xd = layer["encoding"]["x"]["scale"]["domain"]
        yd = layer["encoding"]["y"]["scale"]["domain"]
        assert xd[0] < -0.7 and xd[1] > 0.5 + 0.3 * 1.2  # room for the labels on the right
        assert yd[0] < -0.4 and yd[1] > 0.5
    data = rows(spec, dots)
    assert [d["name"] for d in data] == ["excited", "happy", "sad"]
    assert [d["highlighted"] for d in data] == [False, True, False]
    assert dots["mark"]["type"] == "circle" and labels["mark"]["type"] == "text"
