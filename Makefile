# milp: common tasks. `make install` then `make train` / `make test`.
PYTHON ?= python
# CPU build of PyTorch, installed only when no torch is present (keep your CUDA build).
TORCH ?= torch==2.13.0

.PHONY: install train pretrain test test-all lint format sweep clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e ".[dev]"

pretrain:
	$(PYTHON) -m milp.pretrain

train:
	$(PYTHON) -m milp.train +experiment=lamp

test:
	$(PYTHON) -m pytest

test-all:
	$(PYTHON) -m pytest -m ""

lint:
	ruff check .
	ruff format --check .

format:
	ruff format .
	ruff check --fix .

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
