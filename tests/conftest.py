import atexit
import os
import shutil
import tempfile
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
# One concept cache for the run, so built-ins are extracted once; tests that need
# an empty library point MLX_STEER_HOME elsewhere themselves. Removed at exit: it holds
# the expanded model (~0.6 GB), which each run would otherwise leave behind.
if "MLX_STEER_HOME" not in os.environ:
    os.environ["MLX_STEER_HOME"] = tempfile.mkdtemp(prefix="mlx-steer-tests-")
    atexit.register(shutil.rmtree, os.environ["MLX_STEER_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct, loaded once for the whole run."""
    import mlx_steer

    return mlx_steer.load()


@pytest.fixture
def on_cpu():
    """MLX's CPU device for the test: it checks a path mlx_steer takes on the CPU only (on a
    GPU, Metal or CUDA, the same call takes MLX's own kernels instead)."""
    import mlx.core as mx

    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(before)


@pytest.fixture(params=["mistral", "phi3"])
def tiny(request):
    from tiny import tiny_lab

    return tiny_lab(request.param)


def pytest_terminal_summary(terminalreporter):
    """Which fast CPU path this test run had (`make test` preloads it); shown with -q too."""
    from mlx_steer import fastpath

    terminalreporter.write_line(fastpath.describe())
