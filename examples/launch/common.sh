# Shared by the launch scripts: read the job's settings from the environment, build msg-train's
# arguments.  Sourced, never run.  Settings (environment variables):
#
#   CONFIG          the run's YAML config (each recipe's launch script sets its default)
#   NNODES          nodes in the job (default 1)
#   GPUS_PER_NODE   processes per node (default 8)
#   NODE_RANK       this node's index, 0..NNODES-1 (torchrun / deepspeed --no_ssh; default 0)
#   MASTER_ADDR     host of rank 0 (default: this host when NNODES=1)
#   MASTER_PORT     its rendezvous port (default 29500)
#   HOSTFILE        deepspeed hostfile ("host slots=8" lines); default: none (one node)
#   DATA_PATHS      the indexed corpora: one prefix, or "0.7 data/web_text_document 0.3 data/books..."
#                   (weights and prefixes, Megatron's blend); default: the config's data.paths
#   TOKENIZER       the tokenizer file (tokenizer.json, or GPT-2's vocab.json); default: the config's
#   MERGES          GPT-2's merges.txt (data.tokenizer: gpt2); default: the config's
#   OUT_DIR         the run directory (checkpoints, metrics.jsonl); default: the config's train.out_dir
#
# Further arguments to a launch script go to msg-train unchanged (--set KEY=VALUE, --max-steps N).

set -euo pipefail
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$LAUNCH_DIR/env.sh"

NNODES="${NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [ -z "${MASTER_ADDR:-}" ]; then
    if [ "$NNODES" -gt 1 ]; then
        echo "launch: NNODES=$NNODES needs MASTER_ADDR (the host of node 0)" >&2
        exit 2
    fi
    MASTER_ADDR=127.0.0.1
fi
: "${CONFIG:?launch: set CONFIG to the YAML config of the run}"
if [ ! -f "$CONFIG" ]; then
    echo "launch: CONFIG=$CONFIG does not exist" >&2
    exit 2
fi

# msg-train's arguments: the config, then --set overrides from the environment, then "$@".
MSG_TRAIN_ARGS=("$CONFIG" --no-progress)
if [ -n "${DATA_PATHS:-}" ]; then
    read -r -a _parts <<< "$DATA_PATHS"
    _list=$(IFS=,; echo "${_parts[*]}")
    MSG_TRAIN_ARGS+=(--set "data.paths=[${_list}]")
fi
if [ -n "${TOKENIZER:-}" ]; then MSG_TRAIN_ARGS+=(--set "data.tokenizer_model=$TOKENIZER"); fi
if [ -n "${MERGES:-}" ]; then MSG_TRAIN_ARGS+=(--set "data.merges_file=$MERGES"); fi
if [ -n "${OUT_DIR:-}" ]; then MSG_TRAIN_ARGS+=(--out-dir "$OUT_DIR"); fi
MSG_TRAIN_ARGS+=("$@")
