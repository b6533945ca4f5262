# The README's two commands: `make quickstart` and `make test`. Each installs into .venv when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# On a CPU machine take the CPU wheel of torch (never a multi-GB CUDA build); a GPU user who already
# has a CUDA torch in the venv keeps it, because `pip install` only adds what is missing.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install quickstart lint test test-fast clean-runs bench

$(STAMP): setup.cfg setup.py pyproject.toml $(wildcard moe/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)" 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch" || (echo "torch failed to install" && exit 1)
	# --no-build-isolation: the extension build needs the torch that is installed here
	$(PIP) install -q --no-build-isolation -e ".[dev]" "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')" 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import moe, deepspeed, megatron.core, wandb, datasets, tokenizers" 2>/dev/null || (echo "install failed" && exit 1)
	# say which dispatch backend is live (pip -q above hides setup.py's "extension not built" warning)
	$(VENV)/bin/moe info | grep "dispatch backend"
	touch $(STAMP)

install: $(STAMP)
	$(VENV)/bin/moe info

quickstart: $(STAMP)
	bash experiments/quickstart.sh

# the layering contract of moe/ (setup.cfg [importlinter]) and ruff (pyproject.toml), then the tests
lint: $(STAMP)
	$(VENV)/bin/ruff check moe tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

# one xdist worker more than the cores: much of a multi-process test is waiting (process start-up,
# torchrun rendezvous, Slurm scheduling, signals), which the extra worker fills (on the 2-core CI
# machine the CPUs then idle under 1% of the run: 14:30 with 3 workers, 17:13 with 2). Tests that must
# share a worker say so with xdist_group (the Slurm tests, one cluster).
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup -m "not slow"

bench: $(STAMP)
	$(PY) -m benchmarks.dispatch

clean-runs:
	rm -rf runs/quickstart_dense runs/quickstart_moe runs/quickstart_compare
