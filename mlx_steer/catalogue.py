"""The built-in concepts: their names and packaged specs (`data/concepts/<name>.json`:
contrast pairs, a style instruction, an evaluation rule)."""

from __future__ import annotations

import hashlib
import json
from importlib import resources

from .files import read_json

BUILTINS = ("happy", "sad", "angry", "fearful", "excited", "calm", "formal", "casual",
            "poetic", "technical", "pirate", "shakespeare", "enthusiastic", "pessimistic",
            "confident", "brief", "verbose")


def builtin_spec(name: str) -> dict:
    """The packaged JSON spec of a built-in concept."""
    path = resources.files("mlx_steer").joinpath(f"data/concepts/{name}.json")
    return read_json(path.read_text(), f"built-in concept file {name}.json")


def spec_digest(spec: dict) -> str:
    """A short digest of a spec: a cached copy made from another spec is stale."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
