#!/usr/bin/env bash
# One-shot GPU smoke test of the CUDA-only paths and of throughput and memory at scale (issues
# 16, 17); see gpu_suite.py for the checks and their targets.
#   bash benchmarks/gpu_suite.sh            # CUDA: writes benchmarks/results/gpu_suite-cuda.json
#   bash benchmarks/gpu_suite.sh --dry-run  # CPU/gloo, small sizes: gpu_suite-dry-run.json
# PYTHON picks the interpreter (default: python). Ends with a table of every check (measured,
# target, ok); exit status 1 if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
status=0
start=$SECONDS
"$PY" benchmarks/gpu_suite.py "$@" --part local || status=1
"$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
  benchmarks/gpu_suite.py "$@" --part nccl || status=1
"$PY" benchmarks/gpu_suite.py "$@" --part table --wall-seconds $((SECONDS - start)) || status=1
exit $status
