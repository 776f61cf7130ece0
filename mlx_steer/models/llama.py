"""Steerable Llama / Mistral decoder block (mlx-lm's `models/llama.py`)."""

from mlx_lm.models import llama

from .base import SteerMixin, register


class SteeredLlamaBlock(SteerMixin, llama.TransformerBlock):
    """`llama.TransformerBlock` whose output receives the request's steering."""

    _base_block = llama.TransformerBlock


register(llama.TransformerBlock, SteeredLlamaBlock)
