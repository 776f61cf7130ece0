"""`python -m mlx_steer.fastpath`: print the LD_PRELOAD value for the fast CPU path."""

import sys

from . import _main

raise SystemExit(_main(sys.argv[1:]))
