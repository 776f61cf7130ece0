"""How the commands print: JSON or text on stdout, progress bars and errors on stderr."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from typing import Any, Callable

from tqdm.auto import tqdm

from ..files import jsonable

METRIC_COLUMNS = (("sentiment", "sent"), ("marker_rate", "mark"), ("perplexity", "ppl"),
                  ("repetition_rate", "rep"), ("kl_divergence", "KL"),
                  ("projection", "proj"))


def say(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


class Bar:
    """A lazily opened tqdm bar on stderr, driven as progress(done, total)."""

    def __init__(self, args: argparse.Namespace, desc: str, unit: str = "step"):
        self.enabled = not getattr(args, "quiet", False)
        self.desc, self.unit, self.bar = desc, unit, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr,
                            leave=False, dynamic_ncols=True)
        self.bar.total = total
        self.bar.n = min(done, total)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def emit(args: argparse.Namespace, obj: Any, text: Callable[[], str]) -> None:
    """`obj` as JSON with --json, else `text()`."""
    if args.json:
        sys.stdout.write(json.dumps(jsonable(obj), indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(text().rstrip("\n") + "\n")
    sys.stdout.flush()


def fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 10 ** -nd:
        return f"{v:.{nd}g}"
    return f"{v:.{nd}f}".rstrip("0").rstrip(".")


def width() -> int:
    return max(60, min(shutil.get_terminal_size((100, 24)).columns, 160))


def wrap(text: str, cols: int) -> list[str]:
    out: list[str] = []
    for para in (text.strip() or "(empty)").splitlines() or [""]:
        out += textwrap.wrap(para, cols) or [""]
    return out


def indented(text: str) -> str:
    """`text` wrapped to the terminal and indented by four spaces."""
    return textwrap.indent("\n".join(wrap(text, width() - 4)), "    ")


def side_by_side(left: tuple[str, str], right: tuple[str, str]) -> str:
    w = (width() - 3) // 2
    a, b = wrap(left[1], w), wrap(right[1], w)
    lines = [f"{left[0][:w]:<{w}} │ {right[0][:w]}", f"{'─' * w}─┼─{'─' * w}"]
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else ""
        y = b[i] if i < len(b) else ""
        lines.append(f"{x:<{w}} │ {y}")
    return "\n".join(lines)


def metric_line(r: dict) -> str:
    return "  ".join(f"{short} {fmt(r.get(k))}" for k, short in METRIC_COLUMNS)


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    cells = [[h for _, h in cols]] + [[fmt(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("─" * w for w in widths))
    return "\n".join(lines)
