#!/bin/bash
# Here, where the package index answers: what scripts/bench/gpu_session.sh needs on a GPU machine lent in this
# workplace (no network there; its image has PyTorch with CUDA, Python 3.12, and much of what tidpo imports, but
# not hydra-core, omegaconf, DeepSpeed or pydantic, and an older transformers and huggingface-hub), into .gpu/
# (git-ignored):
#   .gpu/wheels/   wheels for CPython 3.12 on x86-64 Linux of what the GPU rows import besides PyTorch: every
#                  package that transformers, DeepSpeed, hydra-core and omegaconf require, and what those require in
#                  turn, read from this checkout's .venv (ROOTS below), at its versions (the ones the tests ran
#                  with), less PyTorch, what PyTorch requires and numpy, which the image's PyTorch was built with.
#                  So a new release in .venv that needs a newer package (transformers 5.25 needs huggingface-hub 2.4,
#                  which needs httpx2) brings that package too. DeepSpeed and antlr4 ship only as source, so they are
#                  built here (pure Python: DeepSpeed's CUDA ops are compiled on first use, and tidpo uses none)
#   .gpu/hh.jsonl.gz  the HH-RLHF file gpu.sh reads (HH, default ../shared/..., which does not travel)
#
#   bash scripts/bench/gpu_prepare.sh      # then the device tool's run with carry [".gpu"] (docs/benchmarks.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
PYVER=${PYVER:-3.12}  # the lent machine's Python (KINDS.md); another only to try this out on another machine
HH=${HH:-../shared/data/hh-rlhf-harmless-base/test.jsonl.gz}
# What the GPU rows import that the image lacks or may hold too old (its package list: the device tool's KINDS.md):
# these and everything they require (typing-extensions too, a newer one than PyTorch's floor, for pydantic), less
# what PyTorch needs (EXCLUDED and their requirements).
ROOTS="transformers deepspeed hydra-core omegaconf typing-extensions"
EXCLUDED="torch numpy pip setuptools"
SOURCE_ONLY=(deepspeed antlr4-python3-runtime)
if [ ! -f "$HH" ]; then echo "scripts/bench/gpu_prepare.sh: no HH-RLHF file at $HH: pass HH=path/to/test.jsonl.gz" >&2; exit 2; fi
PINNED_TEXT=$("$PY" scripts/bench/gpu_wheels.py "$PYVER" "$ROOTS" "$EXCLUDED")
mapfile -t PINNED <<< "$PINNED_TEXT"
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/source
binary=(); source=()
for p in "${PINNED[@]}"; do if [[ " ${SOURCE_ONLY[*]} " == *" ${p%%==*} "* ]]; then source+=("$p"); else binary+=("$p"); fi; done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels "${binary[@]}"
"$PY" -m pip download -q --no-deps --no-binary=:all: -d .gpu/source "${source[@]}"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .gpu/wheels .gpu/source/*
rm -rf .gpu/source
cp "$HH" .gpu/hh.jsonl.gz
ls .gpu/wheels
du -sh .gpu
