"""`Lab`: a loaded model with exact, per-request steering, capture and generation."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import activations, generation, threads, validate
from . import bake as baking
from .concepts import ConceptStore
from .errors import EmptyPromptError, InvalidArgumentError, PromptTooLongError
from .models import base
from .steer import Steer, SteerLike, as_steers, check_steers, expand_steers

if TYPE_CHECKING:
    from pathlib import Path

    from .concept import Concept
    from .library import Library

Request = tuple[str, SteerLike]


@dataclass
class Trace:
    """One forward pass: its tokens, every block's output and the logits."""

    tokens: list[int]
    hidden: np.ndarray  # (num_layers, T, D) float32
    logits: np.ndarray  # (T, vocab) float32


class Lab:
    """A steerable model. Steering is passed per call and never stored here.

    Attributes:
        model, tokenizer: the mlx-lm objects (blocks made steerable in place).
        name: what was loaded; note: why (e.g. what "auto" chose).
        group: the `mx.distributed` group the model is sharded over (tensor
            parallel or pipeline stages; every rank then makes every call), or None.
    """

    def __init__(self, model: nn.Module, tokenizer, name: str,
                 context_length: int | None = None, note: str = "", group=None):
        base.install(model)
        self.model = model
        self.group = group
        self.tokenizer = tokenizer
        self.name = name
        self.note = note
        args = getattr(model, "args", None)
        self.context_length = int(context_length or getattr(
            args, "max_position_embeddings", None) or 4096)
        self.lock = threading.RLock()  # the server serialises model work on it
        self._fingerprint: str | None = None
        self.concepts = ConceptStore(self)  # saved, built-in and new concepts

    # ---- shape of the model -------------------------------------------------
    @property
    def num_layers(self) -> int:
        return base.num_layers(self.model)

    @property
    def hidden_size(self) -> int:
        return int(self.model.args.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding table: valid token ids are 0 … vocab_size-1."""
        emb = self.model.model.embed_tokens
        return int(getattr(emb, "num_embeddings", None) or emb.weight.shape[0])

    @property
    def model_type(self) -> str:
        return str(getattr(self.model, "model_type", "") or
                   getattr(self.model.args, "model_type", "unknown"))

    @property
    def fingerprint(self) -> str:
        """Identifies the model's weights: concepts made for another model are refused."""
        if self._fingerprint is None:
            ids = mx.arange(min(64, self.tokenizer.vocab_size))
            emb = np.asarray(self.model.model.embed_tokens(ids).astype(mx.float32))
            h = hashlib.sha256()
            h.update(f"{self.model_type}|{self.num_layers}|{self.hidden_size}|"
                     f"{self.tokenizer.vocab_size}|".encode())
            # Row means, coarsely rounded: stable across fp16/fp32/dequantised copies.
            h.update(np.round(emb.mean(axis=1), 3).astype(np.float32).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # ---- tokens ----------------------------------------------------------------
    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of `text`, through the chat template when `chat`."""
        validate.text(text)
        if chat and getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True)
        else:
            ids = self.tokenizer.encode(text)
        return list(ids)

    def _tokens(self, prompt: str | Sequence[int], chat: bool) -> list[int]:
        """A prompt's token ids: text is encoded, ids are checked against the vocabulary
        (an id outside it would read outside the embedding table)."""
        if isinstance(prompt, str):
            return self.encode(prompt, chat)
        return validate.token_ids(prompt, self.vocab_size)

    def check_input(self, tokens: Sequence[int], steers: list[Steer], max_tokens: int = 0
                    ) -> list[Steer]:
        """Raise a typed error for bad input (no tokens, too long, steers that do not fit
        this model); the steers with layer ranges expanded. Marks this thread as one that
        runs the model."""
        if not tokens:
            raise EmptyPromptError("the prompt encodes to no tokens")
        if len(tokens) + max_tokens > self.context_length:
            raise PromptTooLongError(
                f"the prompt has {len(tokens)} tokens"
                + (f" (+{max_tokens} to generate)" if max_tokens else "")
                + f", more than this model's context of {self.context_length}; "
                "shorten it")
        check_steers(steers, self.num_layers, self.hidden_size, self.fingerprint)
        threads.note_thread()  # this thread is about to run the model
        return expand_steers(steers, self.num_layers)

    _check = check_input  # the old private name: branches in flight still call it

    def check_request(self, tokens: Sequence[int], steers: list[Steer], max_tokens: int,
                      temperature: float = 0.0, top_p: float = 1.0) -> list[Steer]:
        """Raise the typed error `generate` would raise for this request (tokens given);
        return its steers with layer ranges expanded, as `generate` would run them."""
        _check_options(max_tokens, temperature, top_p)
        return self.check_input(tokens, steers, max_tokens)

    # ---- forward passes -------------------------------------------------------
    def trace(self, text: str | Sequence[int], steer: SteerLike = None,
              chat: bool = False, prompt_len: int | None = None) -> Trace:
        """One forward pass returning tokens, all block outputs and logits.

        `text` may be a string or token ids. `prompt_len` (default: all tokens)
        is where "prompt" ends and "generated" begins for position rules, so a
        generated sequence can be replayed exactly.
        """
        tokens = self._tokens(text, chat)
        steers = self.check_input(tokens, as_steers(steer))
        if prompt_len is not None:
            prompt_len = validate.integer(prompt_len, "prompt_len", 1, len(tokens))
        plans = base.build_plans([steers], [prompt_len or len(tokens)])
        caches = base.make_caches(self.model, plans, capture=True)
        logits = self.model(mx.array(tokens)[None], cache=caches)
        got = base.captured(self.model, caches, range(self.num_layers), logits, self.group)
        hidden = mx.stack([got[layer][0] for layer in range(self.num_layers)])
        logits = logits[0].astype(mx.float32)
        mx.eval(hidden, logits)
        return Trace(tokens, np.array(hidden), np.array(logits))

    def hidden_states(self, text: str, steer: SteerLike = None,
                      chat: bool = False) -> np.ndarray:
        """Every block's output, after its steering: float32 (num_layers, T, D)."""
        return self.trace(text, steer, chat).hidden

    def logits(self, text: str, steer: SteerLike = None, chat: bool = False) -> np.ndarray:
        """Next-token logits at every position: float32 (T, vocab)."""
        return self.trace(text, steer, chat).logits

    def hidden_states_batch(self, texts: Sequence[str], steer: SteerLike = None,
                            chat: bool = False) -> list[np.ndarray]:
        """Block outputs of many texts in one left-padded forward pass.

        Returns one float32 (num_layers, T_i, D) array per text, padding removed.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise InvalidArgumentError("hidden_states_batch needs a non-empty list of texts")
        toks = [self.encode(t, chat) for t in texts]
        steers = as_steers(steer)
        for t in toks:
            self.check_input(t, steers)
        steers = expand_steers(steers, self.num_layers)
        width = max(map(len, toks))
        pads = [width - len(t) for t in toks]
        x = mx.array([[0] * p + t for p, t in zip(pads, toks)])
        plans = base.build_plans([steers] * len(toks), [len(t) for t in toks])
        caches = base.make_caches(self.model, plans, left_padding=pads, capture=True)
        out = self.model(x, cache=caches)
        got = base.captured(self.model, caches, range(self.num_layers), out, self.group)
        hidden = mx.stack([got[layer] for layer in range(self.num_layers)], axis=1)
        mx.eval(hidden)
        h = np.array(hidden)  # (B, L, W, D)
        return [h[i, :, p:] for i, p in enumerate(pads)]

    # ---- generation -------------------------------------------------------------
    def stream(self, prompt: str, steer: SteerLike = None, max_tokens: int = 100,
               temperature: float = 0.0, seed: int | None = None, chat: bool = True,
               top_p: float = 1.0) -> Iterator[str]:
        """Yield the generated text piece by piece (mlx-lm's `stream_generate`)."""
        tokens = self.encode(prompt, chat)
        max_tokens, temperature, top_p = _check_options(max_tokens, temperature, top_p)
        seed = validate.seed(seed)
        steers = self.check_input(tokens, as_steers(steer), max_tokens)
        plans = base.build_plans([steers], [len(tokens)])
        caches = base.make_caches(self.model, plans)
        return generation.stream(self.model, self.tokenizer, tokens, caches,
                                 max_tokens, temperature, top_p, seed)

    def generate(self, prompt: str, steer: SteerLike = None, max_tokens: int = 100,
                 temperature: float = 0.0, seed: int | None = None, chat: bool = True,
                 top_p: float = 1.0) -> str:
        """The generated text (prompt excluded)."""
        return "".join(self.stream(prompt, steer, max_tokens, temperature, seed, chat, top_p))

    def generate_batch(self, requests: Sequence[Request], max_tokens: int = 100,
                       temperature: float = 0.0, seed: int | None = None,
                       chat: bool = True, top_p: float = 1.0,
                       progress=None) -> list[str]:
        """Generate every (prompt, steer) row in one batched decode.

        Each row equals the same request run alone with `generate` (greedy:
        same text; sampling: each row draws from its own generator seeded
        with `seed`, as a lone request would).
        """
        return [r.text for r in self.generate_batch_tokens(
            requests, max_tokens, temperature, seed, chat, top_p, progress)]

    def generate_batch_tokens(self, requests: Sequence[Request], max_tokens: int = 100,
                              temperature: float = 0.0,
                              seed: int | Sequence[int | None] | None = None,
                              chat: bool = True, top_p: float = 1.0,
                              progress=None) -> list[generation.RowResult]:
        """Like `generate_batch`, returning tokens and first-step logits per row.

        A prompt may also be a list of token ids (used as is); `seed` may be one
        seed per row.
        """
        if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence):
            raise InvalidArgumentError("requests must be a list of (prompt, steer) pairs")
        if not requests:
            return []
        max_tokens, temperature, top_p = _check_options(max_tokens, temperature, top_p)
        if isinstance(seed, (list, tuple, np.ndarray)):
            if len(seed) != len(requests):
                raise InvalidArgumentError(
                    f"{len(seed)} seeds for {len(requests)} requests: give one per row")
            seed = [validate.seed(x) for x in seed]
        else:
            seed = validate.seed(seed)
        toks, rows = [], []
        for req in requests:
            if not isinstance(req, (tuple, list)) or len(req) != 2:
                raise InvalidArgumentError(
                    f"each request must be a (prompt, steer) pair, got {req!r:.60}")
            prompt, steer = req
            t = self._tokens(prompt, chat)
            s = self.check_input(t, as_steers(steer), max_tokens)
            toks.append(t)
            rows.append(s)
        return generation.batch(self.model, self.tokenizer, toks, rows, max_tokens,
                                temperature, top_p, seed, progress)

    # ---- concepts (owned by `self.concepts`; one-line delegators the README uses) ----
    @property
    def library(self) -> "Library":
        """This model's saved concepts: `self.concepts.library`."""
        return self.concepts.library

    def concept(self, name: str, progress: Callable[[int, int], None] | None = None
                ) -> "Concept":
        """A concept by name: `self.concepts.get(name, progress)`."""
        return self.concepts.get(name, progress)

    def ensure_builtins(self, progress: Callable[[int, int], None] | None = None,
                        ) -> list["Concept"]:
        """Every built-in, extracted where missing: `self.concepts.ensure_builtins`."""
        return self.concepts.ensure_builtins(progress)

    def extract(self, name: str, pairs: Sequence[tuple[str, str]], method: str = "mean",
                read: str = "last", chat: bool = False,
                progress: Callable[[int, int], None] | None = None,
                layer: int | None = None, seed: int = 0, **meta) -> "Concept":
        """A concept from (positive, negative) pairs (not saved): `self.concepts.extract`.

        `method`: "mean", "pca", "classic" or "trained" (a preference-trained vector at
        `layer`, default the recommended block; see `mlx_steer.train`)."""
        return self.concepts.extract(name, pairs, method, read, chat, progress, layer=layer,
                                     seed=seed, **meta)

    def save_concept(self, concept: "Concept") -> "Path":
        """Save to this model's library: `self.concepts.save(concept)`."""
        return self.concepts.save(concept)

    def residual_norms(self) -> np.ndarray:
        """Median residual token norm per block over neutral prompts (float32, (L,)): the
        norm that turns a relative strength into a raw scale."""
        return activations.residual_norms(self)

    def bake(self, steer: SteerLike, path: "str | Path", overwrite: bool = False) -> "Path":
        """Write an MLX model folder with `steer` folded into the weights (ablation at
        every block, additions at one block each); `mlx_lm.load(path)` opens it
        without mlx-steer. See `mlx_steer.bake` for what can be baked."""
        return baking.save(self, steer, path, overwrite)


def _check_options(max_tokens: int, temperature: float, top_p: float
                   ) -> tuple[int, float, float]:
    max_tokens = validate.integer(max_tokens, "max_tokens", 1)
    temperature = validate.real(temperature, "temperature")
    if temperature < 0:
        raise InvalidArgumentError(f"temperature must be >= 0, got {temperature}")
    top_p = validate.real(top_p, "top_p")
    if not (0 < top_p <= 1):
        raise InvalidArgumentError(f"top_p must be in (0, 1], got {top_p}")
    return max_tokens, temperature, top_p
