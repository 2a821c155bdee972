#!/usr/bin/env bash
# One device-machine call for issue 19: msg-bench growth at the gpu size (GPT-2-small's target,
# 1,200 steps of 32 x 512 tokens, bf16) for the full-size reference, fixed sch1 with MSG and
# at_step auto, under one timeout that leaves a 10-minute command time to copy the results back.
# Usage (on the GPU machine, repo root):  tools/gpu_growth.sh
#   SIZE=tiny tools/gpu_growth.sh    tries the script on a CPU (about a minute)
#   RUNS=full,full_rewinds,msg,nomask,msg_auto  more runs (each ~2-3 min on one H200: mind the limit)
# Writes growth.json / growth.md / growth.png and the logs under ${OUT:-runs/gpu}/growth.
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT/growth"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
size=${SIZE:-gpu}
if [ "$size" = gpu ]; then
  nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/growth/gpu.txt"
fi
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/growth/gpu.txt"
t0=$(date +%s)
timeout ${T_GROWTH:-520} python3 -m megatron_msg.cli.bench growth --size "$size" --runs "${RUNS:-full,msg,msg_auto}" \
  --out "$OUT/growth" > "$OUT/growth/growth.log" 2>&1
echo "msg-bench growth exit $? after $(( $(date +%s) - t0 ))s"
rm -rf "$OUT/growth/runs"/*/checkpoints  # the checkpoints are large and not needed for the report
tail -20 "$OUT/growth/growth.log"
