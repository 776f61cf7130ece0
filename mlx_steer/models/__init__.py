"""Steerable decoder blocks: explicit subclasses for Llama/Mistral and Phi-3,
and a generic route for any mlx-lm block called as (x, mask, cache)."""

from . import llama, phi3  # noqa: F401  (registers the explicit subclasses)
from .base import SteerMixin, install, uninstall

__all__ = ["SteerMixin", "install", "uninstall"]
