# Set-up and entry points. `make demo` and `make test` work on a fresh machine: they create
# .venv, install torch first, then contdeq with the extras they need.
#
# torch comes from TORCH_INDEX, PyTorch's CPU wheel index by default: on Linux a plain
# `pip install torch` from PyPI pulls the CUDA build (several GB of NVIDIA libraries). The
# index is passed to that one install only (`--index-url`); pip's own configuration (a mirror,
# find-links) still applies. Override on the command line:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cu128   # a CUDA build
#   make demo TORCH_INDEX=                                          # pip's configured index
# If the index cannot be reached, pip warns, retries, and falls back to its other sources.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# torchattacks (the `robust` extra, for tests/test_robust.py) declares torchvision and an old
# requests but imports neither: installed without its dependencies, it leaves torch as it is.
TORCHATTACKS_SPEC ?= torchattacks==3.5.1

.PHONY: demo test lint bench-solvers bench-paper bench-paper-quick docs docs-quick clean \
	mutation mutation-subset

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) \
		"$(TORCH_SPEC)"

$(VENV)/.examples: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[examples]"
	touch $@

$(VENV)/.bench: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[bench,examples]"
	touch $@

$(VENV)/.docs: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[docs,examples,federated]"
	touch $@

$(VENV)/.mutation: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[test,examples,mutation]"
	touch $@

$(VENV)/.test: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[test,examples,federated]"
	$(BIN)/python -m pip install --quiet --no-deps "$(TORCHATTACKS_SPEC)"
	touch $@

demo: $(VENV)/.examples
	$(BIN)/python examples/demo.py

lint: $(VENV)/.test
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

# The documentation site, tutorials executed, warnings as errors: docs/_build/html/index.html.
# docs-quick runs the tutorials on their tiny settings (CONTDEQ_TUTORIAL_QUICK=1).
SPHINX := $(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

docs: $(VENV)/.docs
	rm -rf docs/auto_examples
	$(SPHINX)

docs-quick: $(VENV)/.docs
	rm -rf docs/auto_examples
	CONTDEQ_TUTORIAL_QUICK=1 $(SPHINX)

bench-solvers: $(VENV)/.examples
	$(BIN)/python benchmarks/solvers.py

# Every layer kind trained on the same tasks, torchdeq included (benchmarks/README.md).
bench-paper: $(VENV)/.bench
	$(BIN)/python benchmarks/paper.py --threads 1

bench-paper-quick: $(VENV)/.bench
	$(BIN)/python benchmarks/paper.py --quick

# Mutation testing with mutmut (docs/testing.md), not part of CI: [tool.mutmut] in
# pyproject.toml names the modules and the tests. `make mutation` runs every mutant of
# contdeq/solvers, contdeq/implicit, contdeq/nn and contdeq/regularizers.py (hours on 2 cores);
# `make mutation-subset` the measured subset below. MUTANTS: mutant name patterns (empty: all).
# Results are cached in mutants/ (delete it for a fresh run); the report goes to
# MUTATION_REPORT.
MUTATION_WORKERS ?= 2
MUTANTS ?=
MUTATION_REPORT ?= benchmarks/results/mutation.md
# The measured subset (benchmarks/results/mutation.md): every mutant of ptc's step rule (ptc_rule) and
# its slow path, the Hutchinson Jacobian term, Picard's step and the steady-state test.
MUTATION_SUBSET := contdeq.solvers.integrate.x__ptc_slow_path* contdeq.solvers.integrate.x_ptc_rule* \
	contdeq.regularizers.x_jacobian_frobenius* contdeq.solvers.picard.x*Picard*propose* \
	contdeq.solvers.termination.x*SteadyStateCondition*evaluate*

mutation: $(VENV)/.mutation
	OMP_NUM_THREADS=1 nice -n 10 $(BIN)/mutmut run --max-children $(MUTATION_WORKERS) \
		$(foreach p,$(MUTANTS),'$(p)')
	$(BIN)/python benchmarks/mutation_report.py --output $(MUTATION_REPORT) \
		--patterns $(foreach p,$(MUTANTS),'$(p)')

mutation-subset:
	$(MAKE) mutation MUTANTS="$(MUTATION_SUBSET)"

clean:
	rm -rf mutants $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis docs/_build \
		docs/auto_examples docs/sg_execution_times.rst
