"""Argument types and shared options of the `mlx-steer` commands.

argparse (standard library) with shared validator functions rather than click or
typer: the CLI's contract (one-line errors, exit status 2, `--help` text, the
`--json`/`--quiet`/`--model` options on every level) was already argparse's, and a
validator here is an ordinary function that tests can call directly.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from ..steer import OPS  # noqa: F401 - re-exported for the command modules

Command = Callable[[str, str, str], argparse.ArgumentParser]  # (name, help, description)
MAX_LIST = 1024  # more layers than any model has: a longer list is a typo


class UsageError(Exception):
    """A bad command line: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UsageError(f"{message} (see '{self.prog} --help')")


def int_list(text: str) -> list[int]:
    """'4,8,12' or '0-29:4'. Sizes are checked before a range is expanded, so a short
    argument cannot ask for unbounded work."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                rng, _, step = part.partition(":")
                a, b = rng.split("-", 1)
                r = range(int(a), int(b) + 1, int(step or 1))
                if int(step or 1) < 1:
                    raise argparse.ArgumentTypeError(f"a range step must be >= 1, got {part!r}")
                n = (r.stop - r.start + r.step - 1) // r.step if r.stop > r.start else 0
                if len(out) + n > MAX_LIST:  # counted, not expanded (len() overflows)
                    raise argparse.ArgumentTypeError(
                        f"{part!r} has {n} values; at most {MAX_LIST} are allowed")
                out += list(r)
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected integers like 4,8,12 or 0-28:4, got {text!r:.80}") from None
        if len(out) > MAX_LIST:
            raise argparse.ArgumentTypeError(f"more than {MAX_LIST} values in the list")
    if not out:
        raise argparse.ArgumentTypeError(f"no layers in {text!r}")
    return out


def layers(text: str) -> list[int] | str:
    return "all" if text.strip().lower() == "all" else int_list(text)


def number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def numbers(text: str) -> list[float]:
    vals = [number(p) for p in text.split(",") if p.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.1,0.2,0.4, got {text!r}")
    return vals


def _integer(text: str, low: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
    return v


def positive(text: str) -> int:
    return _integer(text, 1)


def count(text: str) -> int:
    return _integer(text, 0)


def nonneg(text: str) -> float:
    v = number(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


def positions(text: str) -> str | int:
    if text in ("all", "prompt", "generated"):
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"positions must be all, prompt, generated or an integer >= 0, got {text!r}"
        ) from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"positions must be >= 0, got {v}")
    return v


def weights(text: str) -> list[tuple[str, float]]:
    """'happy:0.7,excited:0.3' (or name=weight) as [(name, weight)]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, w = item.replace("=", ":").partition(":")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(
                f"expected name:weight items like happy:0.7,excited:0.3, got {item!r}")
        out.append((name.strip(), number(w)))
    if not out:
        raise argparse.ArgumentTypeError("give at least one name:weight")
    return out


def add_spec(text: str) -> tuple[str, float | None, int | None]:
    """NAME[:STRENGTH][@LAYER] of `bake --add`."""
    rest, _, layer = text.partition("@")
    name, _, strength = rest.partition(":")
    try:
        return (name.strip(), float(strength) if strength.strip() else None,
                int(layer) if layer.strip() else None)
    except ValueError:
        raise UsageError(f"--add expects NAME[:STRENGTH][@LAYER], got {text!r}") from None


# ---- option groups ---------------------------------------------------------------------------


def common(p: argparse.ArgumentParser, top: bool = False) -> None:
    d = None if top else argparse.SUPPRESS  # sub-commands don't override the top level
    p.add_argument("--model", default=d, metavar="NAME",
                   help="model: embedded (default), mistral-7b, phi-3-mini, auto, a Hugging "
                        "Face repo id, an MLX folder or a llama .gguf file")
    p.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="print machine-readable JSON on stdout")
    p.add_argument("--quiet", "-q", action="store_true",
                   default=False if top else argparse.SUPPRESS,
                   help="no progress bars on stderr")
    p.add_argument("--shard", action="store_true",
                   default=False if top else argparse.SUPPRESS,
                   help="under mlx.launch: shard the model across the ranks (mlx-lm's "
                        "tensor parallelism, else its pipeline stages) instead of "
                        "splitting the rows of an experiment")


def steering(p: argparse.ArgumentParser, concept_required: bool = True,
             strength_help: str = "") -> None:
    src = p.add_mutually_exclusive_group(required=concept_required)
    src.add_argument("--concept", metavar="NAME",
                     help="a built-in or saved concept (see `mlx-steer concepts list`)")
    src.add_argument("--vector", metavar="FILE",
                     help="a steering vector file instead: .npy of shape (hidden,) (needs "
                          "--layer) or (layers, hidden), or a llama.cpp control vector .gguf")
    p.add_argument("--layer", type=int, metavar="L",
                   help="0-based decoder block to steer (default: the concept's recommended)")
    p.add_argument("--strength", type=number, metavar="S", help=strength_help or (
        "relative strength: a fraction of the residual norm at the layer (default: the "
        "concept's recommended); with --raw, a raw multiplier of the vector"))
    p.add_argument("--raw", action="store_true",
                   help="--strength(s) are raw multipliers of the vector, not relative")
    p.add_argument("--positions", type=positions, default="all", metavar="P",
                   help="tokens to steer: all (default), prompt, generated, or an integer k "
                        "(absolute positions >= k)")


def sampling(p: argparse.ArgumentParser, max_tokens: int = 60, temperature: float = 0.0,
             metrics_option: bool = False) -> None:
    """--max-tokens, --temperature, --seed (and --no-metrics with `metrics_option`)."""
    p.add_argument("--max-tokens", type=positive, default=max_tokens, metavar="N",
                   help=f"tokens to generate per row (default {max_tokens})")
    p.add_argument("--temperature", type=nonneg, default=temperature, metavar="T",
                   help=f"sampling temperature, 0 = greedy (default {temperature:g})")
    p.add_argument("--seed", type=int, default=0, metavar="K",
                   help="sampling seed, the same for every row (default 0)")
    if metrics_option:
        p.add_argument("--no-metrics", action="store_true",
                       help="skip the model-based metrics (perplexity, projection)")
