# The commands a newcomer needs. `make demo` runs the main job, `make test` the tests; both create
# .venv on first use. The pins below are what works on the CPU build machines; pyproject.toml pins loosely.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
RUN_DIR ?= runs/demo

.PHONY: venv test test-all lint format demo smoke bench clean

$(BIN)/activate: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e ".[dev,demo,quant]"
	touch $(BIN)/activate

venv: $(BIN)/activate

test: venv
	$(BIN)/python -m pytest -q

test-all: venv
	$(BIN)/python -m pytest -q -m ""

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

smoke: venv
	$(BIN)/python -m mllm_kd.data_prep.synthetic --out runs/smoke/data
	$(BIN)/python -m mllm_kd.pipeline --config configs/smoke.yaml run_dir=runs/smoke

demo: venv
	$(BIN)/python -m mllm_kd.demo --run-dir $(RUN_DIR)

bench: venv
	$(BIN)/python bench/kd_loss.py --device cpu --vocab 32000 --tokens 512 --visual 364 --chunk-size 256

clean:
	rm -rf runs/smoke
