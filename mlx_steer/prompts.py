"""Packaged prompt sets (`data/prompts.json`) and the style instructions used with them.

Sets: "neutral" (everyday chat prompts for demos and quick checks), "calibration"
(what concept defaults are chosen on) and "evaluation" (what they are judged on;
never used for calibration).
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources

from .errors import InvalidArgumentError


@cache
def _data() -> dict:
    return json.loads(resources.files("mlx_steer").joinpath("data/prompts.json").read_text())


def prompt_set(name: str, n: int | None = None) -> list[str]:
    """The first `n` prompts (default: all) of a packaged set."""
    data = _data()
    if name not in data or not isinstance(data[name], list):
        raise InvalidArgumentError(f"no prompt set {name!r}")
    return list(data[name][:n])


def neutral_prompts(n: int | None = None) -> list[str]:
    return prompt_set("neutral", n)


def default_instruction(name: str) -> str:
    """A style instruction for a concept known only by its name ("cheerful" →
    "Answer in a cheerful way.")."""
    words = re.sub(r"[_\-]+", " ", str(name)).strip() or "different"
    return f"Answer in a {words} way."


def with_instruction(prompt: str, instruction: str) -> str:
    """The prompt a prompted (instructed) request sends: the prompt, then the instruction."""
    return f"{prompt.rstrip()} {instruction.strip()}" if instruction else prompt
