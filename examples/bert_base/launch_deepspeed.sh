#!/usr/bin/env bash
# Sch1-B under the deepspeed launcher (CONFIG=... for another schedule of this folder).  Settings:
# examples/launch/common.sh (NNODES, GPUS_PER_NODE, MASTER_ADDR, HOSTFILE, DATA_PATHS, TOKENIZER, OUT_DIR).
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONFIG="${CONFIG:-$HERE/sch1_b.yaml}"
exec "$HERE/../launch/deepspeed.sh" "$@"
