#!/usr/bin/env bash
# msg-train under torchrun, one call per node (all nodes the same command but NODE_RANK).
#
#   One node:  GPUS_PER_NODE=8 CONFIG=run.yaml examples/launch/torchrun.sh
#   Node i:    NNODES=24 NODE_RANK=i MASTER_ADDR=node0 GPUS_PER_NODE=8 CONFIG=run.yaml examples/launch/torchrun.sh
#
# The static rendezvous (--node-rank, --master-addr) fixes every rank's number, which the
# TP x PP x DP layout relies on (ranks are laid out TP fastest, parallel/topology.py).
# Settings: examples/launch/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

exec python -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megatron_msg.cli.train "${MSG_TRAIN_ARGS[@]}"
