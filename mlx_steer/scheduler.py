"""Continuous batching: concurrent requests decoded together, each with its own steering.

One engine thread owns the running batch. At every token boundary it drops
the rows whose client went away, admits queued requests (each is prefilled
alone, exactly as a lone request, then joins the batch's caches), runs one
decode step for all rows, hands each row's new text to its request, and
retires the rows that finished. Every row keeps its own steering plan,
sampler (and seed), stop strings and absolute positions, so a row produces
what the same request would alone.

The engine holds the model's lock (`lock`) for each step only, so other work
on the same model (extracting a concept) interleaves between steps.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

from . import generation
from .errors import ServerBusyError
from .models import base
from .steer import Steer


@dataclass
class Event:
    """What a request hears from the engine: new text, then one final event."""

    kind: str  # "text", "done" or "error"
    text: str = ""
    finish_reason: str | None = None  # on "done": "stop", "length" or "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class Job:
    """One generation request. `sink` is called from the engine thread; `steers` are
    checked and expanded to int layers (what `Lab.check_request` returns)."""

    tokens: list[int]
    steers: list[Steer]
    max_tokens: int
    sink: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # set once its final event was sent

    def cancel(self) -> None:
        """The client is gone: the engine drops the row at the next token boundary."""
        self.cancelled.set()


class _Row:
    """A request in the running batch: its sampler, detokenizer and text so far."""

    def __init__(self, job: Job, tokenizer):
        self.job = job
        self.sampler = generation.make_sampler(job.temperature, job.top_p, job.seed)
        self.detok = tokenizer.detokenizer
        self.generated = 0
        self.last = -1
        self.text = ""
        self.sent = 0
        # Text that could be the start of a stop string is held back until it is not.
        self.hold = max((len(s) for s in job.stop), default=1) - 1

    def push(self, token: int, eos: set[int]) -> str | None:
        """Take one sampled token; the finish reason when the row is done."""
        if token in eos:
            return self._finish("stop")
        self.detok.add_token(token)
        self.generated += 1
        self.last = token
        self.text += self.detok.last_segment
        cut = self._stop_at()
        if cut is not None:
            self.text = self.text[:cut]
            return self._finish("stop", final=False)
        if self.generated >= self.job.max_tokens:
            return self._finish("length")
        self._send(len(self.text) - self.hold)
        return None

    def _stop_at(self) -> int | None:
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s)))
                            for s in self.job.stop if s) if i >= 0]
        return min(hits) if hits else None

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.job.sink(Event("text", self.text[self.sent:upto]))
            self.sent = upto

    def _finish(self, reason: str, final: bool = True) -> str:
        if final:
            self.detok.finalize()
            self.text += self.detok.last_segment
            cut = self._stop_at()
            if cut is not None:
                self.text, reason = self.text[:cut], "stop"
        self._send(len(self.text))
        return reason


class Scheduler:
    """The engine: admits, decodes and retires rows on its own thread.

    Args:
        model, tokenizer: a steerable mlx-lm model (`base.install`) and its tokenizer.
        max_rows: rows decoded together at most; more requests wait in the queue.
        max_queue: requests waiting for a row at most; `submit` raises
            `ServerBusyError` past it (0: only as many requests as there are free rows).
        lock: held for each step (default: a private lock).
    """

    def __init__(self, model: nn.Module, tokenizer, max_rows: int = 8,
                 max_queue: int = 64, lock=None):
        if max_rows < 1 or max_queue < 0:
            raise ValueError("max_rows must be >= 1 and max_queue >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.lock = lock if lock is not None else threading.RLock()
        self._eos = set(tokenizer.eos_token_ids)
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._rows: list[_Row] = []
        self._caches: list | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.counters = {"admitted": 0, "finished": 0, "dropped": 0, "failed": 0,
                         "steps": 0, "joined_running": 0, "peak_rows": 0}

    # ---- the requests' side (any thread) -----------------------------------------
    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mlx-steer-engine",
                                            daemon=True)
            self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        """Queue `job`; raises `ServerBusyError` when the queue is full."""
        with self._cv:
            if self._closed:
                raise ServerBusyError("the server is shutting down")
            free = max(0, self.max_rows - len(self._rows))
            if len(self._queue) >= self.max_queue + free:
                raise ServerBusyError(
                    f"the request queue is full ({self.max_queue} waiting, "
                    f"{len(self._rows)} rows decoding): try again later")
            self._queue.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Drop `job`: out of the queue now, or out of the batch at the next token
        boundary. No-op once it finished."""
        with self._cv:
            if job.finished:
                return
            job.cancel()
            if job in self._queue:
                self._queue.remove(job)
                self._cancelled_event(job, 0)

    def _cancelled_event(self, job: Job, generated: int) -> None:
        self.counters["dropped"] += 1
        job.finished = True
        job.sink(Event("done", finish_reason="cancelled", prompt_tokens=len(job.tokens),
                       completion_tokens=generated))

    def stats(self) -> dict:
        with self._cv:
            return {"rows": len(self._rows), "queued": len(self._queue),
                    "max_rows": self.max_rows, "max_queue": self.max_queue,
                    **self.counters}

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine; requests still queued or decoding end with an error event."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for job in list(self._queue) + [r.job for r in self._rows]:
            if not job.finished:
                job.finished = True
                job.sink(Event("error", "the server shut down"))
        self._queue.clear()
        self._rows, self._caches = [], None

    # ---- the engine thread ----------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._queue and not self._rows:
                    self._cv.wait()
                if self._closed:
                    return
            self.tick()

    def tick(self) -> None:
        """One token boundary: drop cancelled rows, admit queued requests, decode one
        step. The engine thread calls it in a loop; without `start`, a caller can."""
        with self._cv:
            new = []
            while self._queue and len(self._rows) + len(new) < self.max_rows:
                new.append(self._queue.popleft())
        try:
            with self.lock:
                self._drop_cancelled()
                for job in new:
                    self._admit(job)
                if self._rows:
                    self._step()
        except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
            msg = f"generation failed: {type(e).__name__}: {e}"
            jobs = {id(j): j for j in new + [r.job for r in self._rows]}
            for job in jobs.values():
                if not job.finished:
                    job.finished = True
                    job.sink(Event("error", msg))
                    self.counters["failed"] += 1
            self._rows, self._caches = [], None

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            self._cancelled_event(job, 0)
            return
        # Prefill alone with the request's own plain caches: the same computation
        # as a lone request's prefill, so its first token is exactly that request's.
        plans = base.build_plans([job.steers], [len(job.tokens)])
        caches = base.make_caches(self.model, plans)
        logits = generation.prefill(self.model, mx.array(job.tokens)[None], caches)
        row = _Row(job, self.tokenizer)
        token = row.sampler(generation.log_softmax(logits))
        mx.eval(token)
        self.counters["admitted"] += 1
        if self._rows:
            self.counters["joined_running"] += 1
        reason = row.push(int(token.item()), self._eos)
        if reason is not None:
            self._done(row, reason)
            return
        self._caches = base.join_batch(self._caches, base.as_batch_row(caches))
        self._rows.append(row)
        self._replan()
        self.counters["peak_rows"] = max(self.counters["peak_rows"], len(self._rows))

    def _step(self) -> None:
        y = mx.array([[r.last] for r in self._rows])
        logits = self.model(y, cache=self._caches)[:, -1, :]
        toks = generation.next_tokens(logits, [r.sampler for r in self._rows],
                                      greedy=all(r.job.temperature == 0 for r in self._rows))
        self.counters["steps"] += 1
        keep = []
        for i, (row, t) in enumerate(zip(self._rows, toks.tolist())):
            reason = row.push(t, self._eos)
            if reason is None:
                keep.append(i)
            else:
                self._done(row, reason)
        self._retain(keep)

    def _drop_cancelled(self) -> None:
        keep = []
        for i, row in enumerate(self._rows):
            if row.job.cancelled.is_set():
                self._cancelled_event(row.job, row.generated)
            else:
                keep.append(i)
        self._retain(keep)

    def _retain(self, keep: list[int]) -> None:
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        self._caches = base.keep_rows(self._caches, keep)
        self._replan()

    def _replan(self) -> None:
        if self._caches is not None:
            # Positions are each row's own (the caches' per-row offsets), so the plan
            # only needs each row's steers and prompt length, in the new row order.
            plans = base.build_plans([r.job.steers for r in self._rows],
                                     [len(r.job.tokens) for r in self._rows])
            base.attach_plans(self._caches, plans)

    def _done(self, row: _Row, reason: str) -> None:
        self.counters["finished"] += 1
        row.job.finished = True
        row.job.sink(Event("done", finish_reason=reason, prompt_tokens=len(row.job.tokens),
                           completion_tokens=row.generated))


def wait_idle(scheduler: Scheduler, timeout: float = 10.0) -> bool:
    """True once no row is decoding and none is queued (polls; for tests and tools)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = scheduler.stats()
        if s["rows"] == 0 and s["queued"] == 0:
            return True
        time.sleep(0.01)
    return False
