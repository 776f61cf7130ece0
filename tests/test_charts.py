import json

import altair as alt
import numpy as np
import pytest

from mlx_steer import charts

alt.data_transformers.disable_max_rows()

TOKENS = ["<s>", "Hello", ' "world"', "it's"]


def rows(spec: dict, view: dict | None = None) -> list[dict]:
    """Inline rows of `view` (or of the top level when the view inherits its data)."""
    data = (view or {}).get("data") or spec["data"]
    return spec["datasets"][data["name"]]


def values_grid(L: int = 3, T: int = 4) -> np.ndarray:
    values = np.arange(L * T, dtype=float).reshape(L, T) - 5.0
    values[:, 0] = np.nan
    return values


def check_heatmap_view(spec: dict, view: dict, values: np.ndarray, scheme: str) -> None:
    enc = view["encoding"]
    assert view["mark"]["type"] == "rect"
    assert (enc["x"]["field"], enc["x"]["type"]) == ("position", "ordinal")
    assert (enc["y"]["field"], enc["y"]["type"], enc["y"]["sort"]) == ("layer", "ordinal", "descending")
    assert (enc["color"]["field"], enc["color"]["type"]) == ("value", "quantitative")
    assert enc["color"]["scale"]["scheme"] == scheme
    assert "token" in [t["field"] for t in enc["tooltip"]]
    data = rows(spec, view)
    assert len(data) == np.isfinite(values).sum()
    cell = next(r for r in data if r["layer"] == 2 and r["position"] == 3)
    assert cell["value"] == values[2, 3]
    assert cell["token"] == TOKENS[3]
    assert not any(r["position"] == 0 for r in data)


def test_layer_token_heatmap_sequential():
    values = np.abs(values_grid())
    spec = charts.layer_token_heatmap(values, TOKENS, "norms").to_dict()
    check_heatmap_view(spec, spec, values, "viridis")
    assert spec["title"] == "norms"
    assert "domainMid" not in spec["encoding"]["color"]["scale"]
    label_expr = spec["encoding"]["x"]["axis"]["labelExpr"]
    assert json.dumps(TOKENS) in label_expr


def test_layer_token_heatmap_diverging_with_injection():
    values = values_grid()
    spec = charts.layer_token_heatmap(values, TOKENS, "projection", diverging=True, injection_layer=1).to_dict()
    heat, rule = spec["layer"]
    check_heatmap_view(spec, heat, values, "redblue")
    assert heat["encoding"]["color"]["scale"]["domainMid"] == 0
    assert rule["mark"]["type"] == "rule"
    assert rule["encoding"]["y"]["field"] == "layer"
    assert [r["layer"] for r in rows(spec, rule)] == [1]


def test_layer_token_heatmap_rejects_token_mismatch():
    with pytest.raises(ValueError):
        charts.layer_token_heatmap(np.zeros((2, 3)), TOKENS, "x")


def test_heatmap_triptych():
    baseline = values_grid()
    steered = baseline * 2.0
    spec = charts.heatmap_triptych(baseline, steered, TOKENS, injection_layer=2).to_dict()
    assert spec["resolve"]["scale"]["color"] == "independent"
    panels = [panel["layer"][0] for panel in spec["hconcat"]]
    assert [panel["title"] for panel in spec["hconcat"]] == ["baseline", "steered", "steered − baseline"]
    check_heatmap_view(spec, panels[0], baseline, "viridis")
    check_heatmap_view(spec, panels[1], steered, "viridis")
    check_heatmap_view(spec, panels[2], steered - baseline, "redblue")
    shared = [-8.0, 12.0]  # min and max over baseline and steered together
    assert panels[0]["encoding"]["color"]["scale"]["domain"] == shared
    assert panels[1]["encoding"]["color"]["scale"]["domain"] == shared
    assert "domain" not in panels[2]["encoding"]["color"]["scale"]


def test_heatmap_triptych_diverging_domain_is_symmetric():
    baseline = values_grid()
    spec = charts.heatmap_triptych(baseline, baseline + 1.0, TOKENS, diverging=True).to_dict()
    scale = spec["hconcat"][0]["encoding"]["color"]["scale"]
    assert scale["scheme"] == "redblue"
    assert scale["domain"] == [-7.0, 7.0]


def test_norm_per_layer():
    norms = [45.0, 100.0, 149.0]
    spec = charts.norm_per_layer(norms, title="median norm").to_dict()
    assert spec["mark"] == {"type": "line", "point": True}
    assert spec["encoding"]["x"]["field"] == "layer"
    assert spec["encoding"]["y"]["field"] == "norm"
    assert spec["title"] == "median norm"
    assert rows(spec) == [{"layer": i, "norm": n} for i, n in enumerate(norms)]


def test_logit_lens_chart():
    records = [
        {"layer": layer, "rank": rank, "token": f"tok{layer}{rank}", "prob": 0.1 * (rank + 1)}
        for layer in (20, 24)
        for rank in range(3)
    ]
    spec = charts.logit_lens_chart(records).to_dict()
    cells, text = spec["layer"]
    assert cells["mark"]["type"] == "rect"
    assert text["mark"]["type"] == "text"
    assert cells["encoding"]["color"]["field"] == "prob"
    assert text["encoding"]["text"]["field"] == "token"
    assert cells["encoding"]["x"]["field"] == "rank"
    assert cells["encoding"]["y"]["field"] == "layer"
    assert rows(spec, cells) == records


def test_metric_chart_with_color_and_baseline():
    records = [{"strength": s, "kl.nats": 0.1 * s, "layer": layer} for s in (0, 2, 4) for layer in (10, 20)]
    spec = charts.metric_chart(records, "strength", "kl.nats", color="layer", baseline=0.05).to_dict()
    line, rule = spec["layer"]
    assert line["mark"] == {"type": "line", "point": True}
    assert line["encoding"]["x"] == {"field": "strength", "title": "strength", "type": "quantitative"}
    assert line["encoding"]["y"]["field"] == "kl\\.nats"
    assert line["encoding"]["color"]["field"] == "layer"
    assert line["encoding"]["color"]["type"] == "nominal"
    assert rows(spec, line) == records
    assert rule["mark"]["type"] == "rule"
    assert rule["mark"]["strokeDash"]
    assert rows(spec, rule) == [{"baseline": 0.05}]


def test_metric_chart_plain():
    records = [{"layer": "L10", "ppl": 12.5}, {"layer": "L20", "ppl": 14.0}]
    spec = charts.metric_chart(records, "layer", "ppl").to_dict()
    assert spec["mark"]["type"] == "line"
    assert spec["encoding"]["x"]["type"] == "nominal"
    assert "color" not in spec["encoding"]
    assert rows(spec) == records


def test_concept_map():
    points = np.array([[0.0, 1.0], [2.0, -1.0], [-1.5, 0.5]])
    names = ["ocean", "fire", "dust"]
    spec = charts.concept_map(points, names, highlight="fire").to_dict()
    dots, labels = spec["layer"]
    assert dots["mark"]["type"] == "circle"
    assert labels["mark"]["type"] == "text"
    assert labels["encoding"]["text"]["field"] == "name"
    assert (dots["encoding"]["x"]["field"], dots["encoding"]["y"]["field"]) == ("x", "y")
    params = {p["name"]: p for p in spec["params"]}
    assert params["concept"]["select"] == {"type": "point", "fields": ["name"]}
    assert params["concept"]["views"] == [dots["name"]]
    assert any(p["select"]["type"] == "interval" and p.get("bind") == "scales" for p in params.values())
    data = rows(spec, dots)
    assert [(r["name"], r["x"], r["y"]) for r in data] == [(n, *p) for n, p in zip(names, points.tolist())]
    assert [r["highlighted"] for r in data] == [False, True, False]


def test_cosine_heatmap():
    matrix = np.array([[1.0, 0.2, -0.5], [0.2, 1.0, 0.1], [-0.5, 0.1, 1.0]])
    names = ["ocean", "fire", "dust"]
    spec = charts.cosine_heatmap(matrix, names).to_dict()
    cells, text = spec["layer"]
    assert cells["mark"]["type"] == "rect"
    assert text["mark"]["type"] == "text"
    assert cells["encoding"]["color"]["scale"] == {"scheme": "redblue", "domain": [-1, 1]}
    assert text["encoding"]["text"]["field"] == "value"
    assert cells["encoding"]["x"]["sort"] == names
    data = rows(spec, cells)
    assert len(data) == 9
    assert next(r for r in data if r["row"] == "ocean" and r["col"] == "dust")["value"] == -0.5


def test_rate_bars():
    records = [{"concept": "ocean", "rate": 0.4}, {"concept": "fire", "rate": 0.2}]
    spec = charts.rate_bars(records, "concept", "rate").to_dict()
    assert spec["mark"]["type"] == "bar"
    assert (spec["encoding"]["x"]["field"], spec["encoding"]["x"]["type"]) == ("concept", "nominal")
    assert (spec["encoding"]["y"]["field"], spec["encoding"]["y"]["type"]) == ("rate", "quantitative")
    assert rows(spec) == records


def test_large_heatmap_serialises():
    values = np.random.default_rng(0).normal(size=(30, 200))
    spec = charts.layer_token_heatmap(values, [f"t{i}" for i in range(200)], "big").to_dict()
    assert len(rows(spec)) == 6000
