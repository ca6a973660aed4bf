# Two commands set up a fresh machine and use it (README.md):
#   make quickstart   the main job
#   make test         lint and format checks (ruff), then the whole test suite (what .ci/run calls)
# Both create .venv if it is missing and install torch==2.13.0 (the CPU build) first,
# then the kernel and every plugin under plugins/ in editable mode, pinned by constraints/cpu.txt.
# make test also builds .venv-evalscope, EvalScope's own environment (its modelscope pins
# datasets below 5; modelloop's stack needs 5), pinned by constraints/evalscope.txt, and
# installs Debian's chromium and its driver for the browser tests of `modelloop ui`.

PYTHON ?= python3
# The suite's processes: two for CI's two cores (a module's tests share one, with its fixtures).
TEST_WORKERS ?= 2
VENV ?= .venv
BIN := $(VENV)/bin
PLUGINS := $(wildcard plugins/*)
STAMP := $(VENV)/.installed
EVALSCOPE_VENV := .venv-evalscope
EVALSCOPE_STAMP := $(EVALSCOPE_VENV)/.installed
export MODELLOOP_EVALSCOPE_PYTHON := $(abspath $(EVALSCOPE_VENV))/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export MODELSCOPE_OFFLINE := 1

.PHONY: test quickstart bench install clean browser

test: $(STAMP) $(EVALSCOPE_STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The main job: examples/quickstart.yaml takes a tiny model built here around the whole loop
# (eval, SFT, eval, GRPO, eval, merged export, a served check through the OpenAI API, eval)
# and writes the run under runs/ with a report.md.
quickstart: $(STAMP)
	$(BIN)/modelloop plugins
	$(BIN)/modelloop run examples/quickstart.yaml

bench: $(STAMP)
	$(BIN)/python bench/plugins_startup.py
	$(BIN)/python bench/data_throughput.py
	$(BIN)/python bench/cpu_matmul.py

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt $(wildcard plugins/*/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints/cpu.txt -e '.[test]' $(foreach p,$(PLUGINS),-e '$(p)[test]')
	$(BIN)/python -c "import torch; v = torch.__version__; assert v.startswith('2.13.0'), f'torch {v}: a CUDA build was pulled in'"
	touch $@

$(EVALSCOPE_STAMP): constraints/evalscope.txt
	test -x $(EVALSCOPE_VENV)/bin/python || $(PYTHON) -m venv $(EVALSCOPE_VENV)
	$(EVALSCOPE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(EVALSCOPE_VENV)/bin/python -m pip install --quiet -r constraints/evalscope.txt
	touch $@

# The ui's browser tests drive Debian's chromium through its chromedriver (selenium); nothing
# downloads a browser at test time. Where apt cannot install them, those tests skip, saying so.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) || \
		echo "make: chromium and chromium-driver could not be installed: the ui's browser tests will skip"

clean:
	rm -rf $(VENV) $(EVALSCOPE_VENV)
