"""mlx-steer: exact, per-request activation steering for mlx-lm models."""

from . import errors
from .concept import Concept
from .lab import Lab, Trace
from .loading import load
from .steer import Steer

__all__ = ["Concept", "Lab", "Steer", "Trace", "errors", "load"]
__version__ = "0.1.0"
