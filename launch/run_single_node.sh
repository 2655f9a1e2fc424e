#!/usr/bin/env bash
# The training job on this machine: one process per GPU, or 2 CPU processes without GPUs.
#
#   launch/run_single_node.sh [train.py flags...]
#
# Environment (all optional):
#   NPROC_PER_NODE  processes to start (default: the number of GPUs, or 2 without any)
#   MAX_RESTARTS    times torchrun restarts the job after a rank fails (default 0); pair it
#                   with --checkpoint-dir/--checkpoint-every so a restart resumes
#   PYTHON          the interpreter that runs torchrun and the job (default: python)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("${PYTHON}" -c "import torch; print(torch.cuda.device_count() or 2)")
fi

exec "${PYTHON}" -m torch.distributed.run \
  --standalone \
  --nproc-per-node "${NPROC_PER_NODE}" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  "${here}/train.py" "$@"
