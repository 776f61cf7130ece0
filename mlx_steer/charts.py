"""Pure Altair chart builders: numpy arrays or records in, Altair charts out."""

from __future__ import annotations

import json
from collections.abc import Sequence

import altair as alt
import numpy as np
import pandas as pd

_INK, _HIGHLIGHT, _BASE = "#222222", "#d62728", "#4c78a8"


def _field(name: str) -> str:
    """Escape characters that Vega-Lite would read as nested-field access."""
    return name.replace(".", "\\.").replace("[", "\\[").replace("]", "\\]")


def _kind(frame: pd.DataFrame, column: str) -> str:
    if column not in frame:
        return "nominal"
    series = frame[column]
    numeric = pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
    return "quantitative" if numeric else "nominal"


def _heatmap_frame(values: np.ndarray, tokens: Sequence[str]) -> pd.DataFrame:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(tokens):
        raise ValueError(f"values must be (L, T) with T == len(tokens) == {len(tokens)}, got {values.shape}")
    layers, positions = np.indices(values.shape)
    frame = pd.DataFrame(
        {
            "layer": layers.ravel(),
            "position": positions.ravel(),
            "token": np.asarray(list(tokens), dtype=object)[positions.ravel()],
            "value": values.ravel(),
        }
    )
    return frame[np.isfinite(frame["value"])].reset_index(drop=True)


def layer_token_heatmap(
    values: np.ndarray,
    tokens: Sequence[str],
    title: str,
    diverging: bool = False,
    injection_layer: int | None = None,
    domain: tuple[float, float] | None = None,
) -> alt.Chart | alt.LayerChart:
    """Layer × token heat-map of `values` (L, T); non-finite cells (e.g. masked position 0) are dropped.

    The x axis is the position, labelled with its token; the top layer is at the top.
    `diverging` uses `redblue` centred on 0, otherwise `viridis`; `domain` fixes the color range.
    """
    frame = _heatmap_frame(values, tokens)
    scale = alt.Scale(scheme="redblue", domainMid=0) if diverging else alt.Scale(scheme="viridis")
    if domain is not None:
        scale.domain = list(domain)
    labels = json.dumps([str(t) for t in tokens])
    y = alt.Y("layer:O", sort="descending", title="layer")
    chart = (
        alt.Chart(frame)
        .mark_rect()
        .encode(
            x=alt.X("position:O", title="token", axis=alt.Axis(labelExpr=f"{labels}[datum.value]", labelAngle=-45)),
            y=y,
            color=alt.Color("value:Q", scale=scale, title=None),
            tooltip=["layer:O", "position:O", "token:N", alt.Tooltip("value:Q", format=".3f")],
        )
    )
    if injection_layer is None:
        return chart.properties(title=title)
    rule = (
        alt.Chart(pd.DataFrame({"layer": [injection_layer], "label": ["injection"]}))
        .mark_rule(color=_INK, strokeDash=[4, 3], strokeWidth=2)
        .encode(y=y, tooltip=["label:N", "layer:O"])
    )
    return alt.layer(chart, rule).properties(title=title)


def heatmap_triptych(
    baseline: np.ndarray,
    steered: np.ndarray,
    tokens: Sequence[str],
    injection_layer: int | None = None,
    diverging: bool = False,
) -> alt.HConcatChart:
    """Baseline, steered (one shared color range) and their difference (diverging), side by side."""
    baseline = np.asarray(baseline, dtype=np.float64)
    steered = np.asarray(steered, dtype=np.float64)
    if baseline.shape != steered.shape:
        raise ValueError(f"baseline {baseline.shape} and steered {steered.shape} differ in shape")
    both = np.concatenate([baseline.ravel(), steered.ravel()])
    both = both[np.isfinite(both)]
    domain = None
    if both.size:
        low, high = float(both.min()), float(both.max())
        reach = max(abs(low), abs(high))
        domain = (-reach, reach) if diverging else (low, high)
    panels = [
        layer_token_heatmap(baseline, tokens, "baseline", diverging, injection_layer, domain),
        layer_token_heatmap(steered, tokens, "steered", diverging, injection_layer, domain),
        layer_token_heatmap(steered - baseline, tokens, "steered − baseline", True, injection_layer),
    ]
    return alt.hconcat(*panels).resolve_scale(color="independent")


def norm_per_layer(norms: Sequence[float], title: str = "Residual norm per layer") -> alt.Chart:
    """Line with points of one norm per layer."""
    frame = pd.DataFrame({"layer": np.arange(len(norms)), "norm": np.asarray(norms, dtype=np.float64)})
    return (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:Q", title="layer"),
            y=alt.Y("norm:Q", title="norm"),
            tooltip=["layer:Q", alt.Tooltip("norm:Q", format=".2f")],
        )
        .properties(title=title)
    )


def logit_lens_chart(records: list[dict]) -> alt.LayerChart:
    """Layer × rank grid of top tokens (records: layer, rank, token, prob), shaded by probability."""
    frame = pd.DataFrame.from_records(records, columns=["layer", "rank", "token", "prob"])
    threshold = 0.5 * float(frame["prob"].max()) if len(frame) else 0.0
    base = alt.Chart(frame).encode(
        x=alt.X("rank:O", title="rank", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("layer:O", sort="descending", title="layer"),
        tooltip=["layer:O", "rank:O", "token:N", alt.Tooltip("prob:Q", format=".3f")],
    )
    cells = base.mark_rect().encode(color=alt.Color("prob:Q", scale=alt.Scale(scheme="blues"), title="p"))
    text = base.mark_text(fontSize=11, limit=76).encode(
        text="token:N",
        color=alt.condition(alt.datum.prob > threshold, alt.value("white"), alt.value("black")),
    )
    return alt.layer(cells, text).properties(title="Logit lens", width=alt.Step(80))


def metric_chart(
    records: list[dict],
    x: str,
    y: str,
    color: str | None = None,
    baseline: float | None = None,
) -> alt.Chart | alt.LayerChart:
    """Line with points of `y` against `x`, one line per `color`, with a dashed rule at `baseline`."""
    frame = pd.DataFrame.from_records(records)
    encoding = {
        "x": alt.X(field=_field(x), type=_kind(frame, x), title=x),
        "y": alt.Y(field=_field(y), type="quantitative", title=y),
        "tooltip": [alt.Tooltip(field=_field(c), type=_kind(frame, c), title=c) for c in frame.columns],
    }
    if color is not None:
        encoding["color"] = alt.Color(field=_field(color), type="nominal", title=color)
    chart = alt.Chart(frame).mark_line(point=True).encode(**encoding)
    if baseline is None:
        return chart
    rule = (
        alt.Chart(pd.DataFrame({"baseline": [float(baseline)]}))
        .mark_rule(color="gray", strokeDash=[6, 4])
        .encode(y=alt.Y("baseline:Q", title=y), tooltip=[alt.Tooltip("baseline:Q", format=".3f")])
    )
    return alt.layer(chart, rule)


def concept_map(points: np.ndarray, names: Sequence[str], highlight: str | None = None) -> alt.LayerChart:
    """Labelled 2-D scatter of concepts (e.g. `pca_2d` output); pan/zoom and click to select."""
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (len(names), 2):
        raise ValueError(f"points must be (N, 2) with N == len(names) == {len(names)}, got {points.shape}")
    frame = pd.DataFrame(
        {
            "x": points[:, 0],
            "y": points[:, 1],
            "name": list(names),
            "highlighted": [n == highlight for n in names],
        }
    )
    base = alt.Chart(frame).encode(
        x=alt.X("x:Q", title="PC1"), y=alt.Y("y:Q", title="PC2"), tooltip=["name:N"]
    )
    dots = (
        base.mark_circle(size=90)
        .encode(color=alt.condition("datum.highlighted", alt.value(_HIGHLIGHT), alt.value(_BASE)))
        .add_params(alt.selection_point(name="concept", fields=["name"]))
        .interactive()
    )
    labels = base.mark_text(align="left", dx=7, fontSize=11).encode(text="name:N")
    return alt.layer(dots, labels)


def cosine_heatmap(matrix: np.ndarray, names: Sequence[str]) -> alt.LayerChart:
    """Pairwise cosine heat-map on a fixed [-1, 1] `redblue` scale, with the values printed."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (len(names), len(names)):
        raise ValueError(f"matrix must be (N, N) with N == len(names) == {len(names)}, got {matrix.shape}")
    rows, cols = np.indices(matrix.shape)
    labels = np.asarray(list(names), dtype=object)
    frame = pd.DataFrame({"row": labels[rows.ravel()], "col": labels[cols.ravel()], "value": matrix.ravel()})
    order = list(dict.fromkeys(names))
    base = alt.Chart(frame).encode(
        x=alt.X("col:N", sort=order, title=None),
        y=alt.Y("row:N", sort=order, title=None),
        tooltip=["row:N", "col:N", alt.Tooltip("value:Q", format=".3f")],
    )
    cells = base.mark_rect().encode(
        color=alt.Color("value:Q", scale=alt.Scale(scheme="redblue", domain=[-1, 1]), title="cos")
    )
    text = base.mark_text(fontSize=10).encode(
        text=alt.Text("value:Q", format=".2f"),
        color=alt.condition("abs(datum.value) > 0.6", alt.value("white"), alt.value("black")),
    )
    return alt.layer(cells, text).properties(width=alt.Step(44), height=alt.Step(28))


def rate_bars(records: list[dict], x: str, y: str) -> alt.Chart:
    """Bar per `x` category with height `y` (e.g. detection rates)."""
    frame = pd.DataFrame.from_records(records)
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X(field=_field(x), type="nominal", sort=None, title=x),
            y=alt.Y(field=_field(y), type="quantitative", title=y),
            tooltip=[alt.Tooltip(field=_field(c), type=_kind(frame, c), title=c) for c in frame.columns],
        )
    )


# ---- builders for the Streamlit lab (app/) -------------------------------------------


def grouped_bars(records: list[dict], x: str, y: str, group: str, title: str | None = None) -> alt.Chart:
    """Bars of `y` per `x`, one panel per `group` (in record order), e.g. top tokens per mode."""
    frame = pd.DataFrame.from_records(records)
    order = list(dict.fromkeys(frame[group])) if len(frame) else []
    chart = (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            y=alt.Y(field=_field(x), type="nominal", sort=None, title=None,
                    axis=alt.Axis(labelOverlap=False, labelLimit=140)),
            x=alt.X(field=_field(y), type="quantitative", title=y),
            color=alt.Color(field=_field(group), type="nominal", sort=order, legend=None),
            tooltip=[alt.Tooltip(field=_field(c), type=_kind(frame, c), title=c) for c in frame.columns],
        )
        .properties(width=180, height=alt.Step(20))
        .facet(column=alt.Column(field=_field(group), type="nominal", sort=order, title=None))
        .resolve_scale(y="independent")
    )
    return chart.properties(title=title) if title else chart


def depth_band_chart(bands: list[dict], layer: int | None = None) -> alt.LayerChart:
    """The model's blocks as one horizontal strip split into depth bands (records: key,
    title, first, last), labelled, with the selected `layer` marked by a rule."""
    frame = pd.DataFrame.from_records(
        [{"band": b["key"], "title": b["title"], "first": int(b["first"]),
          "end": int(b["last"]) + 1, "blocks": f"{b['first']}–{b['last']}"} for b in bands],
        columns=["band", "title", "first", "end", "blocks"])
    frame["middle"] = (frame["first"] + frame["end"]) / 2
    frame["row"] = "blocks"
    order = [b["key"] for b in bands]
    total = int(frame["end"].max()) if len(frame) else 1
    x = alt.X("first:Q", title="block", scale=alt.Scale(domain=[0, total], nice=False),
              axis=alt.Axis(tickMinStep=1))
    y = alt.Y("row:N", axis=None)
    strip = (
        alt.Chart(frame)
        .mark_bar(stroke="white", strokeWidth=2)
        .encode(
            x=x,
            x2="end:Q",
            y=y,
            color=alt.Color("band:N", sort=order, scale=alt.Scale(scheme="tableau10"), legend=None),
            tooltip=["band:N", "blocks:N", "title:N"],
        )
    )
    labels = (
        alt.Chart(frame)
        .mark_text(color="white", fontSize=12, fontWeight="bold")
        .encode(x="middle:Q", y=y, text="band:N")
    )
    layers = [strip, labels]
    if layer is not None:
        marker = pd.DataFrame({"at": [int(layer) + 0.5], "label": [f"block {int(layer)}"],
                               "row": ["blocks"]})
        layers.append(
            alt.Chart(marker)
            .mark_tick(color=_INK, thickness=4, size=40)
            .encode(x="at:Q", y=y, tooltip=["label:N"])
        )
    return alt.layer(*layers).properties(height=alt.Step(40))


def concept_map_padded(points: np.ndarray, names: Sequence[str], highlight: str | None = None,
                       pad: float = 0.15) -> alt.LayerChart:
    """`concept_map` with axis domains padded around the points (more on the right, where
    the labels are), so no point or label sits on the frame."""
    chart = concept_map(points, names, highlight)
    pts = np.asarray(points, dtype=np.float64)

    def domain(col: np.ndarray, right: float) -> list[float]:
        low, high = float(col.min()), float(col.max())
        span = (high - low) or 1.0
        return [low - pad * span, high + right * span]

    x = alt.Scale(domain=domain(pts[:, 0], 2 * pad + 0.15), nice=False, zero=False)
    y = alt.Scale(domain=domain(pts[:, 1], pad), nice=False, zero=False)
    for layer in chart.layer:
        layer.encoding.x = alt.X("x:Q", title="PC1", scale=x)
        layer.encoding.y = alt.Y("y:Q", title="PC2", scale=y)
    return chart
