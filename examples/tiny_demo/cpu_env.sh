# The tiny demo's defaults, shared by its launch scripts: 4 local processes on CPU (gloo), one
# thread each.  Sourced, never run.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONFIG="${CONFIG:-$HERE/tiny_demo.yaml}"
export GPUS_PER_NODE="${GPUS_PER_NODE:-4}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
