#!/bin/bash
# On a machine with one NVIDIA GPU (CI never runs this): first checks that the GPU paths work (bf16 autocast,
# DeepSpeed ZeRO-3 over nccl), then measures `tidpo train` throughput on a ~1B Llama built from config in bf16
# with SDPA attention: dpo, tidpo_no_triplet and tidpo on HH-RLHF pairs (byte tokenizer, max_length 512,
# 8 pairs per step), and the shared-prompt layout under SDPA and under FlexAttention. Writes $OUT/gpu_bench.json
# (tokens/s, samples/s, step time, peak memory, model-FLOPs utilisation, trainer.share_prompt=auto's timings)
# and the runs' logs.
#
#   OUT=bench-gpu HH=path/to/hh-rlhf/test.jsonl.gz bash scripts/bench/gpu.sh
#
# MFU counts 8 x parameters per token (policy forward + backward, reference forward: DPO's work) against the
# GPU's dense bf16 peak (PEAK_TFLOPS, default 989 for an H100/H200 SXM), for every loss, so the TI-DPO rows
# show what its extra passes cost in DPO-equivalent throughput.
set -uo pipefail
OUT=${OUT:-bench-gpu}
# HH: the harmless-base test split of Anthropic/hh-rlhf (harmless-base/test.jsonl.gz on the hub; docs/benchmarks.md).
# The default path exists only in the development setup (../shared beside the checkout).
HH=${HH:-../shared/data/hh-rlhf-harmless-base/test.jsonl.gz}
if [ ! -f "$HH" ]; then
  echo "scripts/bench/gpu.sh: no HH-RLHF file at $HH: pass HH=path/to/hh-rlhf/harmless-base/test.jsonl.gz (docs/benchmarks.md says where to get it)" >&2
  exit 2
fi
PY=${PYTHON:-python3}
STEPS=${BENCH_STEPS:-20}
WARMUP=${BENCH_WARMUP:-5}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
DEVICE=${DEVICE:-cuda}                     # DEVICE=cpu SIZE=small: a quick run of this script without a GPU
SIZE=${SIZE:-1b}
CHECKS=${CHECKS:-1}                        # CHECKS=0: throughput rows only
mkdir -p "$OUT"
RUNS=$(mktemp -d)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
train() { "$PY" -m tidpo_cli.cli train trainer.device="$DEVICE" trainer.precision=bf16 logger.progress=plain "$@"; }
status() { printf '%s %s\n' "$1" "$2" | tee -a "$OUT/checks.txt"; }

: > "$OUT/checks.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || echo "$DEVICE" > "$OUT/gpu.txt"
cat "$OUT/gpu.txt"

# 1. The demo's TI-DPO run, shortened, on the GPU with bf16 autocast.
if [ "$CHECKS" = 1 ]; then
if train trainer.max_steps=100 hydra.run.dir="$RUNS/tiny" > "$OUT/tiny.log" 2>&1; then
  status tiny_bf16_tidpo "ok: $(grep -o 'held-out rewards/accuracies: .*' "$OUT/tiny.log")"
else status tiny_bf16_tidpo "FAILED (tiny.log)"; fi

# 2. DeepSpeed ZeRO-3 in one process (a process group of one, nccl), every tensor partitioned, bf16.
if train loss=tidpo deepspeed=zero3 deepspeed.zero_optimization.stage3_param_persistence_threshold=0 \
     trainer.max_steps=20 trainer.save_every=10 hydra.run.dir="$RUNS/zero3" > "$OUT/zero3.log" 2>&1 \
   && "$PY" -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('$RUNS/zero3/final')"; then
  status zero3_nccl_bf16 "ok: $(grep -o 'held-out rewards/accuracies: .*' "$OUT/zero3.log")"
else status zero3_nccl_bf16 "FAILED (zero3.log)"; fi
fi

# 3. Throughput on a ~1.1B Llama (hidden 2048, 16 layers), fp32 master weights, bf16 autocast.
if [ "$SIZE" = 1b ]; then
  MODEL=(model.config.hidden_size=2048 model.config.intermediate_size=5632 model.config.num_hidden_layers=16
         model.config.num_attention_heads=16 model.config.num_key_value_heads=16)
else MODEL=(); fi
BIG=("${MODEL[@]}" model.config.max_position_embeddings=1024 data=hh_rlhf "data.path=$HH" data.max_length=512 data.max_prompt_length=256 data.eval_size=8
     trainer.micro_batch_size=8 trainer.max_steps="$STEPS" trainer.eval_before=false trainer.save_every=0
     trainer.save_final=false trainer.lr=1e-5 trainer.warmup_steps=0 logger.print_every=5)
# name:overrides (GPU_ROWS="name:overrides;..." replaces them). `dpo_unshared` is DPO with the prompt computed
# twice and batches in random order (the layout before trainer.share_prompt and data.group_by_length);
# `tidpo_separate` takes the saliency from a forward and backward of its own (`tidpo`: auto, fused); `dpo_shared`
# forces the shared prompt under SDPA (the 4-D mask), the `*_flex*` rows run FlexAttention, its block mask with the
# prompt shared, causal without;
# `tidpo_compiled` / `tidpo_eager` sample the anchors with / without the compiled decode step (`tidpo`: auto, on);
# `tidpo_refresh_auto` picks its anchor window from timed sampling (the log line says which); the `*_zero3*` rows run
# DeepSpeed ZeRO-3 in one process (nccl, every tensor partitioned), the anchors sampled with the weights gathered
# once (auto) or every layer gathered for every token (`per_layer`).
ZERO3="deepspeed=zero3 deepspeed.zero_optimization.stage3_param_persistence_threshold=0"
FLEX=model.attn_implementation=flex_attention
IFS=';' read -ra ROWS <<< "${GPU_ROWS:-}"
[ ${#ROWS[@]} -gt 0 ] || ROWS=("dpo:loss=dpo" "dpo_unshared:loss=dpo trainer.share_prompt=false data.group_by_length=0"
      "tidpo_no_triplet:loss=tidpo_no_triplet" "tidpo:loss=tidpo" "tidpo_separate:loss=tidpo loss.importance.grad_pass=separate"
      "dpo_shared:loss=dpo trainer.share_prompt=true"
      "dpo_flex:loss=dpo $FLEX trainer.share_prompt=false" "dpo_flex_shared:loss=dpo $FLEX trainer.share_prompt=true"
      "tidpo_flex_shared:loss=tidpo $FLEX trainer.share_prompt=true"
      "tidpo_compiled:loss=tidpo loss.anchor.compile=true" "tidpo_eager:loss=tidpo loss.anchor.compile=false"
      "tidpo_refresh_auto:loss=tidpo loss.anchor.refresh_every=auto"
      "dpo_zero3:loss=dpo $ZERO3" "tidpo_no_triplet_zero3:loss=tidpo_no_triplet $ZERO3" "tidpo_zero3:loss=tidpo $ZERO3"
      "tidpo_zero3_per_layer:loss=tidpo $ZERO3 loss.anchor.zero3_weights=per_layer")
NAMES=()
for row in "${ROWS[@]}"; do
  name=${row%%:*}; read -ra overrides <<< "${row#*:}"
  NAMES+=("$name")
  rm -f "$OUT/$name.jsonl"  # a failed row leaves none, not an earlier call's
  if train "${overrides[@]}" "${BIG[@]}" hydra.run.dir="$RUNS/$name" > "$OUT/$name.log" 2>&1; then
    status "bench_$name" ok
    cp "$RUNS/$name/metrics.jsonl" "$OUT/$name.jsonl"
  else status "bench_$name" "FAILED ($name.log)"; fi
done

"$PY" - "$OUT" "$WARMUP" "$PEAK_TFLOPS" "${NAMES[@]}" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out, warmup, peak = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) * 1e12
names = sys.argv[4:]  # the rows this call ran, in order
params = None
for name in names:  # every row builds the same model: the first log that names its size
    log = out / f"{name}.log"
    for line in log.read_text().splitlines() if log.exists() and params is None else []:
        if "M parameters" in line:
            params = float(line.split("model: ")[1].split(", ")[1].split("M parameters")[0]) * 1e6
result = {"gpu": (out / "gpu.txt").read_text().strip(), "parameters": params, "warmup_steps_excluded": warmup,
          "checks": (out / "checks.txt").read_text().splitlines(), "runs": {}}
for loss in names:
    path = out / f"{loss}.jsonl"
    if not path.exists():
        continue
    rows = [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r and "eval/loss" not in r]
    steady = rows[warmup:]
    tokens = statistics.median(r["perf/tokens_per_s"] for r in steady)
    result["runs"][loss] = {
        "steps_measured": len(steady),
        "tokens_per_s": tokens,
        "samples_per_s": statistics.median(r["perf/samples_per_s"] for r in steady),
        "step_s": statistics.median(8 / r["perf/samples_per_s"] for r in steady),
        "peak_mem_gb": max(r.get("perf/peak_mem_gb", 0) for r in rows),
        "mfu_dpo_flops": 8 * params * tokens / peak if params else None,
        # trainer.share_prompt=auto's two timings and its choice, as the run logged them
        "share_prompt_auto": next((line.split("trainer.share_prompt=auto: ", 1)[1]
                                   for line in (out / f"{loss}.log").read_text().splitlines()
                                   if "trainer.share_prompt=auto: " in line), None),
    }
dpo = result["runs"].get("dpo")
for loss, run in result["runs"].items():
    run["step_time_vs_dpo"] = run["step_s"] / dpo["step_s"] if dpo else None
(out / "gpu_bench.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
PYEOF
