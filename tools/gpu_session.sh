#!/usr/bin/env bash
# The one device-machine call of a session that draws a GPU (15 minutes of device time in all, one
# start, 10 minutes per command): everything the GPU should show, most important first, each step
# only while time is left before DEADLINE_S, and every result copied under $OUT as soon as it exists
# (a command killed at its limit still returns what is there).
#
#   1. msg-bench growth --size gpu (issue 19): full, full_rewinds and msg (--growth-budget 2), report;
#      then msg_auto added with --keep-runs (the three kept), report again.  A phase cut short by the
#      deadline is reported over the runs it finished.  If a run fails (not a timeout) while the fused
#      kernels are on, the phase is retried with MSG_KERNEL_BACKEND=reference and the log says so.
#   2. the Triton kernel tests that need no CUDA-extension build (tests/test_kernels_gpu.py subset);
#   3. msg-bench train --size 768 (the trainer's step against a plain loop, issue 17).
#
# Usage (GPU machine, repo root):  tools/gpu_session.sh
#   CORPUS=.gpu_data/python-docs.jsonl (default; copy ../shared/data/python-docs.jsonl there and carry it)
#   SIZE=tiny CORPUS= DEADLINE_S=200 OUT=/tmp/try tools/gpu_session.sh   tries it on a CPU
# Back under $OUT (at most 8 files): session.log, growth.{json,md,png,log}, kernels.log, extra.tgz
# (every run's metrics.jsonl and the train-bench report).
set -u
OUT=${OUT:-runs/gpu}
W=${WORK:-/tmp/gpu_session}
rm -rf "$W"; mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
size=${SIZE:-gpu}
corpus=${CORPUS-.gpu_data/python-docs.jsonl}
deadline=$(( $(date +%s) + ${DEADLINE_S:-530} ))
t0=$(date +%s)
left() { echo $(( deadline - $(date +%s) )); }
say() { echo "[+$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/session.log"; }

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1 || true
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1; } | tee -a "$OUT/session.log"

G="$W/growth"
grow() {  # grow RUNS SECONDS: one msg-bench growth call into $G, keeping what is there
  timeout -k 20 "$2" python3 -m megatron_msg.cli.bench growth --size "$size" ${corpus:+--corpus "$corpus"} \
    --growth-budget 2 --keep-runs --runs "$1" --out "$G" >> "$G.log" 2>&1
}
finished() {  # the runs the benchmark trained to the end (or kept), comma-separated
  python - "$G/finished_runs.json" <<'PY' 2>/dev/null
import json, sys
print(",".join(json.load(open(sys.argv[1]))))
PY
}
keep_report() { for f in growth.json growth.md growth.png; do [ -f "$G/$f" ] && cp "$G/$f" "$OUT/$f"; done; cp "$G.log" "$OUT/growth.log"; }
phase() {  # phase RUNS RESERVE: train RUNS, leaving RESERVE seconds for what comes after
  local budget=$(( $(left) - $2 ))
  if [ "$budget" -lt 60 ]; then say "skip growth --runs $1: ${budget}s left"; return 1; fi
  say "growth --runs $1 (limit ${budget}s, kernels ${MSG_KERNEL_BACKEND:-auto})"
  grow "$1" "$budget"; local rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && [ -z "${MSG_KERNEL_BACKEND:-}" ]; then
    say "growth failed (exit $rc) with the fused kernels: $(grep -m1 -E 'Error|error' "$G.log" | cut -c1-300)"
    export MSG_KERNEL_BACKEND=reference
    say "retrying with MSG_KERNEL_BACKEND=reference (wall times of runs before and after differ in kernels)"
    budget=$(( $(left) - $2 )); grow "$1" "$budget"; rc=$?
  fi
  if [ $rc -ne 0 ]; then
    local done_runs; done_runs=$(finished)
    say "growth exit $rc; finished: ${done_runs:-none}"
    if [ -n "$done_runs" ] && [ "$(left)" -gt 25 ]; then grow "$done_runs" $(( $(left) - 5 )); rc=$?; fi
  fi
  keep_report
  if [ -f "$G/growth.md" ]; then say "growth --runs $1: exit $rc, report written"; else say "growth --runs $1: exit $rc, no report"; fi
  return $rc
}

phase full,full_rewinds,msg 120
phase full,full_rewinds,msg,msg_auto 100
tail -30 "$G/growth.md" 2>/dev/null

# 2. Triton kernels (no CUDA-extension build: that alone takes minutes)
if [ "$size" = gpu ] && [ "$(left)" -gt 50 ]; then
  say "kernel tests (limit $(( $(left) - 40 ))s)"
  timeout -k 10 $(( $(left) - 40 )) python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py \
    -k "auto_dispatch or add_layer_norm or model_ramp or triton_launch or (masked_ln_matches and triton)" \
    > "$OUT/kernels.log" 2>&1
  say "kernel tests exit $?: $(tail -1 "$OUT/kernels.log")"
fi

# 3. the trainer's step against a plain loop at GPT-2-small's shape
tsize=768; [ "$size" = gpu ] || tsize=tiny
if [ "$(left)" -gt 45 ]; then
  say "msg-bench train --size $tsize (limit $(( $(left) - 15 ))s)"
  timeout -k 10 $(( $(left) - 15 )) python3 -m megatron_msg.cli.bench train --size $tsize --steps 5 --windows 3 \
    --out "$W/train" > "$W/train.log" 2>&1
  say "train bench exit $?"; tail -12 "$W/train.log" | tee -a "$OUT/session.log"
fi

# Everything small into one archive (checkpoints stay behind: they are large and not needed)
(cd "$W" && tar czf "$OUT/extra.tgz" --exclude=checkpoints --exclude='*.bin' --exclude='*.idx' \
   --exclude=data growth.log growth train train.log 2>/dev/null)
say "done; $(ls "$OUT" | paste -sd' ' -)"
