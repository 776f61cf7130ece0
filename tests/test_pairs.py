"""mlx_steer.pairs: the one parser of contrast pairs, used by `mlx-steer extract --pairs`
and the Concept creator's text box and uploads."""

import json

import pytest

from mlx_steer import pairs
from mlx_steer.errors import CorruptFileError, InvalidArgumentError

WANT = [("I am glad", "I am here"), ("What joy", "What news")]


def test_every_upload_format_gives_the_same_pairs():
    as_json = json.dumps([list(p) for p in WANT]).encode()
    assert pairs.parse_bytes(as_json, "p.json") == WANT
    assert pairs.parse_bytes(json.dumps(
        {"pairs": [{"positive": p, "negative": n} for p, n in WANT]}).encode(), "p.json") == WANT
    assert pairs.parse_bytes(b"\n".join(json.dumps(list(p)).encode() for p in WANT),
                             "p.jsonl") == WANT
    assert pairs.parse_bytes(b"positive,negative\nI am glad,I am here\nWhat joy,What news\n",
                             "p.csv") == WANT
    assert pairs.parse_bytes(b"I am glad | I am here\n# note\nWhat joy | What news",
                             "p.txt") == WANT
    assert pairs.parse_bytes(b"I am glad\tI am here\nWhat joy\tWhat news\n", "p.txt") == WANT


def test_file_formats_are_recognised_without_a_suffix(tmp_path):
    bodies = {"a": json.dumps([list(p) for p in WANT]),
              "b": "\n".join(json.dumps(list(p)) for p in WANT),
              "c": "I am glad | I am here\nWhat joy | What news\n"}
    for name, body in bodies.items():
        (tmp_path / name).write_text(body)
        assert pairs.read(tmp_path / name) == WANT, name


def test_bad_pairs_are_typed_errors(tmp_path):
    with pytest.raises(InvalidArgumentError, match="limit"):
        pairs.parse_bytes(b"a | b\n" * (pairs.MAX_BYTES // 6 + 1), "p.txt",
                          limit=pairs.MAX_BYTES)
    with pytest.raises(InvalidArgumentError, match="non-empty"):
        pairs.parse_bytes(b'[["only one"]]', "p.json")
    with pytest.raises(InvalidArgumentError, match="no '\\|'"):
        pairs.parse_lines("no separator")
    with pytest.raises(InvalidArgumentError, match="holds no pairs"):
        pairs.parse_bytes(b"  \n", "empty.txt")
    with pytest.raises(CorruptFileError):
        pairs.parse_bytes(b"\xff\xfe not utf-8", "p.txt")
    with pytest.raises(CorruptFileError, match="deeply"):
        pairs.parse_bytes(b"[" * 100_000 + b"]" * 100_000, "deep.txt")
    with pytest.raises(InvalidArgumentError, match="no such pairs file"):
        pairs.read(tmp_path / "missing.json")
