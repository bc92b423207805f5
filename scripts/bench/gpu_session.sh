#!/bin/bash
# On a GPU machine lent in this workplace, from the checkout's root, after scripts/bench/gpu_prepare.sh here and
# with .gpu carried there (docs/benchmarks.md gives the device tool's call): installs .gpu/wheels beside the
# image's PyTorch, checks that tidpo imports with them (one line and exit 2 if not, before any GPU time is spent
# on rows), then runs scripts/bench/gpu.sh within BUDGET_S, its logs packed into $OUT/logs.tgz so that what
# comes back is four files: gpu.txt, checks.txt, gpu_bench.json, logs.tgz.
#
#   OUT=$OUT bash scripts/bench/gpu_session.sh      # BUDGET_S (420), CHECKS (0), BENCH_STEPS (15), GPU_ROWS: gpu.sh's
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if ! ls .gpu/wheels/*.whl > /dev/null 2>&1 || [ ! -f .gpu/hh.jsonl.gz ]; then
  echo "scripts/bench/gpu_session.sh: no .gpu/wheels or .gpu/hh.jsonl.gz: run scripts/bench/gpu_prepare.sh here and carry .gpu" >&2
  exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tidpo-site \
  .gpu/wheels/*.whl || { echo "scripts/bench/gpu_session.sh: installing .gpu/wheels failed" >&2; exit 2; }
export PYTHONPATH=$PWD:/tmp/tidpo-site${PYTHONPATH:+:$PYTHONPATH}
"$PY" - <<'PYEOF' || exit 2
import importlib.metadata as md, sys
try:
    import torch, transformers, deepspeed, hydra, omegaconf, tidpo_cli.cli, tidpo_cli.trainer  # noqa: F401
except Exception as e:  # the one line that says what is missing
    sys.exit(f"scripts/bench/gpu_session.sh: tidpo does not import here: {type(e).__name__}: {e}")
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      *(f"{p} {md.version(p)}" for p in ("transformers", "deepspeed", "hydra-core", "tokenizers", "huggingface-hub")))
PYEOF
export OUT=${OUT:-bench-gpu} HH=.gpu/hh.jsonl.gz CHECKS=${CHECKS:-0} BUDGET_S=${BUDGET_S:-420}
export BENCH_STEPS=${BENCH_STEPS:-15} LOGS=${LOGS:-/tmp/tidpo-gpu-logs} PYTHON=$PY
bash scripts/bench/gpu.sh
