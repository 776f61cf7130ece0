"""The steering spec: which vector to add, where, how hard, and on which tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence, Union

import numpy as np

from . import validate
from .errors import (
    InvalidArgumentError,
    InvalidPositionsError,
    InvalidStrengthError,
    LayerOutOfRangeError,
    ModelMismatchError,
    VectorShapeError,
)

Positions = Union[str, int]
POSITION_RULES = ("all", "prompt", "generated")
NEVER = 2**30  # an absolute position no sequence reaches


def _as_vector(vector) -> np.ndarray:
    try:
        raw = np.asarray(vector)
        if raw.dtype.kind not in "iuf":  # no text, bool, complex or objects
            raise TypeError(f"its values are of type {raw.dtype}, not real numbers")
        with np.errstate(over="ignore"):
            v = np.array(raw, dtype=np.float32, copy=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise VectorShapeError(f"the steering vector is not numeric: {e}") from None
    if v.ndim == 2 and 1 in v.shape:
        v = v.reshape(-1)
    if v.ndim != 1 or v.size == 0:
        raise VectorShapeError(
            f"a steering vector must be 1-D (hidden_size,), got shape {v.shape}"
        )
    if not np.all(np.isfinite(v)):
        raise VectorShapeError("the steering vector contains NaN or infinite values")
    v.setflags(write=False)
    return v


@dataclass(frozen=True, eq=False)
class Steer:
    """Add `strength * vector` to the output of decoder block `layer`.

    Args:
        vector: a (hidden_size,) direction; stored as float32, cast to the
            residual stream's dtype when applied.
        layer: 0-based block index; the vector is added to that block's output
            (HF `hidden_states[layer + 1]`).
        strength: raw multiplier of `vector`.
        positions: "all" (every token but position 0, the attention sink),
            "prompt" (prompt tokens but position 0), "generated" (tokens after
            the prompt), or an int k (absolute positions >= k; 0 includes the
            first token).
        model_fingerprint: the model the vector was made for, if known; a Lab
            refuses vectors made for another model.
    """

    vector: np.ndarray
    layer: int
    strength: float = 1.0
    positions: Positions = "all"
    model_fingerprint: str | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", _as_vector(self.vector))
        if isinstance(self.layer, bool) or not isinstance(self.layer, (int, np.integer)):
            raise LayerOutOfRangeError(f"layer must be an int, got {self.layer!r}")
        if self.layer < 0:
            raise LayerOutOfRangeError(f"layer must be >= 0, got {self.layer}")
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "strength",
                           validate.real(self.strength, "strength", InvalidStrengthError))
        p = self.positions
        if isinstance(p, (int, np.integer)) and not isinstance(p, bool):
            object.__setattr__(self, "positions",
                               validate.integer(p, "positions", 0, NEVER, InvalidPositionsError))
        elif p not in POSITION_RULES:
            raise InvalidPositionsError(
                f"positions must be one of {POSITION_RULES} or an int >= 0, got {p!r}"
            )
        if not np.all(np.isfinite(self.delta)):
            raise InvalidStrengthError("strength * vector overflows float32")

    @property
    def delta(self) -> np.ndarray:
        """The float32 vector actually added: `strength * vector`."""
        with np.errstate(over="ignore"):
            return (np.float32(self.strength) * self.vector).astype(np.float32)

    def window(self, prompt_len: int) -> tuple[int, int]:
        """Absolute positions [start, end) steered for a prompt of `prompt_len` tokens."""
        p = self.positions
        if p == "all":
            return 1, NEVER
        if p == "prompt":
            return 1, prompt_len
        if p == "generated":
            return prompt_len, NEVER
        return int(p), NEVER

    def scaled(self, factor: float) -> "Steer":
        """The same steer with strength multiplied by `factor`."""
        return Steer(self.vector, self.layer, self.strength * factor, self.positions,
                     self.model_fingerprint)

    def __repr__(self) -> str:
        return (f"Steer(vector=<{self.vector.shape[0]} floats, |v|="
                f"{float(np.linalg.norm(self.vector)):.3g}>, layer={self.layer}, "
                f"strength={self.strength:g}, positions={self.positions!r})")


SteerLike = Union[Steer, Sequence[Steer], None]


def as_steers(steer: SteerLike) -> list[Steer]:
    """Normalise None / one Steer / a sequence of Steers to a list."""
    if steer is None:
        return []
    if isinstance(steer, Steer):
        return [steer]
    if isinstance(steer, (str, bytes)) or not isinstance(steer, Iterable):
        raise InvalidArgumentError(
            f"steer must be a Steer, a list of Steers or None, got {type(steer).__name__}")
    out = list(steer)
    for s in out:
        if not isinstance(s, Steer):
            raise InvalidArgumentError(f"expected Steer objects, got {type(s).__name__}")
    return out


def check_steers(steers: Iterable[Steer], num_layers: int, hidden_size: int,
                 fingerprint: str | None = None) -> None:
    """Raise a typed error if any steer does not fit the model."""
    for s in steers:
        if s.layer >= num_layers:
            raise LayerOutOfRangeError(
                f"layer {s.layer} is out of range: this model has {num_layers} "
                f"layers (0 … {num_layers - 1})"
            )
        if s.vector.shape[0] != hidden_size:
            raise VectorShapeError(
                f"the vector has {s.vector.shape[0]} dimensions but this model's "
                f"hidden size is {hidden_size}: it was made for another model"
            )
        if (fingerprint is not None and s.model_fingerprint is not None
                and s.model_fingerprint != fingerprint):
            raise ModelMismatchError(
                "this vector was made for another model (fingerprint "
                f"{s.model_fingerprint[:12]} ≠ {fingerprint[:12]}); extract it again "
                "for the loaded model"
            )
