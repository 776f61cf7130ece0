"""`python -m mlx_steer.cli`: what the `mlx-steer` script runs."""

import sys

from .entry import main

sys.exit(main())
