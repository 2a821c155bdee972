#!/usr/bin/env bash
# One node's part of a Slurm job: srun starts this once per node (--ntasks-per-node=1); it runs
# torchrun for the node's GPUs.  Node 0 of the allocation is the rendezvous host.  Called by each
# recipe's launch_slurm.sbatch; settings: examples/launch/common.sh.
set -euo pipefail
export NNODES="${SLURM_NNODES:?slurm_node.sh runs inside a Slurm job (srun)}"
export NODE_RANK="${SLURM_NODEID:?}"
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
exec "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" "$@"
