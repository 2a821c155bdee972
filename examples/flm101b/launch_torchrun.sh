#!/usr/bin/env bash
# FLM-101B under the torchrun launcher: 24 nodes x 8 GPUs (NNODES=24, GPUS_PER_NODE=8).  Settings:
# examples/launch/common.sh (NNODES, GPUS_PER_NODE, NODE_RANK, MASTER_ADDR, HOSTFILE, DATA_PATHS,
# TOKENIZER, OUT_DIR); further arguments go to msg-train (e.g. --max-steps for the offline path).
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONFIG="${CONFIG:-$HERE/flm101b.yaml}"
exec "$HERE/../launch/torchrun.sh" "$@"
