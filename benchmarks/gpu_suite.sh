#!/usr/bin/env bash
# One-shot GPU smoke test of the CUDA-only paths (issue 17); see gpu_suite.py for the checks.
#   bash benchmarks/gpu_suite.sh            # CUDA: writes benchmarks/results/gpu_suite-cuda.json
#   bash benchmarks/gpu_suite.sh --dry-run  # CPU/gloo, small sizes: gpu_suite-dry-run.json
# PYTHON picks the interpreter (default: python). Exit status 1 if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
status=0
"$PY" benchmarks/gpu_suite.py "$@" --part local || status=1
"$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
  benchmarks/gpu_suite.py "$@" --part nccl || status=1
exit $status
