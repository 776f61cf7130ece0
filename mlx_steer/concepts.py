"""`ConceptStore`: every concept a model can use, reached as `lab.concepts`.

One owner for concept management: the model's saved library, the built-in
catalogue (extracted and calibrated on first use, then cached under the
library's `builtin/` folder) and extraction of new concepts. `Lab` keeps a few
one-line delegators (`lab.concept`, `lab.extract`, `lab.save_concept`,
`lab.ensure_builtins`, `lab.library`) because the README's examples use them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from . import calibrate
from .activations import Progress
from .catalogue import BUILTINS, builtin_spec, spec_digest
from .concept import Concept, validate_name
from .errors import ConceptNotFoundError, MlxSteerError
from .extract import extract
from .library import Library

if TYPE_CHECKING:
    from pathlib import Path

    from .lab import Lab


def builtin_digest(name: str) -> str:
    """What a cached built-in was made from: its spec and the calibration rule (read at
    call time: a new rule makes every cached built-in stale)."""
    return spec_digest({**builtin_spec(name),
                        "calibration_version": calibrate.CALIBRATION_VERSION})


class ConceptStore:
    """The concepts of one lab's model: saved ones first, then the built-ins."""

    def __init__(self, lab: "Lab"):
        self.lab = lab

    @property
    def library(self) -> Library:
        """This model's saved concepts (under `$MLX_STEER_HOME/concepts/`)."""
        return Library(self.lab.fingerprint, self.lab.name)

    @property
    def builtin_cache(self) -> Library:
        """Where built-ins extracted for this model are kept."""
        return Library(self.lab.fingerprint, self.lab.name, sub="builtin")

    @staticmethod
    def builtins() -> list[str]:
        return list(BUILTINS)

    def names(self) -> list[str]:
        """Names usable with `get()`: the built-ins and this model's library."""
        return sorted(set(BUILTINS) | set(self.library.names()))

    def __contains__(self, name: str) -> bool:
        return validate_name(name) in self.names()

    def get(self, name: str, progress: Progress | None = None) -> Concept:
        """A concept by name: the library's, else a built-in (extracted once, cached;
        `progress(done, total)` reports that extraction)."""
        name = validate_name(name)
        if name in self.library:
            return self.library.load(name)
        if name in BUILTINS:
            return self._builtin(name, progress)
        raise ConceptNotFoundError(
            f"no concept {name!r} for {self.lab.name}; available: {', '.join(self.names())}")

    def ready(self, name: str) -> Concept | None:
        """`get(name)` when that needs no extraction (saved, or a built-in already cached
        for this model), else None."""
        name = validate_name(name)
        if name in self.library:
            return self.library.load(name)
        return self._cached_builtin(name) if name in BUILTINS else None

    def is_ready(self, name: str) -> bool:
        """Whether `get(name)` is a file read (no extraction): cheap, reads no vectors."""
        name = validate_name(name)
        return name in self.library or name in self.builtin_cache

    def _cached_builtin(self, name: str) -> Concept | None:
        cache = self.builtin_cache
        if name in cache:
            try:
                c = cache.load(name)
                if c.extra.get("spec_digest") == builtin_digest(name):
                    return c
            except MlxSteerError:
                pass  # unreadable, invalid or another model's: extracted again by _builtin
        return None

    def _builtin(self, name: str, progress: Progress | None = None) -> Concept:
        c = self._cached_builtin(name)
        if c is not None:
            return c
        spec = builtin_spec(name)
        c = self.extract(name, spec["pairs"], method="mean", read="last",
                         chat=spec.get("template") == "chat", progress=progress,
                         category=spec.get("category", "builtin"),
                         description=spec.get("description", ""),
                         instruction=spec.get("instruction"))
        c.extra["spec_digest"] = builtin_digest(name)
        c.extra["builtin"] = True
        self.builtin_cache.save(c)
        return c

    def ensure_builtins(self, progress: Progress | None = None) -> list[Concept]:
        """Every built-in concept for this model (missing ones are extracted and cached).

        Shows a tqdm bar unless `progress(done, total)` is given.
        """
        names = self.builtins()
        bar = None
        if progress is None:
            from tqdm.auto import tqdm  # third-party, only when no callback is given

            bar = tqdm(total=len(names), desc="built-in concepts", unit="concept")
        out = []
        for i, name in enumerate(names):
            out.append(self._builtin(name))
            if bar is not None:
                bar.update(1)
            else:
                progress(i + 1, len(names))
        if bar is not None:
            bar.close()
        return out

    def extract(self, name: str, pairs: Sequence[tuple[str, str]], method: str = "mean",
                read: str = "last", chat: bool = False, progress: Progress | None = None,
                layer: int | None = None, seed: int = 0, **meta) -> Concept:
        """A concept from (positive, negative) pairs: a vector for every layer (not saved).
        See `mlx_steer.extract.extract`."""
        return extract(self.lab, name, pairs, method, read, chat, progress, layer=layer,
                       seed=seed, **meta)

    def save(self, concept: Concept) -> "Path":
        """Save to this model's library (atomic; refuses another model's concept)."""
        return self.library.save(concept)

    def delete(self, name: str) -> None:
        self.library.delete(name)
