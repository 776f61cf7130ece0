"""`python -m mlx_steer.config`: every MLX_STEER_* variable, its default and meaning."""

from . import table

print(table())
