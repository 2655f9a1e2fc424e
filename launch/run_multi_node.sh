#!/usr/bin/env bash
# The training job across several machines: run this on every node, with the same
# environment except NODE_RANK. Nodes meet through torchrun's c10d rendezvous at
# RDZV_ENDPOINT, which the node at that address hosts.
#
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29400 launch/run_multi_node.sh [train.py flags...]
#   NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=node0:29400 launch/run_multi_node.sh [train.py flags...]
#
# Environment:
#   NNODES          number of nodes (required); "MIN:MAX" for an elastic range
#   NODE_RANK       this node's rank, 0..NNODES-1 (required; with c10d the global ranks are
#                   assigned by the rendezvous, NODE_RANK names the node in the logs)
#   RDZV_ENDPOINT   host:port of the rendezvous (required), or MASTER_ADDR[:MASTER_PORT]
#   RDZV_ID         a job id shared by all nodes (default: distavg)
#   NPROC_PER_NODE  processes per node (default: the number of GPUs, or 2 without any)
#   MAX_RESTARTS    restarts of the whole job after a failure (default 0); pair it with
#                   --checkpoint-dir/--checkpoint-every (a path every node can reach)
#   PYTHON          the interpreter that runs torchrun and the job (default: python)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"

: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to the rank of this node, 0..NNODES-1}"
if [[ -z "${RDZV_ENDPOINT:-}" && -n "${MASTER_ADDR:-}" ]]; then
  RDZV_ENDPOINT="${MASTER_ADDR}:${MASTER_PORT:-29400}"
fi
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT to host:port of the rendezvous (or MASTER_ADDR)}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("${PYTHON}" -c "import torch; print(torch.cuda.device_count() or 2)")
fi

exec "${PYTHON}" -m torch.distributed.run \
  --nnodes "${NNODES}" \
  --node-rank "${NODE_RANK}" \
  --nproc-per-node "${NPROC_PER_NODE}" \
  --rdzv-backend c10d \
  --rdzv-endpoint "${RDZV_ENDPOINT}" \
  --rdzv-id "${RDZV_ID:-distavg}" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  "${here}/train.py" "$@"
