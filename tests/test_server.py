"""`mlx-steer serve`: the embedded model behind a real uvicorn server on loopback,
driven by the official `openai` client (and raw HTTP for malformed requests)."""

import http.client
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from mlx_steer.server import SteerServer  # noqa: E402

pytestmark = pytest.mark.model
N = 12  # tokens per answer: short keeps the suite fast


class Running:
    """A SteerServer on a free loopback port, in a thread of this process."""

    def __init__(self, lab, **options):
        self.steer_server = SteerServer(lab, **options)
        self.scheduler = self.steer_server.scheduler
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.uv = uvicorn.Server(uvicorn.Config(self.steer_server.app, log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while not self.uv.started:
            assert time.monotonic() < end and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused",
                                    max_retries=0, timeout=120)

    def stats(self) -> dict:
        return self.scheduler.stats()

    def wait(self, cond, timeout=30.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = self.stats()
            if cond(s):
                return s
            time.sleep(0.005)
        raise AssertionError(f"timed out; stats: {self.stats()}")

    def post(self, path: str, body: bytes | dict) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def close(self) -> None:
        self.uv.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(smollm):
    s = Running(smollm, max_request_bytes=64 * 1024)
    yield s
    s.close()


@pytest.fixture(scope="module")
def concepts(smollm):
    return {"happy": smollm.concept("happy"), "sad": smollm.concept("sad")}


def alone(lab, prompt, steer=None, max_tokens=N, **kw) -> str:
    with lab.lock:  # the server's engine runs the same model
        return lab.generate(prompt, steer, max_tokens=max_tokens, **kw)


def chat(client, prompt, steering=None, stream=False, max_tokens=N, **kw):
    """(text, finish_reason, usage) of one chat request."""
    extra = {"steering": steering} if steering is not None else None
    msgs = [{"role": "user", "content": prompt}]
    if not stream:
        r = client.chat.completions.create(model="smollm2", messages=msgs,
                                           max_tokens=max_tokens, extra_body=extra, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    parts, finish, usage = [], None, None
    for c in client.chat.completions.create(model="smollm2", messages=msgs,
                                            max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body=extra, **kw):
        if c.usage is not None:
            usage = c.usage
        for ch in c.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    return "".join(parts), finish, usage


def complete(client, prompt, steering=None, stream=False, max_tokens=N):
    extra = {"steering": steering} if steering is not None else None
    if not stream:
        r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=max_tokens,
                                      extra_body=extra)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage
    parts, finish = [], None
    for c in client.completions.create(model="smollm2", prompt=prompt, max_tokens=max_tokens,
                                       stream=True, extra_body=extra):
        for ch in c.choices:
            parts.append(ch.text)
            finish = ch.finish_reason or finish
    return "".join(parts), finish, None


def test_models_and_concepts(server, smollm, concepts):
    assert [m.id for m in server.client.models.list().data] == [smollm.name]
    with urllib.request.urlopen(server.url + "/v1/concepts", timeout=60) as r:
        listing = json.loads(r.read())
    by_name = {c["id"]: c for c in listing["data"]}
    assert set(smollm.concepts.builtins()) <= set(by_name)
    assert listing["num_layers"] == smollm.num_layers
    h = by_name["happy"]  # extracted by the `concepts` fixture: its defaults are listed
    assert h["ready"] and (h["layer"], h["strength"]) == (concepts["happy"].layer,
                                                          concepts["happy"].strength)


def test_chat_and_completions_equal_lab_generate(server, smollm, concepts):
    happy, sad = concepts["happy"], concepts["sad"]
    p, q = "Tell me about your weekend.", "The old lighthouse keeper"
    c = server.client

    text, finish, usage = chat(c, p)
    assert text == alone(smollm, p) and finish == "length"
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(smollm.encode(p, True)), N)

    steered, finish, usage = chat(c, p, [{"concept": "happy"}], stream=True)
    assert steered == alone(smollm, p, happy.steer()) and finish == "length"
    assert steered != text and usage.completion_tokens == N

    text, finish, usage = complete(c, q, [{"concept": "sad", "layer": 12, "strength": 0.3}])
    assert text == alone(smollm, q, sad.steer(12, 0.3), chat=False)
    assert usage.prompt_tokens == len(smollm.encode(q))
    plain, finish, _ = complete(c, q, stream=True)
    assert plain == alone(smollm, q, chat=False) and finish == "length"
    assert plain != text

    # Sampling: the request's seed gives what a lone request with that seed draws.
    sampled, _, _ = chat(c, p, [{"concept": "happy", "strength": 0.2}], temperature=0.9,
                         seed=11)
    assert sampled == alone(smollm, p, happy.steer(strength=0.2), temperature=0.9, seed=11)

    # Other operations go through Concept.steer, ranges and "all" included.
    capped, _, _ = chat(c, p, [{"concept": "happy", "op": "cap", "layer": 14, "strength": 0.0}])
    assert capped == alone(smollm, p, happy.steer(14, 0.0, op="cap"))
    ablated, _, _ = chat(c, p, [{"concept": "sad", "op": "ablate", "layer": "all"}])
    assert ablated == alone(smollm, p, sad.ablate())


def test_stop_strings_end_the_answer(server, smollm):
    p = "Tell me about your weekend."
    full = alone(smollm, p)
    word = full.split()[3]
    for stream in (False, True):
        text, finish, _ = chat(server.client, p, stream=stream, stop=[word])
        assert text == full[:full.index(word)] and finish == "stop"


def test_eight_concurrent_clients_each_equal_their_request_alone(server, smollm, concepts):
    """Different concepts, layers, strengths, positions and none; the second wave joins
    the batch while the first is decoding."""
    happy, sad = concepts["happy"], concepts["sad"]
    cases = [  # (prompt, steering items, the same steering as Steers, stream)
        ("Tell me about your weekend.", None, None, False),
        ("Tell me about your weekend.", [{"concept": "happy"}], happy.steer(), True),
        ("Describe a city.", [{"concept": "sad"}], sad.steer(), False),
        ("What should I cook tonight? Give me one idea.",
         [{"concept": "happy", "layer": 8, "strength": 0.4, "positions": "generated"}],
         happy.steer(8, 0.4, positions="generated"), True),
        ("Hi", [{"concept": "sad", "layer": 20, "strength": 0.25, "positions": 4}],
         sad.steer(20, 0.25, positions=4), False),
        ("Describe a city.", [{"concept": "happy", "layer": 10, "strength": 0.3},
                              {"concept": "sad", "layer": 16, "strength": 0.15}],
         [happy.steer(10, 0.3), sad.steer(16, 0.15)], True),
        ("Write one sentence about the sea.", [{"concept": "happy", "strength": 0.5}],
         happy.steer(strength=0.5), False),
        ("Write one sentence about the sea.", [], None, True),
    ]
    expected = [alone(smollm, p, s, max_tokens=16) for p, _, s, _ in cases]
    assert len(set(expected)) >= 6, expected
    got: dict[int, str] = {}
    before = server.stats()

    def client(i):
        p, items, _, stream = cases[i]
        got[i] = chat(server.client, p, items, stream=stream, max_tokens=16)[0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads[:4]:
        t.start()
    server.wait(lambda s: s["steps"] > before["steps"])  # first wave decoding
    for t in threads[4:]:
        t.start()
    for t in threads:
        t.join(120)
    after = server.stats()
    assert [got.get(i) for i in range(8)] == expected
    assert after["joined_running"] - before["joined_running"] >= 4
    assert after["peak_rows"] >= 4
    assert after["failed"] == before["failed"]


def test_bad_requests_are_400_with_the_typed_message(server, smollm):
    msgs = [{"role": "user", "content": "Hi"}]

    def bad(steering):
        with pytest.raises(openai.BadRequestError) as e:
            server.client.chat.completions.create(model="x", messages=msgs, max_tokens=4,
                                                  extra_body={"steering": steering})
        return e.value.body

    body = bad([{"concept": "no-such-concept"}])
    assert body["type"] == "ConceptNotFoundError" and "no-such-concept" in body["message"]
    body = bad([{"concept": "happy", "layer": smollm.num_layers}])
    assert body["type"] == "LayerOutOfRangeError"
    assert f"this model has {smollm.num_layers} layers" in body["message"]
    body = bad([{"concept": "happy", "positions": "middle"}])
    assert body["type"] == "InvalidPositionsError"
    body = bad([{"concept": "happy", "op": "multiply"}])
    assert body["type"] == "InvalidArgumentError" and "multiply" in body["message"]
    body = bad([{"vector": [0.0] * smollm.hidden_size, "layer": 3}])
    assert "--allow-raw-vectors" in body["message"]
    # NaN is not JSON, but Python's json (and some clients) write it.
    req = {"messages": msgs, "steering": [{"concept": "happy", "strength": math.nan}]}
    status, body = server.post("/v1/chat/completions", json.dumps(req).encode())
    assert status == 400 and body["error"]["type"] == "InvalidStrengthError"
    status, body = server.post("/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 0})
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, body = server.post("/v1/chat/completions", {"messages": msgs,
                                                        "padding": "x" * 70_000})
    assert status == 413 and body["error"]["type"] == "request_too_large"
    assert server.stats()["rows"] == 0
    assert chat(server.client, "Hi", max_tokens=3)[1] == "length"  # still serving


def test_raw_vectors_when_allowed(smollm, concepts):
    s = Running(smollm, allow_raw_vectors=True)
    try:
        v = concepts["happy"].vectors[9]
        items = [{"vector": v.tolist(), "layer": 9, "strength": 2.0, "positions": "generated"}]
        from mlx_steer import Steer
        text, _, _ = chat(s.client, "Describe a city.", items)
        assert text == alone(smollm, "Describe a city.", Steer(v, 9, 2.0, "generated"))
        with pytest.raises(openai.BadRequestError, match="576 numbers"):
            chat(s.client, "Hi", [{"vector": [1.0] * 5, "layer": 9}])
    finally:
        s.close()


def test_queue_full_is_429_and_a_disconnected_client_loses_its_row(smollm):
    s = Running(smollm, max_rows=1, max_queue=1)
    try:
        msgs = [{"role": "user", "content": "Tell me a long story about a dragon."}]
        long = s.client.chat.completions.create(model="x", messages=msgs, max_tokens=400,
                                                stream=True)
        next(iter(long))  # its row is decoding
        queued: dict = {}
        waiter = threading.Thread(target=lambda: queued.update(
            text=chat(s.client, "Describe a city.", max_tokens=4)[0]))
        waiter.start()
        s.wait(lambda st: st["queued"] == 1 and st["rows"] == 1)
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            chat(s.client, "Hi", max_tokens=4)

        long.close()  # the client goes away: its row is dropped, the queued one runs
        st = s.wait(lambda st: st["dropped"] == 1)
        waiter.join(60)
        assert queued["text"] == alone(smollm, "Describe a city.", max_tokens=4)
        assert st["steps"] < 300  # the 400-token row did not run to its end

        # A non-streaming client that hangs up is dropped too.
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"messages": msgs, "max_tokens": 400}), {"Content-Type": "application/json"})
        s.wait(lambda st: st["rows"] == 1)
        steps = s.stats()["steps"]
        conn.close()
        st = s.wait(lambda st: st["dropped"] == 2 and st["rows"] == 0)
        assert st["steps"] - steps < 300
    finally:
        s.close()
