"""mlx-steer: exact, per-request activation steering for mlx-lm models."""

from . import config

config.full_float32()  # before any MLX product runs (MLX reads it once)

from . import errors  # noqa: E402
from .concept import Concept  # noqa: E402
from .lab import Lab, Trace  # noqa: E402
from .loading import load  # noqa: E402
from .steer import Steer  # noqa: E402

__all__ = ["Concept", "Lab", "Steer", "Trace", "errors", "load"]
__version__ = "0.1.0"
