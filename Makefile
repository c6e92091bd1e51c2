# Set-up and entry points. `make demo` and `make test` work on a fresh machine: they create
# .venv, install torch first, then contdeq with the extras they need, and print how long the
# set-up took.
#
# torch comes from TORCH_INDEX, PyTorch's CPU wheel index by default: on Linux a plain
# `pip install torch` from PyPI pulls the CUDA build (several GB of NVIDIA libraries). The
# index is passed to that one install only (`--index-url`); pip's own configuration (a mirror,
# find-links) still applies. Before installing, the set-up asks the index for its page with a
# 3-second timeout; where it does not answer (no network to it, a firewall), one line says so
# and torch comes from pip's configured index instead (pip would otherwise retry for minutes).
# Override on the command line:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cu128   # a CUDA build
#   make demo TORCH_INDEX=                                          # pip's configured index
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# torchattacks (attacks on contdeq models, tests/test_robust.py) declares torchvision and an old
# requests but imports neither; its metadata would replace a CPU torch with the CUDA build, so
# it is not an extra of contdeq: `make test` installs it without its dependencies.
TORCHATTACKS_SPEC ?= torchattacks==3.5.1
# Installs contdeq with the target's EXTRAS, prints how long it took and, on the first set-up
# of .venv, the total since the set-up began. `--no-compile`, then one `import contdeq`
# allowed to write bytecode: only the modules a run imports are compiled, not every file of
# torch (what pip would do), and they are compiled even where PYTHONDONTWRITEBYTECODE is set.
define install_extras
	@start=$$(date +%s); \
	$(BIN)/python -m pip install --quiet --no-compile -e ".[$(EXTRAS)]" && \
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -c "import contdeq" && \
	echo "set-up: contdeq[$(EXTRAS)] installed in $$(( $$(date +%s) - start )) s" && \
	if [ -f $(VENV)/.setup-start ]; then \
		echo "set-up: done in $$(( $$(date +%s) - $$(cat $(VENV)/.setup-start) )) s in all"; \
		rm $(VENV)/.setup-start; \
	fi
endef

.PHONY: demo test lint bench-solvers bench-paper bench-paper-quick docs docs-quick clean \
	mutation mutation-subset

$(BIN)/python:
	mkdir -p $(VENV) && date +%s > $(VENV)/.setup-start
	$(PYTHON) -m venv $(VENV)
	@index="$(TORCH_INDEX)"; start=$$(date +%s); \
	if [ -n "$$index" ] && ! $(PYTHON) -c 'import sys, urllib.request; \
	urllib.request.urlopen(sys.argv[1], timeout=3)' "$$index/" >/dev/null 2>&1; then \
		echo "set-up: $$index did not answer within 3 s; installing torch from pip's" \
			"configured index instead (on Linux PyPI's build is the CUDA one)"; \
		index=""; \
	fi; \
	echo "set-up: installing $(TORCH_SPEC)$${index:+ from $$index}"; \
	$(BIN)/python -m pip install --quiet --no-compile $${index:+--index-url $$index} "$(TORCH_SPEC)" && \
	echo "set-up: torch installed in $$(( $$(date +%s) - start )) s"

$(VENV)/.examples: EXTRAS = examples
$(VENV)/.examples: $(BIN)/python pyproject.toml
	$(install_extras)
	touch $@

$(VENV)/.bench: EXTRAS = bench,examples
$(VENV)/.bench: $(BIN)/python pyproject.toml
	$(install_extras)
	touch $@

$(VENV)/.docs: EXTRAS = docs,examples,federated
$(VENV)/.docs: $(BIN)/python pyproject.toml
	$(install_extras)
	touch $@

$(VENV)/.mutation: EXTRAS = test,examples,mutation
$(VENV)/.mutation: $(BIN)/python pyproject.toml
	$(install_extras)
	touch $@

$(VENV)/.test: EXTRAS = test,examples,federated
$(VENV)/.test: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --no-deps "$(TORCHATTACKS_SPEC)"
	$(install_extras)
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
	$(BIN)/python -m benchmarks.solvers

# Every layer kind trained on the same tasks, torchdeq included (benchmarks/README.md).
bench-paper: $(VENV)/.bench
	$(BIN)/python -m benchmarks.paper --threads 1

bench-paper-quick: $(VENV)/.bench
	$(BIN)/python -m benchmarks.paper --quick

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
MUTATION_SUBSET := contdeq.solvers.ptc.x__ptc_slow_path* contdeq.solvers.ptc.x_ptc_rule* \
	contdeq.regularizers.x_jacobian_frobenius* contdeq.solvers.picard.x*Picard*propose* \
	contdeq.solvers.termination.x*SteadyStateCondition*evaluate*

mutation: $(VENV)/.mutation
	OMP_NUM_THREADS=1 nice -n 10 $(BIN)/mutmut run --max-children $(MUTATION_WORKERS) \
		$(foreach p,$(MUTANTS),'$(p)')
	$(BIN)/python -m benchmarks.mutation_report --output $(MUTATION_REPORT) \
		--patterns $(foreach p,$(MUTANTS),'$(p)')

mutation-subset:
	$(MAKE) mutation MUTANTS="$(MUTATION_SUBSET)"

clean:
	rm -rf mutants $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis docs/_build \
		docs/auto_examples docs/sg_execution_times.rst
