"""Steerable Phi-3 decoder block (mlx-lm's `models/phi3.py`)."""

from mlx_lm.models import phi3

from .base import SteerMixin, register


class SteeredPhi3Block(SteerMixin, phi3.TransformerBlock):
    """`phi3.TransformerBlock` whose output receives the request's steering."""

    _base_block = phi3.TransformerBlock


register(phi3.TransformerBlock, SteeredPhi3Block)
