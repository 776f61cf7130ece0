"""The continuous-batching engine on tiny real mlx-lm models, driven tick by tick."""

import numpy as np
import pytest

from mlx_steer import Steer
from mlx_steer.errors import ServerBusyError
from mlx_steer.scheduler import Event, Job, Scheduler
from mlx_steer.steer import as_steers


def vec(lab, seed, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(lab.hidden_size) * scale).astype(
        np.float32)


class Collect:
    def __init__(self):
        self.pieces: list[str] = []
        self.final: Event | None = None

    def __call__(self, ev: Event) -> None:
        assert self.final is None, "an event after the final one"
        if ev.kind == "text":
            self.pieces.append(ev.text)
        else:
            self.final = ev

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def job(lab, prompt, steer=None, max_tokens=10, **kw):
    sink = Collect()
    return Job(lab.encode(prompt, chat=True), as_steers(steer), max_tokens, sink, **kw), sink


def run(sched, limit=200):
    for _ in range(limit):
        s = sched.stats()
        if not s["rows"] and not s["queued"]:
            return
        sched.tick()
    raise AssertionError("the engine did not finish")


def test_rows_joining_and_leaving_equal_requests_alone(tiny):
    v, w = vec(tiny, 1), vec(tiny, 2)
    cases = [
        ("The meeting went", None, {}),
        ("Hi", Steer(v, 1, 1.0, "generated"), {}),
        ("A much longer prompt than the others, to pad them", Steer(w, 2, 1.5, 6), {}),
        ("The meeting went", [Steer(v, 0, 0.7), Steer(w, 3, 1.0, "prompt")], {}),
        ("Other words", Steer(v, 2, 1.0), {"temperature": 0.8, "seed": 5}),
        ("Other words", None, {"temperature": 0.8, "seed": 6}),
    ]
    lens = [10, 4, 12, 7, 10, 9]
    expected = [tiny.generate(p, s, max_tokens=n, **kw) for (p, s, kw), n in zip(cases, lens)]
    assert len(set(expected)) == len(expected)
    sched = Scheduler(tiny.model, tiny.tokenizer, max_rows=4, max_queue=8)
    jobs = [job(tiny, p, s, n, **kw) for (p, s, kw), n in zip(cases, lens)]
    # Arrivals at different token boundaries: rows join a running batch (left-padded,
    # at other offsets) and leave it while others go on; two wait for a free row.
    sched.submit(jobs[0][0])
    sched.tick()
    sched.tick()
    sched.submit(jobs[1][0])
    sched.submit(jobs[2][0])
    sched.tick()
    for j, _ in jobs[3:]:
        sched.submit(j)
    sched.tick()
    assert sched.stats()["rows"] == 4 and sched.stats()["queued"] == 2
    run(sched)
    for (_, sink), want, n in zip(jobs, expected, lens):
        assert sink.text == want
        assert sink.final.finish_reason in ("length", "stop")
    st = sched.stats()
    assert st["joined_running"] >= 4 and st["finished"] == 6 and st["peak_rows"] == 4


def test_stop_strings_are_held_back_and_cut(tiny):
    full = tiny.generate("The meeting went", max_tokens=12)
    stop = full[5:8]
    assert stop and full.index(stop) == 5
    sched = Scheduler(tiny.model, tiny.tokenizer)
    j, sink = job(tiny, "The meeting went", max_tokens=12, stop=[stop, "never-there"])
    sched.submit(j)
    run(sched)
    assert sink.text == full[:5] and sink.final.finish_reason == "stop"
    assert all(stop not in p for p in sink.pieces)


def test_cancel_drops_queued_and_running_rows(tiny):
    sched = Scheduler(tiny.model, tiny.tokenizer, max_rows=1, max_queue=1)
    a, sa = job(tiny, "The meeting went", max_tokens=50)
    b, sb = job(tiny, "Hi", max_tokens=50)
    sched.submit(a)
    sched.tick()  # a decodes: its first token from the prefill, one more from the step
    sched.submit(b)
    with pytest.raises(ServerBusyError, match="queue is full"):
        sched.submit(job(tiny, "Hi")[0])
    sched.tick()  # b waits for the one row
    assert sched.stats()["queued"] == 1
    sched.cancel(b)  # queued: removed at once
    assert sb.final.finish_reason == "cancelled" and sched.stats()["queued"] == 0
    sched.cancel(a)  # decoding: dropped at the next boundary
    assert sa.final is None
    sched.tick()
    assert sa.final.finish_reason == "cancelled" and sa.final.completion_tokens == 3
    st = sched.stats()
    assert st["rows"] == 0 and st["dropped"] == 2
    sched.cancel(a)  # a finished job: nothing happens
    assert sched.stats()["dropped"] == 2


def test_engine_thread_serves_and_closes(tiny):
    import threading

    sched = Scheduler(tiny.model, tiny.tokenizer).start()
    want = tiny.generate("Hi", max_tokens=6)
    done = threading.Event()
    pieces = []

    def sink(ev):
        pieces.append(ev)
        if ev.kind != "text":
            done.set()

    sched.submit(Job(tiny.encode("Hi", chat=True), [], 6, sink))
    assert done.wait(30)
    assert "".join(e.text for e in pieces if e.kind == "text") == want
    sched.close()
    with pytest.raises(ServerBusyError):
        sched.submit(Job([1], [], 1, sink))


def test_queue_bound_counts_only_requests_waiting_for_a_row(tiny):
    sched = Scheduler(tiny.model, tiny.tokenizer, max_rows=2, max_queue=0)
    sched.submit(job(tiny, "Hi", max_tokens=3)[0])
    sched.submit(job(tiny, "Hi", max_tokens=3)[0])  # two free rows: neither waits
    with pytest.raises(ServerBusyError):
        sched.submit(job(tiny, "Hi", max_tokens=3)[0])
    run(sched)
    sched.submit(job(tiny, "Hi", max_tokens=3)[0])  # rows free again
    run(sched)
    assert sched.stats()["finished"] == 3
