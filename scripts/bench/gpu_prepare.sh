#!/bin/bash
# Here, where the package index answers: what scripts/bench/gpu_session.sh needs on a GPU machine lent in this
# workplace (no network there; its image has PyTorch with CUDA, Python 3.12, and much of what tidpo imports, but
# not hydra-core, omegaconf, DeepSpeed or pydantic, and an older transformers), into .gpu/ (git-ignored):
#   .gpu/wheels/   wheels for CPython 3.12 on x86-64 Linux of the packages below, at this checkout's .venv versions
#                  (the ones the tests ran with); DeepSpeed and antlr4 ship only as source, so they are built here
#                  (pure Python: DeepSpeed's CUDA ops are compiled on first use, and tidpo uses none of them)
#   .gpu/hh.jsonl.gz  the HH-RLHF file gpu.sh reads (HH, default ../shared/..., which does not travel)
#
#   bash scripts/bench/gpu_prepare.sh      # then the device tool's run with carry [".gpu"] (docs/benchmarks.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
PYVER=${PYVER:-3.12}  # the lent machine's Python (KINDS.md); another only to try this out on another machine
HH=${HH:-../shared/data/hh-rlhf-harmless-base/test.jsonl.gz}
# What the image lacks or holds too old (its package list: the device tool's KINDS.md), and what those need.
PACKAGES=(hydra-core omegaconf antlr4-python3-runtime deepspeed hjson pydantic pydantic-core annotated-types
          typing-inspection typing-extensions transformers regex)
SOURCE_ONLY=(deepspeed antlr4-python3-runtime)
if [ ! -f "$HH" ]; then echo "scripts/bench/gpu_prepare.sh: no HH-RLHF file at $HH: pass HH=path/to/test.jsonl.gz" >&2; exit 2; fi
pinned() { for p in "$@"; do echo "$p==$("$PY" -c "from importlib.metadata import version; print(version('$p'))")"; done; }
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/source
binary=(); for p in "${PACKAGES[@]}"; do [[ " ${SOURCE_ONLY[*]} " == *" $p "* ]] || binary+=("$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels $(pinned "${binary[@]}")
"$PY" -m pip download -q --no-deps --no-binary=:all: -d .gpu/source $(pinned "${SOURCE_ONLY[@]}")
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .gpu/wheels .gpu/source/*
rm -rf .gpu/source
cp "$HH" .gpu/hh.jsonl.gz
ls .gpu/wheels
du -sh .gpu
