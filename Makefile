# Two entry points on a fresh machine: `make run` and `make test`. Both create .venv first.
# torch is installed on its own, before everything else, so the resolver never pulls a CUDA build
# on CPU machines (GPU users: install your CUDA torch into .venv first, then `make install`).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install run test reproduce bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python jobs/self_improve.py

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

reproduce: $(STAMP)
	$(BIN)/python jobs/reproduce.py

bench: $(STAMP)
	$(BIN)/python bench/sampler.py --models tiny

clean:
	rm -rf $(VENV) runs .pytest_cache
