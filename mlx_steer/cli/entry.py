"""The `mlx-steer` entry point: the parser of every command, and `main`."""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__, config, distributed, fastpath
from ..errors import MlxSteerError
from . import args as A
from . import build, concepts, evaluate, experiment
from .args import Parser, UsageError
from .render import say

PROG = "mlx-steer"

DESCRIPTION = """\
Activation steering for MLX language models: add a concept vector ("happy",
"pirate", your own) to a model's residual stream at a layer and strength, and
compare what it writes with the unsteered model. Every variant of an experiment
is a row of one batched decode with the same seed, next to an unsteered
baseline row, and every row comes with metrics: VADER sentiment, marker-word
rate, perplexity under the unsteered model, repetition rate, KL divergence of
the first token vs the baseline, and the projection on the concept direction.

Strengths are RELATIVE by default: a fraction of the typical residual-stream
norm at the layer (0.1-0.5 is the useful band; near 1 the text breaks). Give
--raw to use a raw multiplier of the concept vector instead. Layers are 0-based
decoder blocks. Built-in concepts are extracted for a model on first use (a few
seconds each) and cached under $MLX_STEER_HOME (default ~/.cache/mlx-steer).
"""

EPILOG = """\
examples:
  mlx-steer generate --prompt "Tell me about your weekend." --concept happy
  mlx-steer sweep --prompt "Describe a city." --concept pirate --strengths 0.1,0.2,0.4
  mlx-steer sweep --prompt "Describe a city." --concept pirate --layers 4,8,12,16,20
  mlx-steer mix --prompt "Tell me about trains." --concepts happy:0.7,excited:0.3 --save
  mlx-steer generate --prompt "Write a birthday card." --concept happy --op ablate
  mlx-steer extract --name polite --pairs pairs.json
  mlx-steer extract --name polite --pairs pairs.json --method trained
  mlx-steer bake --out no-happy --ablate happy
  mlx-steer concepts list
  mlx-steer introspect --trials 20 --json
  mlx-steer eval --concept happy --concept pirate

speed on Linux: MLX's CPU wheel ships a slow reference BLAS. When an OpenBLAS is
available (Debian's /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3, else
the scipy-openblas32 wheel's) and this process does not already use one,
mlx-steer re-executes itself once with LD_PRELOAD set by mlx_steer.fastpath
(OpenBLAS, its sgemv shim when that builds, tcmalloc) before loading a model
(several times faster). Set MLX_STEER_NO_PRELOAD=1 (or MLX_STEER_NO_FASTPATH=1)
to prevent that. `python -m mlx_steer.config` lists every MLX_STEER_* variable.

several ranks (mlx.launch, see docs/SCALING.md): under `mlx.launch -n N ...`
sweep, mix and eval split their rows across the ranks; with --shard every
command runs the model sharded across them instead. Rank 0 alone prints.
"""


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    A.common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        A.common(p)
        return p

    experiment.add_parsers(command)
    build.add_parsers(command)
    concepts.add_parsers(command)
    evaluate.add_parsers(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status. `argv=None` reads sys.argv (and may
    re-execute the process with the fast CPU path preloaded: `fastpath.reexec`)."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(args_list)
    except UsageError as e:
        say(f"{PROG}: error: {e}")
        return 2
    except SystemExit as e:  # --help / --version
        return int(e.code or 0)
    if argv is None:
        fastpath.reexec(["-m", "mlx_steer.cli", *args_list])
    try:
        args.group = distributed.world()  # several ranks when started by mlx.launch
        if not distributed.is_lead(args.group):
            sys.stdout = open(os.devnull, "w")  # rank 0 alone prints
            args.quiet = True
        return int(args.func(args) or 0)
    except (UsageError, MlxSteerError) as e:
        say(f"{PROG}: error: {e}")
        return 2
    except KeyboardInterrupt:
        say(f"{PROG}: interrupted")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - never a traceback unless asked
        if config.flag("MLX_STEER_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        say(f"{PROG}: internal error: {type(e).__name__}: {msg} "
            "(set MLX_STEER_DEBUG=1 for the traceback)")
        return 1
