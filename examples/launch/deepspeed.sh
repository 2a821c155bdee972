#!/usr/bin/env bash
# msg-train under the deepspeed launcher (the path Megatron-DeepSpeed users know).
#
#   One node:            GPUS_PER_NODE=8 CONFIG=run.yaml examples/launch/deepspeed.sh
#   Nodes over ssh/pdsh: HOSTFILE=hostfile MASTER_ADDR=node0 CONFIG=run.yaml examples/launch/deepspeed.sh
#   Nodes without ssh:   on every node, HOSTFILE=hostfile NODE_RANK=<i> MASTER_ADDR=node0 MSG_NO_SSH=1 ...
#
# The hostfile lists every node and its GPUs ("node0 slots=8").  deepspeed exports RANK, WORLD_SIZE,
# LOCAL_RANK, MASTER_ADDR and MASTER_PORT to each process; msg-train reads them
# (megatron_msg/parallel/launch.py).  Settings: examples/launch/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DS_ARGS=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [ -n "${HOSTFILE:-}" ]; then
    DS_ARGS+=(--hostfile "$HOSTFILE")
    if [ -n "${MSG_NO_SSH:-}" ]; then
        DS_ARGS+=(--no_ssh --node_rank "$NODE_RANK")
    fi
else
    DS_ARGS+=(--num_gpus "$GPUS_PER_NODE")
fi
exec deepspeed "${DS_ARGS[@]}" --module megatron_msg.cli.train "${MSG_TRAIN_ARGS[@]}"
