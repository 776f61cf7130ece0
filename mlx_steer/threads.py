"""A clean interpreter exit after threads other than the main one used MLX.

MLX 0.32 keeps a per-thread cache of `mx.compile`d functions (mlx-lm compiles
activations and samplers) whose entries hold Python objects. The C++ runtime
frees that cache when the OS thread ends, after Python's `Thread.join()` has
already returned. If the main thread has begun shutting the interpreter down by
then, freeing the entries cannot take the GIL, the thread is unwound from a
`noexcept` destructor and the process aborts ("terminate called without an active
exception", exit 134) after all the work was done. Which thread wins is timing: with
many threads it happened in most runs (fast path preloaded or not).

Every thread that runs a model is noted here; at exit, before the interpreter
starts finalising, we wait (bounded) until those threads have really ended, with
the GIL released so their clean-up can run. Linux lists a process's live threads
in /proc/self/task; elsewhere we give them a short pause.
"""

from __future__ import annotations

import atexit
import os
import threading
import time

WAIT_S = 5.0  # at most this long at exit; a thread still running is left alone
_TASKS = "/proc/self/task"
_seen: set[int] = set()
_lock = threading.Lock()


def note_thread() -> None:
    """Record the calling thread if it is not the main thread (cheap; call per request)."""
    if threading.current_thread() is threading.main_thread():
        return
    tid = threading.get_native_id()
    if tid not in _seen:
        with _lock:
            _seen.add(tid)


def _alive(tids: set[int]) -> set[int]:
    return {t for t in tids if os.path.exists(f"{_TASKS}/{t}")}


@atexit.register
def _wait_for_threads() -> None:
    """Runs before the interpreter finalises (atexit), after non-daemon threads joined."""
    if not _seen:
        return
    running = {t.native_id for t in threading.enumerate() if t.is_alive()}
    waiting = _seen - running  # finished in Python, maybe not yet in C++
    if not os.path.isdir(_TASKS):
        time.sleep(0.05)
        return
    deadline = time.monotonic() + WAIT_S
    while waiting and time.monotonic() < deadline:
        waiting = _alive(waiting)
        if waiting:
            time.sleep(0.002)  # releases the GIL: the ending threads take it to clean up
