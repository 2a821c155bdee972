#!/usr/bin/env bash
# The tiny demo on 4 local processes under the torchrun launcher (CPU and gloo when there is no GPU).
# Settings: cpu_env.sh, examples/launch/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/cpu_env.sh"
exec "$HERE/../launch/torchrun.sh" "$@"
