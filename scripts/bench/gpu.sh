#!/bin/bash
# On a machine with one NVIDIA GPU (CI never runs this): first checks that the GPU paths work (bf16 autocast,
# DeepSpeed ZeRO-3 over nccl), then measures `tidpo train` throughput on a ~1B Llama built from config in bf16
# with SDPA attention: dpo, tidpo_no_triplet and tidpo on HH-RLHF pairs (byte tokenizer, max_length 512,
# 8 pairs per step), and the levers of each (compiled anchor sampling, the anchor window, the fused importance
# pass, the shared prompt under SDPA and under FlexAttention, ZeRO-3). Writes $OUT/gpu_bench.json (tokens/s,
# samples/s, step time, peak memory, model-FLOPs utilisation, trainer.share_prompt=auto's timings) again after
# every row (scripts/bench/gpu_summary.py), and the rows' logs and metrics into $LOGS ($OUT unless set; set
# elsewhere, they are packed into $OUT/logs.tgz after every row).
#
#   OUT=bench-gpu HH=path/to/hh-rlhf/test.jsonl.gz bash scripts/bench/gpu.sh
#   BUDGET_S=480 ...   # starts no row that would end past 480 s by the longest row so far; the rest are skipped
#
# The rows run in the order of what is owed first (docs/benchmarks.md), so a budget keeps those that matter most.
# On a GPU machine lent in this workplace, whose image lacks some of tidpo's packages, scripts/bench/gpu_session.sh
# installs them and runs this script (docs/benchmarks.md says how).
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
BUDGET_S=${BUDGET_S:-}                     # seconds from the start; unset: every row runs
LOGS=${LOGS:-$OUT}
mkdir -p "$OUT" "$LOGS"
RUNS=$(mktemp -d)
START=$SECONDS  # BUDGET_S counts from here, the checks included
HERE=$(dirname "$0")
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# torch's CUDA-graph log into each row's log: a compiled decode step whose weights sit at new addresses at every
# generation (ZeRO-3's gathered weights) is recorded anew each time; the summary counts those re-recordings.
export TORCH_LOGS=${TORCH_LOGS:-cudagraphs}
train() { "$PY" -m tidpo_cli.cli train trainer.device="$DEVICE" trainer.precision=bf16 logger.progress=plain "$@"; }
status() { printf '%s %s\n' "$1" "$2" | tee -a "$OUT/checks.txt"; }

: > "$OUT/checks.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || echo "$DEVICE" > "$OUT/gpu.txt"
cat "$OUT/gpu.txt"

# 1. The demo's TI-DPO run, shortened, on the GPU with bf16 autocast.
if [ "$CHECKS" = 1 ]; then
if train trainer.max_steps=100 hydra.run.dir="$RUNS/tiny" > "$LOGS/tiny.log" 2>&1; then
  status tiny_bf16_tidpo "ok: $(grep -o 'held-out rewards/accuracies: .*' "$LOGS/tiny.log")"
else status tiny_bf16_tidpo "FAILED (tiny.log)"; fi

# 2. DeepSpeed ZeRO-3 in one process (a process group of one, nccl), every tensor partitioned, bf16.
if train loss=tidpo deepspeed=zero3 deepspeed.zero_optimization.stage3_param_persistence_threshold=0 \
     trainer.max_steps=20 trainer.save_every=10 hydra.run.dir="$RUNS/zero3" > "$LOGS/zero3.log" 2>&1 \
   && "$PY" -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('$RUNS/zero3/final')"; then
  status zero3_nccl_bf16 "ok: $(grep -o 'held-out rewards/accuracies: .*' "$LOGS/zero3.log")"
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
# name:overrides, in order of what is owed first (GPU_ROWS="name:overrides;..." replaces them):
# `dpo` is the baseline of every ratio and the MFU target; `tidpo` is TI-DPO as a user gets it (anchors every step,
# sampled with the compiled decode step on CUDA, the fused importance pass), `tidpo_eager` the same with eager
# sampling; `dpo_flex_shared` runs FlexAttention with its block mask and the prompt shared (`dpo_flex`: causal,
# one row per response); the `*_zero3*` rows run DeepSpeed ZeRO-3 in one process (nccl, every tensor partitioned),
# the anchors sampled with the weights gathered once (auto) or every layer gathered for every token (`per_layer`);
# `tidpo_refresh_auto` picks its anchor window from timed sampling (the log line says which); `tidpo_separate`
# takes the saliency from a forward and backward of its own; `dpo_unshared` is DPO with the prompt computed twice
# and batches in random order (the layout before trainer.share_prompt and data.group_by_length); `dpo_shared`
# forces the shared prompt under SDPA (the 4-D mask).
ZERO3="deepspeed=zero3 deepspeed.zero_optimization.stage3_param_persistence_threshold=0"
FLEX=model.attn_implementation=flex_attention
IFS=';' read -ra ROWS <<< "${GPU_ROWS:-}"
[ ${#ROWS[@]} -gt 0 ] || ROWS=("dpo:loss=dpo" "tidpo:loss=tidpo" "tidpo_eager:loss=tidpo loss.anchor.compile=false"
      "tidpo_no_triplet:loss=tidpo_no_triplet" "dpo_flex_shared:loss=dpo $FLEX trainer.share_prompt=true"
      "tidpo_zero3:loss=tidpo $ZERO3" "dpo_zero3:loss=dpo $ZERO3"
      "tidpo_refresh_auto:loss=tidpo loss.anchor.refresh_every=auto"
      "tidpo_separate:loss=tidpo loss.importance.grad_pass=separate"
      "dpo_flex:loss=dpo $FLEX trainer.share_prompt=false" "tidpo_flex_shared:loss=tidpo $FLEX trainer.share_prompt=true"
      "dpo_unshared:loss=dpo trainer.share_prompt=false data.group_by_length=0"
      "dpo_shared:loss=dpo trainer.share_prompt=true"
      "tidpo_no_triplet_zero3:loss=tidpo_no_triplet $ZERO3"
      "tidpo_zero3_per_layer:loss=tidpo $ZERO3 loss.anchor.zero3_weights=per_layer")
summarise() {  # gpu_bench.json from the rows so far; their logs packed when they live outside $OUT
  "$PY" "$HERE/gpu_summary.py" "$OUT" "$LOGS" "$WARMUP" "$PEAK_TFLOPS" "${NAMES[@]}"
  [ "$LOGS" -ef "$OUT" ] || tar czf "$OUT/logs.tgz" -C "$LOGS" .
}
NAMES=()
LONGEST=0
for row in "${ROWS[@]}"; do
  name=${row%%:*}; read -ra overrides <<< "${row#*:}"
  rm -f "$LOGS/$name.jsonl"  # a failed row leaves none, not an earlier call's
  if [ -n "$BUDGET_S" ] && [ $((SECONDS - START + LONGEST)) -gt "$BUDGET_S" ]; then
    status "bench_$name" "skipped (BUDGET_S=$BUDGET_S: $((SECONDS - START)) s gone, the longest row took $LONGEST s)"
    continue
  fi
  NAMES+=("$name")
  began=$SECONDS
  if train "${overrides[@]}" "${BIG[@]}" hydra.run.dir="$RUNS/$name" > "$LOGS/$name.log" 2>&1; then
    status "bench_$name" "ok ($((SECONDS - began)) s)"
    cp "$RUNS/$name/metrics.jsonl" "$LOGS/$name.jsonl"
  else status "bench_$name" "FAILED ($name.log)"; fi
  LONGEST=$(( SECONDS - began > LONGEST ? SECONDS - began : LONGEST ))
  summarise
done
summarise
cat "$OUT/gpu_bench.json"
