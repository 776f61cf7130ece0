"""`mlx-steer serve`: an OpenAI-compatible HTTP server with steering per request.

Starlette routes on uvicorn. Each completion request is parsed and checked
(`api`), queued on the continuous-batching engine (`scheduler`), and answered
as one JSON body or as server-sent events while its row decodes. Limits: a
full queue is a 429, a body over `max_request_bytes` a 413, a bad field a 400
with the typed error's message; a client that goes away has its row dropped.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import api
from .errors import InvalidArgumentError, MlxSteerError, ServerBusyError
from .scheduler import Event, Job, Scheduler

if TYPE_CHECKING:
    from .lab import Lab

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_ROWS = 8
DEFAULT_MAX_QUEUE = 32
DEFAULT_MAX_REQUEST_BYTES = 1 << 20


class BodyTooLarge(Exception):
    pass


async def read_json(request: Request, limit: int) -> dict:
    """The request's JSON object, read at most `limit` bytes far."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidArgumentError("the request body must be a JSON object")
    return body


def error(status: int, message: str, type_: str) -> JSONResponse:
    return JSONResponse(api.error_body(message, type_, status), status_code=status)


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


class _JobStream(StreamingResponse):
    """Server-sent events of one job; the job is dropped however the response ends
    (Starlette cancels the body when the client disconnects)."""

    def __init__(self, content: AsyncIterator[str], job: Job, scheduler: Scheduler):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job, self.scheduler = job, scheduler

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.scheduler.cancel(self.job)


class SteerServer:
    """The app (`.app`) and its engine for one loaded model."""

    def __init__(self, lab: "Lab", max_rows: int = DEFAULT_MAX_ROWS,
                 max_queue: int = DEFAULT_MAX_QUEUE,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 allow_raw_vectors: bool = False):
        self.lab = lab
        self.max_request_bytes = max_request_bytes
        self.allow_raw_vectors = allow_raw_vectors
        # The engine takes the model's lock per step, so a concept extracted for a
        # request (under the same lock) never runs the model at the same time.
        self.scheduler = Scheduler(lab.model, lab.tokenizer, max_rows, max_queue,
                                   lock=lab.lock)
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/concepts", self.concepts, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes, lifespan=self._lifespan,
                             exception_handlers={Exception: self._internal_error})

    @asynccontextmanager
    async def _lifespan(self, app):
        self.scheduler.start()
        try:
            yield
        finally:
            self.scheduler.close()

    async def _internal_error(self, request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    # ---- routes -------------------------------------------------------------------
    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": self.lab.name, "object": "model", "created": 0, "owned_by": "mlx-steer"}]})

    async def concepts(self, request: Request) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(api.concepts_listing, self.lab))

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.lab.name,
                             **self.scheduler.stats()})

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    # ---- one generation -------------------------------------------------------------
    def _prepare(self, body: dict, chat: bool):
        opts = api.parse_options(body)
        tokens = api.chat_tokens(self.lab, body) if chat else api.completion_tokens(
            self.lab, body)
        with self.lab.lock:  # a built-in concept may be extracted here
            steers = api.parse_steering(self.lab, body.get("steering"),
                                        self.allow_raw_vectors)
        steers = self.lab.check_request(tokens, steers, opts.max_tokens, opts.temperature,
                                        opts.top_p)
        return opts, tokens, steers

    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            body = await read_json(request, self.max_request_bytes)
            opts, tokens, steers = await run_in_threadpool(self._prepare, body, chat)
        except BodyTooLarge:
            return error(413, f"the request body is larger than {self.max_request_bytes} "
                              "bytes", "request_too_large")
        except MlxSteerError as e:
            return error(400, str(e), type(e).__name__)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(ev: Event) -> None:  # called on the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:
                pass  # the event loop is closed: the server stopped

        job = Job(tokens, steers, opts.max_tokens, sink, opts.temperature, opts.top_p,
                  opts.seed, opts.stop)
        try:
            self.scheduler.submit(job)
        except ServerBusyError as e:
            return error(429, str(e), "rate_limit_exceeded")
        reply = api.Reply(chat, self.lab.name)
        if opts.stream:
            return _JobStream(self._events(events, reply, opts), job, self.scheduler)
        return await self._collect(request, job, events, reply)

    async def _events(self, events: asyncio.Queue, reply: api.Reply,
                      opts: api.Options) -> AsyncIterator[str]:
        while True:
            ev = await events.get()
            if ev.kind == "text":
                yield sse(reply.chunk(ev.text))
                continue
            if ev.kind == "error":
                yield sse(api.error_body(ev.text, "server_error", 500))
            else:
                yield sse(reply.chunk(None if reply.chat else "", ev.finish_reason))
                if opts.include_usage:
                    yield sse(reply.usage_chunk(ev.prompt_tokens, ev.completion_tokens))
            yield sse("[DONE]")
            return

    async def _collect(self, request: Request, job: Job, events: asyncio.Queue,
                       reply: api.Reply) -> Response:
        watcher = asyncio.create_task(self._watch_disconnect(request, job))
        parts = []
        try:
            while (ev := await events.get()).kind == "text":
                parts.append(ev.text)
        finally:
            watcher.cancel()
        if ev.kind == "error":
            return error(500, ev.text, "server_error")
        return JSONResponse(reply.full("".join(parts), ev.finish_reason, ev.prompt_tokens,
                                       ev.completion_tokens))

    async def _watch_disconnect(self, request: Request, job: Job) -> None:
        # The body is read: the next ASGI message is the client's disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.scheduler.cancel(job)


def serve(lab: "Lab", host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          max_rows: int = DEFAULT_MAX_ROWS, max_queue: int = DEFAULT_MAX_QUEUE,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
          allow_raw_vectors: bool = False, log_level: str = "info") -> None:
    """Serve `lab` until interrupted (uvicorn)."""
    import uvicorn

    server = SteerServer(lab, max_rows, max_queue, max_request_bytes, allow_raw_vectors)
    uvicorn.run(server.app, host=host, port=port, log_level=log_level)
