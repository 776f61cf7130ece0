"""Contrast pairs from text: one parser for the CLI's `--pairs FILE` and the app's uploads.

Accepted: JSON (a list of `[positive, negative]` or `{"positive", "negative"}` items,
or `{"pairs": [...]}` like the built-in specs), JSON lines, CSV/TSV with two columns
(an optional `positive,negative` header), and plain lines `positive | negative`
(a tab also separates; `#` starts a comment line). Every failure is a typed error
(`InvalidArgumentError` or `CorruptFileError`, both ValueErrors) naming the source.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from .errors import CorruptFileError, InvalidArgumentError
from .files import read_json

MAX_BYTES = 1 << 20  # 1 MiB of pairs is thousands of pairs
Pair = tuple[str, str]


def _pair(item: Any, source: str) -> Pair:
    if isinstance(item, dict):
        item = (item.get("positive", item.get("pos")), item.get("negative", item.get("neg")))
    if not (isinstance(item, (list, tuple)) and len(item) == 2
            and all(isinstance(s, str) and s.strip() for s in item)):
        raise InvalidArgumentError(
            f"{source}: each pair must be two non-empty texts [positive, negative], "
            f"got {str(item)[:80]}")
    return item[0].strip(), item[1].strip()


def parse_lines(text: str, source: str = "pairs") -> list[Pair]:
    """One pair per line: `positive | negative` (or a tab); blank and `#` lines skipped."""
    pairs = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        sep = "|" if "|" in line else "\t" if "\t" in line else None
        if sep is None:
            raise InvalidArgumentError(
                f"{source} line {n} has no '|' between the positive and negative text")
        pos, neg = (s.strip() for s in line.split(sep, 1))
        if not pos or not neg:
            raise InvalidArgumentError(
                f"{source} line {n}: both sides of the pair must be non-empty")
        pairs.append((pos, neg))
    return pairs


def _from_json(obj: Any, source: str) -> list[Pair]:
    items = obj.get("pairs") if isinstance(obj, dict) else obj
    if not isinstance(items, list):
        raise InvalidArgumentError(f"{source}: expected a list of pairs or {{\"pairs\": …}}")
    return [_pair(i, source) for i in items]


def parse(text: str, source: str = "pairs") -> list[Pair]:
    """Pairs from `text`; the format comes from `source`'s suffix (.json, .jsonl, .csv,
    .tsv), else is recognised: JSON, then JSON lines, then `|`/tab lines."""
    low = source.lower()
    if low.endswith(".json"):
        return _from_json(read_json(text, source), source)
    if low.endswith(".jsonl"):
        return [_pair(read_json(ln, source), source) for ln in text.splitlines() if ln.strip()]
    if low.endswith((".csv", ".tsv")):
        rows = [r for r in csv.reader(io.StringIO(text),
                                      delimiter="\t" if low.endswith(".tsv") else ",") if r]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["positive", "negative"]:
            rows = rows[1:]
        return [_pair(r[:2], source) for r in rows]
    stripped = text.strip()
    try:
        return _from_json(json.loads(stripped), source)
    except RecursionError:
        raise CorruptFileError(f"{source}: JSON nested too deeply") from None
    except json.JSONDecodeError:
        pass
    lines = [ln for ln in stripped.splitlines() if ln.strip()]
    try:
        return [_pair(json.loads(ln), source) for ln in lines]
    except RecursionError:
        raise CorruptFileError(f"{source}: JSON nested too deeply") from None
    except json.JSONDecodeError:
        return parse_lines(stripped, source)


def parse_bytes(data: bytes, source: str = "pairs", limit: int | None = None
                ) -> list[Pair]:
    """`parse` of an upload's or a file's bytes: UTF-8, at least one pair, and at most
    `limit` bytes when given (the app passes MAX_BYTES)."""
    if limit is not None and len(data) > limit:
        raise InvalidArgumentError(
            f"{source} is {len(data) / 2**20:.1f} MiB; the limit is {limit / 2**20:g} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"cannot read {source}: {e}") from None
    pairs = parse(text, source)
    if not pairs:
        raise InvalidArgumentError(f"{source} holds no pairs")
    return pairs


def read(path: str | Path) -> list[Pair]:
    """Pairs from a file (see the module's formats)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"no such pairs file: {path}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise CorruptFileError(f"cannot read {p.name}: {e.strerror or e}") from None
    return parse_bytes(data, p.name)
