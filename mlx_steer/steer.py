"""The steering spec: which direction, what to do with it, where, how hard, on which tokens.

Operations (`op`) on the residual stream h at a block's output, with v̂ = v / ‖v‖:

- "add":    h ← h + strength · v
- "ablate": h ← h − (h·v̂) v̂              (strength is ignored)
- "cap":    h ← h − max(h·v̂ − c, 0) v̂    with c = strength · ‖v‖, so the component
            along v̂ is at most c (the projection of `strength · v`; a concept's
            relative strength α gives c = α × the median residual norm there)

Composition order at one block output (documented, tested): every "add" of the
request first (summed, in the order given), then every "cap", then every
"ablate" (each in the order given). Projections come last so that "after
ablation the component along v̂ is zero" holds whatever else is added there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
Layer = Union[int, tuple, str]
POSITION_RULES = ("all", "prompt", "generated")
OPS = ("add", "ablate", "cap")
EMBEDDING = -1  # `layer=-1`: the embedding output, i.e. the input of block 0
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
    """Add `strength * vector` to (or ablate / cap `vector`'s direction in) the
    output of decoder block `layer`.

    Args:
        vector: a (hidden_size,) direction; stored as float32, cast to the
            residual stream's dtype when applied.
        layer: 0-based block index; the operation applies to that block's output
            (HF `hidden_states[layer + 1]`). -1 is the embedding output (HF
            `hidden_states[0]`). A `(start, stop)` range or "all" stands for one
            steer per block start … stop-1 (or every block); for `op="ablate"`,
            "all" covers every write into the residual stream — the embedding
            output, the middle of each block (after attention, before the MLP) and
            each block's output — so it matches orthogonalising the weights.
            Ranges are expanded by `expand()` when a request runs.
        strength: raw multiplier of `vector` ("add"); the cap is `strength * ‖vector‖`
            ("cap"); ignored by "ablate".
        positions: "all" (every token but position 0, the attention sink),
            "prompt" (prompt tokens but position 0), "generated" (tokens after
            the prompt), or an int k (absolute positions >= k; 0 includes the
            first token).
        model_fingerprint: the model the vector was made for, if known; a Lab
            refuses vectors made for another model.
        op: "add", "ablate" or "cap" (see the module docstring).
        mid: `op="ablate"` only: also ablate in the middle of the block (the
            attention output, before the MLP reads the stream).
    """

    vector: np.ndarray
    layer: int
    strength: float = 1.0
    positions: Positions = "all"
    model_fingerprint: str | None = field(default=None)
    op: str = "add"
    mid: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", _as_vector(self.vector))
        object.__setattr__(self, "layer", _as_layer(self.layer))
        if self.op not in OPS:
            raise InvalidArgumentError(f"op must be one of {OPS}, got {self.op!r}")
        if self.op != "add" and not np.linalg.norm(self.vector) > 0:
            raise VectorShapeError(f"op={self.op!r} needs a non-zero vector (its direction)")
        if self.mid and self.op != "ablate":
            raise InvalidArgumentError("mid=True applies to op='ablate' only")
        if self.mid and self.layer == EMBEDDING:
            raise InvalidArgumentError("mid=True needs a block, not the embedding output")
        object.__setattr__(self, "mid", bool(self.mid))
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
    def unit(self) -> np.ndarray:
        """The float32 unit direction v̂ (zero for a zero vector)."""
        n = np.linalg.norm(self.vector.astype(np.float64))
        return (self.vector / n).astype(np.float32) if n > 0 else np.zeros_like(self.vector)

    @property
    def cap(self) -> float:
        """The bound on h·v̂ of `op="cap"`: strength · ‖vector‖."""
        return float(self.strength * np.linalg.norm(self.vector.astype(np.float64)))

    @property
    def is_noop(self) -> bool:
        """True for an addition of strength 0 (skipped, so bit-identical to no steer)."""
        return self.op == "add" and self.strength == 0.0

    def layers(self, num_layers: int) -> list[int]:
        """The blocks (-1: embedding output) this steer applies to on a model."""
        if isinstance(self.layer, int):
            return [self.layer]
        if self.layer == "all":
            return ([EMBEDDING] if self.op == "ablate" else []) + list(range(num_layers))
        return list(range(*self.layer))

    def expand(self, num_layers: int) -> list["Steer"]:
        """One steer per block for a range or "all"; itself for an int layer."""
        if isinstance(self.layer, int):
            return [self]
        every = self.layer == "all" and self.op == "ablate"
        return [replace(self, layer=i, mid=(every and i >= 0) or self.mid)
                for i in self.layers(num_layers)]

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
        return replace(self, strength=self.strength * factor)

    def __repr__(self) -> str:
        return (f"Steer(vector=<{self.vector.shape[0]} floats, |v|="
                f"{float(np.linalg.norm(self.vector)):.3g}>, layer={self.layer!r}, "
                f"strength={self.strength:g}, positions={self.positions!r}, op={self.op!r}"
                + (", mid=True" if self.mid else "") + ")")


def _as_layer(layer) -> int | tuple[int, int] | str:
    if isinstance(layer, str):
        if layer == "all":
            return layer
        raise LayerOutOfRangeError(f'layer must be an int, a (start, stop) range or "all", '
                                   f"got {layer!r}")
    if isinstance(layer, (tuple, list)):
        if len(layer) != 2 or not all(isinstance(x, (int, np.integer))
                                      and not isinstance(x, bool) for x in layer):
            raise LayerOutOfRangeError(f"a layer range is (start, stop) ints, got {layer!r}")
        start, stop = int(layer[0]), int(layer[1])
        if not 0 <= start < stop:
            raise LayerOutOfRangeError(
                f"a layer range needs 0 <= start < stop, got ({start}, {stop})")
        return (start, stop)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise LayerOutOfRangeError(f"layer must be an int, got {layer!r}")
    if layer < EMBEDDING:
        raise LayerOutOfRangeError(
            f"layer must be >= 0 (or -1, the embedding output), got {layer}")
    return int(layer)


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


def expand_steers(steers: Iterable[Steer], num_layers: int) -> list[Steer]:
    """Every steer with an int layer: ranges and "all" become one steer per block."""
    return [e for s in steers for e in s.expand(num_layers)]


def check_steers(steers: Iterable[Steer], num_layers: int, hidden_size: int,
                 fingerprint: str | None = None) -> None:
    """Raise a typed error if any steer does not fit the model."""
    for s in steers:
        last = max(s.layers(num_layers), default=-1)
        if last >= num_layers:
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
