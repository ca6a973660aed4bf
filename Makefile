# Two commands set up a fresh machine and use it (README.md):
#   make quickstart   the main job
#   make test         the whole test suite (what .ci/run calls)
# Both create .venv if it is missing and install torch==2.13.0 (the CPU build) first,
# then the kernel and every plugin under plugins/ in editable mode, pinned by constraints/cpu.txt.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PLUGINS := $(wildcard plugins/*)
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: test quickstart bench install clean

test: $(STAMP)
	$(BIN)/python -m pytest

# Until the loop issue lands, the main job runs the most complete path that exists:
# demo data, a locally built model, data validation, eval before, SFT, eval after, a merged
# export, and batch inference through the exported model.
QS := runs/quickstart
quickstart: $(STAMP)
	rm -rf $(QS)
	$(BIN)/modelloop plugins
	$(BIN)/python examples/make_demo_data.py $(QS)/data
	$(BIN)/modelloop new-model --family qwen2 --preset tiny --out $(QS)/base --corpus $(QS)/data/tasks.jsonl
	$(BIN)/modelloop data check $(QS)/data/*.jsonl --model $(QS)/base --max-length 64
	$(BIN)/modelloop data preview $(QS)/data/tasks.jsonl --model $(QS)/base -n 1
	$(BIN)/modelloop eval $(QS)/base --data $(QS)/data/tasks_eval.jsonl --metric accuracy --output-dir $(QS)/eval-base
	$(BIN)/modelloop sft --model $(QS)/base --data $(QS)/data/tasks.jsonl --tuner full --lr 2e-3 --epochs 3 \
		--batch-size 16 --max-length 64 --logging-steps 50 --output-dir $(QS)/sft
	$(BIN)/modelloop eval $(QS)/sft --data $(QS)/data/tasks_eval.jsonl --metric accuracy --output-dir $(QS)/eval-sft
	$(BIN)/modelloop export $(QS)/sft --out $(QS)/export
	$(BIN)/modelloop infer $(QS)/export --input $(QS)/data/tasks_eval.jsonl --output $(QS)/answers.jsonl --max-tokens 8
	@echo "quickstart: runs in $(QS) (see manifest.json, loss.png and scored.jsonl in each)"

bench: $(STAMP)
	$(BIN)/python bench/plugins_startup.py
	$(BIN)/python bench/data_throughput.py

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt $(wildcard plugins/*/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints/cpu.txt -e '.[test]' $(foreach p,$(PLUGINS),-e '$(p)[test]')
	$(BIN)/python -c "import torch; v = torch.__version__; assert v.startswith('2.13.0'), f'torch {v}: a CUDA build was pulled in'"
	touch $@

clean:
	rm -rf $(VENV)
