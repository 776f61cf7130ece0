"""Scale-out on MLX's own distributed engine (`mx.distributed`, started by `mlx.launch`).

Two ways to use several processes (ranks), on one machine or across Macs:

- a model too big for one machine: `mlx_steer.load(name, group=world())` shards it
  with mlx-lm's tensor parallelism (`models/base.py` does the sharding); every rank
  then runs every request together;
- a grid too long for one machine: each rank loads the whole model and
  `experiments.run(..., group=world())` gives each rank its share of the rows (see
  `experiments.run`); the records are gathered here, on every rank, and equal a
  single-process run.

The gather is a collective: a rank that raises sends its error instead of its
records, so every rank raises `DistributedError` (or the same typed input error)
rather than returning a partial grid; a rank that never answers is caught by a
watchdog that ends the process after `timeout` seconds (a blocked MLX collective
cannot be interrupted from Python, hence the hard exit).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from . import config, errors
from .errors import DistributedError, InvalidArgumentError

Group = Any  # mx.distributed.Group
TIMEOUT_ENV = "MLX_STEER_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0  # seconds a rank waits for the others at a gather


def world() -> Group | None:
    """The group `mlx.launch` started this process in, or None when it runs alone."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def rank(group: Group | None) -> int:
    return 0 if group is None else group.rank()


def size(group: Group | None) -> int:
    return 1 if group is None else group.size()


def is_lead(group: Group | None) -> bool:
    """True on the rank that reports (rank 0), and when running alone."""
    return rank(group) == 0


def share(n: int, rank: int, size: int) -> range:
    """The contiguous rows of `n` that `rank` of `size` runs (sizes differ by ≤ 1)."""
    if size < 1 or not 0 <= rank < size:
        raise InvalidArgumentError(f"rank {rank} is not in a group of {size}")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def timeout_s(timeout: float | None = None) -> float:
    """`timeout`, else $MLX_STEER_DIST_TIMEOUT, else DEFAULT_TIMEOUT seconds."""
    if timeout is None:
        try:
            timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
        except ValueError:
            raise InvalidArgumentError(f"${TIMEOUT_ENV} must be a number of seconds") from None
    if not timeout > 0:
        raise InvalidArgumentError(f"the distributed timeout must be > 0 s, got {timeout}")
    return float(timeout)


class Watchdog:
    """Ends the process (exit status 1, message on stderr) unless left within `timeout`."""

    def __init__(self, timeout: float, what: str):
        self.timeout, self.what = timeout, what
        self.timer = threading.Timer(timeout, self._expire)
        self.timer.daemon = True

    def _expire(self) -> None:
        sys.stderr.write(f"mlx-steer: error: {self.what}: no answer from every rank within "
                         f"{self.timeout:g} s (${TIMEOUT_ENV}); giving up, no results\n")
        sys.stderr.flush()
        os._exit(1)

    def __enter__(self) -> "Watchdog":
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()


def all_gather_bytes(data: bytes, group: Group) -> list[bytes]:
    """Every rank's `data`, in rank order, on every rank (padded uint8 all_gather)."""
    n = size(group)
    lens = mx.distributed.all_gather(mx.array([len(data)], mx.int32), group=group,
                                     stream=mx.cpu)
    lens = [int(x) for x in lens.tolist()]
    width = max(max(lens), 1)
    buf = mx.array(np.frombuffer(data.ljust(width, b"\0"), np.uint8))
    allb = mx.distributed.all_gather(buf, group=group, stream=mx.cpu)
    raw = np.asarray(allb).tobytes()  # (n * width,) uint8
    return [raw[r * width: r * width + lens[r]] for r in range(n)]


def _failure(e: BaseException) -> dict:
    return {"ok": False, "type": type(e).__name__, "message": str(e),
            "typed": isinstance(e, errors.MlxSteerError),
            "trace": traceback.format_exc(limit=8)}


def gather_results(fn: Callable[[], Any], group: Group, *, what: str = "distributed run",
                   timeout: float | None = None) -> list[Any]:
    """Run `fn()` (this rank's share, returning something JSON-serialisable) and
    return every rank's result in rank order, on every rank.

    If any rank raised, every rank raises: the same typed error for a user error
    (an `MlxSteerError`), else `DistributedError` naming the rank and its error.
    """
    limit = timeout_s(timeout)  # checked before the work, on every rank alike
    try:
        payload = {"ok": True, "result": fn()}
        data = json.dumps(payload, allow_nan=False).encode()
    except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
        data = json.dumps(_failure(e)).encode()
    with Watchdog(limit, what):
        parts = [json.loads(b) for b in all_gather_bytes(data, group)]
    failed = [(r, p) for r, p in enumerate(parts) if not p["ok"]]
    if failed:
        r, p = failed[0]
        others = f" (and ranks {', '.join(str(x) for x, _ in failed[1:])})" if failed[1:] else ""
        msg = f"rank {r} of {len(parts)} failed{others}"
        cls = getattr(errors, p["type"], None)
        if p["typed"] and isinstance(cls, type) and issubclass(cls, errors.MlxSteerError):
            raise cls(f"{msg}: {p['message']}")
        if config.flag("MLX_STEER_DEBUG"):
            sys.stderr.write(p["trace"])
        raise DistributedError(f"{what}: {msg}: {p['type']}: {p['message']}; "
                               "no results were kept")
    return [p["result"] for p in parts]
