"""`mlx-steer`: steering experiments from the command line.

Every command takes `--model` (default: the embedded SmolLM2-135M-Instruct),
`--json` (machine-readable output on stdout) and `--quiet` (no progress bars).
Progress bars go to stderr. A bad argument prints one line on stderr and exits
with status 2; no traceback is shown (set MLX_STEER_DEBUG=1 to see one for an
unexpected error, which exits with status 1).

One module per command group (`experiment`: generate, sweep, mix; `build`:
extract, bake, serve; `concepts`; `evaluate`: eval, introspect), with the shared
argument types in `args`, the model and concept look-ups in `session` and all
printing in `render`; `entry` builds the parser and runs a command (`main`).
"""

from .entry import build_parser, main

__all__ = ["build_parser", "main"]
