"""The OpenAI-style request and response bodies of `mlx-steer serve`, without HTTP.

Requests are read as mlx-lm's server reads them (messages or prompt,
max_tokens / max_completion_tokens, temperature, top_p, seed, stop, stream,
stream_options) plus `steering`, a list of
`{"concept", "strength", "layer", "op", "positions"}` items. Every malformed
field raises a typed error from `mlx_steer.errors`, which the server answers
with a 400.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import (EmptyPromptError, InvalidArgumentError, InvalidStrengthError,
                     LayerOutOfRangeError)
from .catalogue import BUILTINS, builtin_spec
from .steer import OPS, Steer

if TYPE_CHECKING:
    from .lab import Lab

DEFAULT_MAX_TOKENS = 512  # mlx-lm's server default
MAX_STEERING_ITEMS = 16
STEERING_KEYS = {"concept", "vector", "strength", "layer", "op", "positions", "relative"}


@dataclass
class Options:
    """Sampling and streaming options of one request."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, key: str, default: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InvalidArgumentError(f"{key} must be a finite number, got {v!r}")
    return float(v)


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{key} must be an integer, got {value!r}")
    return value


def parse_options(body: dict) -> Options:
    """The sampling options of a request body (typed errors for bad values)."""
    mt = body.get("max_completion_tokens")
    if mt is None:
        mt = body.get("max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if mt is None else _int(mt, "max_tokens")
    if max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens must be >= 1, got {max_tokens}")
    temperature = _number(body, "temperature", 0.0)
    top_p = _number(body, "top_p", 1.0)
    seed = body.get("seed")
    if seed is not None:
        seed = _int(seed, "seed")
        if not 0 <= seed < 2**32:
            raise InvalidArgumentError(f"seed must be in 0 … 2**32-1, got {seed}")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidArgumentError("stop must be a non-empty string or a list of them")
    if len(stop) > 4:
        raise InvalidArgumentError(f"at most 4 stop strings, got {len(stop)}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidArgumentError(f"stream must be true or false, got {stream!r}")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise InvalidArgumentError("stream_options must be an object")
    n = body.get("n", 1)
    if n not in (1, None):
        raise InvalidArgumentError(f"only n=1 is supported, got {n!r}")
    if body.get("logprobs") not in (None, False) or body.get("echo"):
        raise InvalidArgumentError("logprobs and echo are not supported by this server")
    return Options(max_tokens, temperature, top_p, seed, stop, stream,
                   bool(so.get("include_usage", False)))


def _text_content(content: Any, where: str) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" for p in content):
            raise InvalidArgumentError(f"{where}: only text content parts are supported")
        return "".join(str(p.get("text", "")) for p in content)
    raise InvalidArgumentError(f"{where}: content must be a string or a list of text parts")


def chat_tokens(lab: "Lab", body: dict) -> list[int]:
    """Token ids of a chat request's `messages` through the model's chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgumentError("messages must be a non-empty list")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidArgumentError(f"messages[{i}] must be an object with a role")
        clean.append({"role": m["role"],
                      "content": _text_content(m.get("content", ""), f"messages[{i}]")})
    if not any(m["content"].strip() for m in clean):
        raise EmptyPromptError("the messages have no text: type some text to continue")
    if len(clean) == 1 and clean[0]["role"] == "user":
        return lab.encode(clean[0]["content"], chat=True)  # what lab.generate sends
    tok = lab.tokenizer
    if getattr(tok, "chat_template", None):
        return list(tok.apply_chat_template(clean, add_generation_prompt=True))
    return lab.encode("\n".join(m["content"] for m in clean))


def completion_tokens(lab: "Lab", body: dict) -> list[int]:
    """Token ids of a completions request's `prompt` (no chat template)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidArgumentError("prompt must be a string (one prompt per request)")
    return lab.encode(prompt)


def parse_steering(lab: "Lab", items: Any, allow_raw_vectors: bool = False) -> list[Steer]:
    """The `steering` list of a request as `Steer`s (concepts looked up in `lab`).

    Each item: `concept` (a name from /v1/concepts) or, only when the server
    allows raw vectors, `vector` (hidden_size floats, with `layer`);
    `strength` (relative to the residual norm, the library's default, unless
    `"relative": false`; raw for vectors), `layer` (0-based, [start, stop] or
    "all"), `op` ("add", "ablate" or "cap", as `Concept.steer`) and `positions` ("all", "prompt", "generated" or an int k). Omitted layer and
    strength take the concept's recommended ones. A built-in concept not yet
    extracted for this model is extracted here (seconds).
    """
    if items is None:
        return []
    if not isinstance(items, list):
        raise InvalidArgumentError("steering must be a list of objects")
    if len(items) > MAX_STEERING_ITEMS:
        raise InvalidArgumentError(
            f"at most {MAX_STEERING_ITEMS} steering items, got {len(items)}")
    steers = []
    for i, item in enumerate(items):
        where = f"steering[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgumentError(f"{where} must be an object")
        unknown = set(item) - STEERING_KEYS
        if unknown:
            raise InvalidArgumentError(
                f"{where}: unknown field(s) {', '.join(sorted(unknown))}; use "
                f"{', '.join(sorted(STEERING_KEYS))}")
        op = item.get("op", "add")
        if op not in OPS:
            raise InvalidArgumentError(f"{where}: op must be one of {', '.join(OPS)}, got {op!r}")
        layer = item.get("layer")
        if isinstance(layer, list) and len(layer) == 2:
            layer = tuple(layer)  # a (start, stop) block range
        if layer is not None and layer != "all" and not (
                isinstance(layer, tuple) or (isinstance(layer, int)
                                             and not isinstance(layer, bool))):
            raise LayerOutOfRangeError(
                f"{where}: layer must be an integer, [start, stop] or \"all\", got {layer!r}")
        strength = item.get("strength")
        if strength is not None and (isinstance(strength, bool)
                                     or not isinstance(strength, (int, float))):
            raise InvalidStrengthError(f"{where}: strength must be a number, got {strength!r}")
        positions = item.get("positions", "all")
        relative = item.get("relative", True)
        if not isinstance(relative, bool):
            raise InvalidArgumentError(f"{where}: relative must be true or false")
        if ("concept" in item) == ("vector" in item):
            raise InvalidArgumentError(f"{where} needs a concept (or, if allowed, a vector)")
        if "vector" in item:
            if not allow_raw_vectors:
                raise InvalidArgumentError(
                    f"{where}: raw vectors are refused by this server (start it with "
                    "--allow-raw-vectors); use a concept name")
            vec = item["vector"]
            if not isinstance(vec, list) or len(vec) != lab.hidden_size:
                raise InvalidArgumentError(
                    f"{where}: vector must be a list of {lab.hidden_size} numbers")
            if layer is None:
                raise LayerOutOfRangeError(f"{where}: a raw vector needs a layer")
            steers.append(Steer(vec, layer, strength=1.0 if strength is None else strength,
                                positions=positions, op=op))
            continue
        concept = lab.concept(item["concept"])
        s = concept.steer(layer, strength, relative=relative, positions=positions, op=op)
        steers.extend(s if isinstance(s, list) else [s])
    return steers


def concepts_listing(lab: "Lab") -> dict:
    """/v1/concepts: every usable name, with its defaults once it exists for this model."""
    data = []
    for name in lab.concepts.names():
        c = lab.concepts.ready(name)
        entry = {"id": name, "object": "concept", "builtin": name in BUILTINS,
                 "ready": c is not None, "layer": None, "strength": None}
        if c is not None:
            entry.update(layer=c.layer, strength=c.strength, description=c.description)
        elif name in BUILTINS:
            entry["description"] = builtin_spec(name).get("description", "")
        data.append(entry)
    return {"object": "list", "data": data, "num_layers": lab.num_layers,
            "strength": "relative to the residual norm at the layer unless relative=false"}


# ---- responses ----------------------------------------------------------------------


@dataclass
class Reply:
    """Identity of one response: the same id and creation time on every chunk."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _base(self, stream: bool) -> dict:
        obj = ("chat.completion.chunk" if stream else "chat.completion") if self.chat \
            else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, finish_reason: str, prompt_tokens: int,
             completion_tokens: int) -> dict:
        """The whole answer (stream=false)."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
            choice["logprobs"] = None
        return {**self._base(False), "choices": [choice],
                "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None) -> dict:
        """One server-sent event's body (stream=true)."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = {} if text is None else {"role": "assistant", "content": text}
        else:
            choice["text"] = text or ""
            choice["logprobs"] = None
        return {**self._base(True), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The last event when stream_options.include_usage is set."""
        return {**self._base(True), "choices": [],
                "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, type_: str, code: int) -> dict:
    """OpenAI's error shape (the official client reads `error.message`)."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}
