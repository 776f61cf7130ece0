"""mlx_steer.config: one table of every MLX_STEER_* variable, read one way."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_steer import config

ROOT = Path(__file__).resolve().parent.parent


def test_every_variable_the_project_names_is_in_the_table():
    named = set()
    for path in [*ROOT.glob("mlx_steer/**/*.py"), *ROOT.glob("mlx_steer/**/*.c"),
                 *ROOT.glob("app/**/*.py"),
                 *(p for p in ROOT.glob("tests/*.py") if p.name != "test_config.py"), *ROOT.glob("scripts/*.py"),
                 ROOT / "README.md", ROOT / "Makefile"]:
        named |= set(re.findall(r"\bMLX_STEER_[A-Z_]*[A-Z]\b", path.read_text()))
    missing = named - set(config.SETTINGS)
    assert not missing, f"add these to mlx_steer.config.SETTINGS: {sorted(missing)}"


@pytest.mark.parametrize("value, on", [(None, False), ("", False), ("0", False),
                                       ("false", False), ("No", False), ("off", False),
                                       ("1", True), ("yes", True), ("true", True)])
def test_a_flag_means_the_same_everywhere(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("MLX_STEER_NO_FASTPATH", raising=False)
    else:
        monkeypatch.setenv("MLX_STEER_NO_FASTPATH", value)
    assert config.flag("MLX_STEER_NO_FASTPATH") is on


def test_defaults_and_unknown_names(monkeypatch):
    monkeypatch.delenv("MLX_STEER_WEIGHT_CACHE", raising=False)
    assert config.flag("MLX_STEER_WEIGHT_CACHE")  # on unless turned off
    monkeypatch.setenv("MLX_STEER_HOME", "/somewhere")
    assert config.home() == Path("/somewhere")
    with pytest.raises(KeyError):
        config.flag("MLX_STEER_NOT_A_SETTING")


def test_the_table_is_printed():
    out = subprocess.run([sys.executable, "-m", "mlx_steer.config"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert all(name in out.stdout for name in config.SETTINGS)


@pytest.mark.parametrize("chosen", [None, "1", "0"])
def test_mlx_tf32_is_off_unless_the_user_chose(chosen):
    """Importing mlx_steer keeps MLX's float32 products in full precision (MLX_ENABLE_TF32=0)
    unless the variable is already set, which it leaves as it is."""
    env = {k: v for k, v in os.environ.items() if k != config.TF32}
    if chosen is not None:
        env[config.TF32] = chosen
    p = subprocess.run([sys.executable, "-c", "import os, mlx_steer; "
                        f"print(os.environ.get({config.TF32!r}))"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == (chosen or "0")
