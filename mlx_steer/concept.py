"""`Concept`: a steering direction for every layer of one model, with its defaults."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from . import validate
from .control_vector import read_control_vector, write_control_vector
from .errors import (InvalidArgumentError, InvalidNameError, InvalidStrengthError,
                     LayerOutOfRangeError, ModelMismatchError)
from .steer import Layer, Positions, Steer

if TYPE_CHECKING:
    from .lab import Lab

SCHEMA_VERSION = 1
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")


def validate_name(name: str) -> str:
    """Lower-cased name of 1–64 letters, digits, '_' or '-' (no paths, no dots)."""
    if not isinstance(name, str):
        raise InvalidNameError(f"a concept name must be text, got {type(name).__name__}")
    clean = name.strip().lower()
    if not NAME_PATTERN.match(clean):
        raise InvalidNameError(
            f"invalid concept name {name!r}: use 1–64 letters, digits, '_' or '-', "
            "starting with a letter or digit (no spaces, dots or slashes)")
    return clean


def _real_array(x, what: str) -> np.ndarray:
    """A float32 copy of real numbers (text, bool, complex and objects refused)."""
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{what} are not an array of numbers: {e}") from None
    if a.dtype.kind not in "iuf":
        raise InvalidArgumentError(f"{what} must be real numbers, got {a.dtype}")
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(a, dtype=np.float32)


@dataclass(eq=False)
class Concept:
    """A direction per layer (`vectors`, (num_layers, hidden) float32) tied to its model.

    `norms[l]` is the model's typical residual norm after block l (median token
    norm, position 0 excluded): it turns relative strengths into raw ones.
    `layer` and `strength` are the recommended defaults; `strength` is relative
    (a fraction of the residual norm at `layer`).
    """

    name: str
    vectors: np.ndarray
    norms: np.ndarray
    layer: int
    strength: float
    model_fingerprint: str
    model_name: str = ""
    method: str = "mean"
    read: str = "last"
    template: str = "raw"
    pairs: list[tuple[str, str]] = field(default_factory=list)
    category: str = "custom"
    description: str = ""
    created: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vectors = _real_array(self.vectors, "vectors")
        self.norms = _real_array(self.norms, "norms")
        self.validate()

    def validate(self) -> "Concept":
        """Check shapes, finiteness, the layer and the strength (run at construction, save
        and load). A concept whose vector at its layer is all zeros gets strength 0 and
        `extra["zero_vector"] = True`: it has no direction to push along."""
        v, n = self.vectors, self.norms
        if v.ndim != 2 or 0 in v.shape or n.shape != (v.shape[0],):
            raise InvalidArgumentError(
                f"vectors must be (num_layers, hidden) and norms (num_layers,), got "
                f"{v.shape} and {n.shape}")
        with np.errstate(over="ignore", invalid="ignore"):
            row_norms = np.linalg.norm(v, axis=1)
        if not (np.all(np.isfinite(v)) and np.all(np.isfinite(row_norms))):
            raise InvalidArgumentError(
                f"concept {self.name!r}: its vectors contain NaN, infinite or too large "
                "values (a vector's norm must fit in float32)")
        if not np.all(np.isfinite(n)) or np.any(n < 0):
            raise InvalidArgumentError(
                f"concept {self.name!r}: residual norms must be finite and >= 0")
        self.layer = validate.integer(self.layer, "layer", 0, v.shape[0] - 1,
                                      LayerOutOfRangeError)
        self.strength = validate.real(self.strength, "strength", InvalidStrengthError)
        if not isinstance(self.extra, dict):
            raise InvalidArgumentError(f"concept {self.name!r}: extra must be a dict")
        if row_norms[self.layer] == 0:
            self.strength = 0.0
            self.extra["zero_vector"] = True
        raw = self.relative_to_raw(self.layer, self.strength)
        if not abs(raw) * float(row_norms[self.layer]) < float(np.finfo(np.float32).max):
            raise InvalidStrengthError(
                f"concept {self.name!r}: strength {self.strength:g} at layer {self.layer} "
                "overflows float32")
        return self

    @property
    def num_layers(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.vectors.shape[1])

    def vector_norm(self, layer: int) -> float:
        return float(np.linalg.norm(self.vectors[self.check_layer(layer)]))

    def check_layer(self, layer: int) -> int:
        """`layer` as an int if this concept's model has that block, else
        LayerOutOfRangeError."""
        return validate.layer(layer, self.num_layers)

    def relative_to_raw(self, layer: int, alpha: float) -> float:
        """Raw multiplier of `vectors[layer]` giving ‖α_rel‖ of the residual norm."""
        n = self.vector_norm(layer)
        return 0.0 if n == 0 else float(alpha) * float(self.norms[layer]) / n

    def raw_to_relative(self, layer: int, raw: float) -> float:
        """α_rel = ‖raw · v‖ / median ‖h‖ at `layer` (signed like `raw`)."""
        norm = float(self.norms[self.check_layer(layer)])
        return 0.0 if norm == 0 else float(raw) * self.vector_norm(layer) / norm

    def steer(self, layer: Layer | None = None, strength: float | None = None,
              relative: bool = True, positions: Positions = "all",
              op: str = "add") -> Steer | list[Steer]:
        """A `Steer` at `layer` (default: recommended) and `strength`.

        With `relative` (default) the strength is a fraction of the residual
        norm at that layer (0.25 = a quarter of a typical token's norm); else
        it multiplies the raw vector. `op` is "add", "ablate" (strength ignored)
        or "cap" (the component along the direction is held at most at
        strength × the median residual norm of that block).

        `layer` may also be a `(start, stop)` range or "all": then one direction,
        the recommended layer's vector, is used at every block (as weight
        orthogonalisation does), and for "add"/"cap" a list of one `Steer` per
        block is returned, each relative strength converted with that block's norm.
        """
        if isinstance(layer, (tuple, list, str)):
            return self._steer_range(layer, strength, relative, positions, op)
        layer = self.layer if layer is None else self.check_layer(layer)
        if op == "ablate":
            return Steer(self.vectors[layer], layer, 1.0, positions, self.model_fingerprint,
                         op=op)
        if strength is None:
            strength, relative = self.strength, True
        s = validate.real(strength, "strength", InvalidStrengthError)
        raw = self.relative_to_raw(layer, s) if relative else s
        return Steer(self.vectors[layer], layer, raw, positions, self.model_fingerprint, op=op)

    def _steer_range(self, layer, strength, relative, positions, op) -> Steer | list[Steer]:
        v = self.vectors[self.layer]
        span = Steer(v, layer, 1.0, positions, self.model_fingerprint, op=op)
        for i in span.layers(self.num_layers):
            if i >= 0:
                self.check_layer(i)
        if op == "ablate":
            return span
        if strength is None:
            strength, relative = self.strength, True
        s = validate.real(strength, "strength", InvalidStrengthError)
        n = float(np.linalg.norm(v))
        return [Steer(v, i, (s * float(self.norms[i]) / n if n else 0.0) if relative else s,
                      positions, self.model_fingerprint, op=op)
                for i in span.layers(self.num_layers)]

    def ablate(self, layer: Layer = "all", positions: Positions = "all") -> Steer:
        """Remove the concept's direction (the recommended layer's vector) from the
        residual stream at `layer`: every block and the embedding output by default."""
        if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
            self.check_layer(layer)
            return Steer(self.vectors[self.layer], int(layer), 1.0, positions,
                         self.model_fingerprint, op="ablate")
        return self._steer_range(layer, None, True, positions, "ablate")

    def steers(self, layers: Iterable[int], strength: float | None = None,
               relative: bool = True, positions: Positions = "all") -> list[Steer]:
        """One `Steer` per layer, each with that layer's own vector."""
        return [self.steer(layer, strength, relative, positions) for layer in layers]

    # ---- arithmetic ---------------------------------------------------------
    def _check_same_model(self, other: "Concept") -> None:
        if other.model_fingerprint != self.model_fingerprint:
            raise ModelMismatchError(
                f"{self.name!r} and {other.name!r} were made for different models")

    def _derived(self, vectors: np.ndarray, name: str, method: str) -> "Concept":
        return replace(self, name=name, vectors=vectors, method=method, pairs=[],
                       category="mix", created=time.time(), extra={})

    def __add__(self, other: "Concept") -> "Concept":
        self._check_same_model(other)
        return self._derived(self.vectors + other.vectors, f"{self.name}+{other.name}", "sum")

    def __sub__(self, other: "Concept") -> "Concept":
        self._check_same_model(other)
        return self._derived(self.vectors - other.vectors, f"{self.name}-{other.name}", "sum")

    def __mul__(self, k: float) -> "Concept":
        k = validate.real(k, "a concept's scale factor", InvalidStrengthError)
        return self._derived(self.vectors * np.float32(k), f"{k:g}*{self.name}", "scaled")

    __rmul__ = __mul__

    def __neg__(self) -> "Concept":
        return self * -1.0

    @staticmethod
    def mix(parts: Sequence[tuple["Concept", float]], normalize: bool = True,
            name: str | None = None) -> "Concept":
        """Weighted sum of concepts. With `normalize`, each layer's vector is first
        scaled to unit norm so weights mean shares, and the result is rescaled to
        the weighted mean of the parts' norms."""
        if not parts:
            raise InvalidArgumentError("a mix needs at least one concept")
        first = parts[0][0]
        total = np.zeros_like(first.vectors)
        scale = np.zeros(first.num_layers, np.float32)
        wsum = 0.0
        for c, w in parts:
            first._check_same_model(c)
            w = validate.real(w, f"the mix weight of {c.name!r}", InvalidStrengthError)
            if normalize:
                n = np.linalg.norm(c.vectors, axis=1, keepdims=True)
                total += np.float32(w) * np.divide(c.vectors, n, out=np.zeros_like(c.vectors),
                                                   where=n > 0)
                scale += np.float32(abs(w)) * n[:, 0]
                wsum += abs(w)
            else:
                total += np.float32(w) * c.vectors
        if normalize and wsum > 0:
            tn = np.linalg.norm(total, axis=1)
            total *= np.divide(scale / wsum, tn, out=np.zeros_like(tn), where=tn > 0)[:, None]
        label = name or "mix_" + "_".join(f"{c.name}{float(w):g}" for c, w in parts)
        out = first._derived(total, label, "mix")
        out.extra = {"mix": [[c.name, float(w)] for c, w in parts], "normalize": normalize}
        out.description = " + ".join(f"{float(w):g}·{c.name}" for c, w in parts)
        return out

    # ---- files ------------------------------------------------------------------
    def to_gguf(self, path: str | Path, layers: str | Sequence[int] = "default") -> Path:
        """Write a llama.cpp control vector. "default": the recommended layer at the
        recommended strength (llama.cpp then reproduces `concept.steer()` at scale 1);
        "all": every layer's raw vector; or a list of layers (raw)."""
        if isinstance(layers, str) and layers == "default":
            directions = {self.layer: self.vectors[self.layer] * np.float32(
                self.relative_to_raw(self.layer, self.strength))}
        else:
            idx = range(self.num_layers) if layers == "all" else [self.check_layer(i) for i in layers]
            directions = {i: self.vectors[i] for i in idx}
        return write_control_vector(path, directions, self.extra.get("model_hint", ""),
                                    self.num_layers)

    @classmethod
    def from_gguf(cls, path: str | Path, lab: "Lab", name: str | None = None) -> "Concept":
        """Read a llama.cpp / repeng control vector as a concept of `lab`'s model
        (`lab.residual_norms()` measures the norms that make its strength relative)."""
        directions = read_control_vector(path, lab.hidden_size)
        bad = [i for i in directions if i >= lab.num_layers]
        if bad:
            raise ModelMismatchError(
                f"{Path(path).name} steers block {max(bad)} but this model has "
                f"{lab.num_layers} blocks: it was made for another model")
        vectors = np.zeros((lab.num_layers, lab.hidden_size), np.float32)
        for i, v in directions.items():
            vectors[i] = v
        norms = lab.residual_norms()
        rel = np.linalg.norm(vectors, axis=1) / norms
        layer = int(np.argmax(rel))
        return cls(name=name or Path(path).stem, vectors=vectors, norms=norms, layer=layer,
                   strength=float(rel[layer]), model_fingerprint=lab.fingerprint,
                   model_name=lab.name, method="gguf", category="imported",
                   description=f"imported from {Path(path).name}")

