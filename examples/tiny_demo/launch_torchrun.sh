#!/usr/bin/env bash
# The tiny demo on 4 local processes under the torchrun launcher (CPU and gloo when there is no GPU).
# Settings: examples/launch/common.sh.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONFIG="${CONFIG:-$HERE/tiny_demo.yaml}"
export GPUS_PER_NODE="${GPUS_PER_NODE:-4}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec "$HERE/../launch/torchrun.sh" "$@"
