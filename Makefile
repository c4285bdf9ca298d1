# Two entry points (see README): `make demo` and `make test`. Both bootstrap .venv first,
# pinning the CPU wheel of torch through constraints.txt so pip never pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNS := runs

.PHONY: venv demo lint test test-slow test-e2e test-zoo

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

venv: $(BIN)/.installed

# Dense training (AdamW) → RAMDA group-lasso fine-tuning to 30% of the FLOPs (λ found by the budget
# controller) → extract + ONNX export + verify → ORT benchmark.
demo: venv
	$(BIN)/compress finetune --model digits-resnet --optimizer adamw --lam 0 --epochs 30 --schedule cosine \
		--weight-decay 1e-4 --threads 1 --out $(RUNS)/digits-dense --force --quiet
	$(BIN)/compress finetune --model digits-resnet --init $(RUNS)/digits-dense/weights.safetensors \
		--target-flops 0.3 --threads 1 --out $(RUNS)/digits-ramda --force --quiet
	$(BIN)/compress export $(RUNS)/digits-ramda
	$(BIN)/compress bench $(RUNS)/digits-ramda

# Lint and format check first (cheap), then the default suite: everything not marked slow, e2e included.
# No `|| true` or `-` prefix anywhere: make stops on any non-zero exit, so pytest's 5 ("no tests collected")
# fails the target like a test failure does.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

# The long tests left out of the default run (the later -m replaces addopts' "not slow").
test-slow: venv
	$(BIN)/python -m pytest -q -m slow

# Whole-pipeline subprocess tests only (CLI, examples, torchrun), slow ones included.
test-e2e: venv
	$(BIN)/python -m pytest -q -m e2e

# 47 real torchvision/timm/Hugging Face architectures with random weights (needs the [zoo] extra).
test-zoo: venv
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[zoo]'
	$(BIN)/python -m pytest -q -m zoo
