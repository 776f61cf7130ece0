"""Streaming into the page: baseline and steered side by side, or one continuation.
The model lock is held inside the generators, so a stopped script releases it."""

from __future__ import annotations

from collections.abc import Iterator

import streamlit as st

import mlx_steer

from . import state, ui


def stream_pair(lab: mlx_steer.Lab, prompt: str, steer, slots, max_tokens: int,
                temperature: float = 0.0, seed: int | None = 0,
                labels: tuple[str, str] = ("", "")) -> tuple[str, str]:
    """Stream the unsteered and steered continuations side by side, interleaved token
    by token, with the same seed. The model lock is held inside the generator; a
    stopped script closes it and releases the lock."""
    texts = ["", ""]

    def both() -> Iterator[tuple[int, str]]:
        gens = [lab.stream(prompt, None, max_tokens, temperature, seed),
                lab.stream(prompt, steer, max_tokens, temperature, seed)]
        live = [True, True]
        try:
            while any(live):
                for i, g in enumerate(gens):
                    if live[i]:
                        try:
                            yield i, next(g)
                        except StopIteration:
                            live[i] = False
        finally:
            for g in gens:
                g.close()

    gen = state.locked(both)
    try:
        for i, piece in gen:
            texts[i] += piece
            ui.text_box(texts[i], slots[i], cursor=True)
    finally:
        gen.close()
    for i in (0, 1):
        ui.text_box(texts[i], slots[i])
    return texts[0], texts[1]


def stream_one(lab: mlx_steer.Lab, prompt: str, steer, max_tokens: int,
               temperature: float = 0.0, seed: int | None = 0) -> str:
    """Stream one continuation with st.write_stream (lock held inside the generator)."""
    gen = state.locked(lambda: lab.stream(prompt, steer, max_tokens, temperature, seed))
    try:
        return st.write_stream(gen)
    finally:
        gen.close()
