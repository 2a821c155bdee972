#!/usr/bin/env bash
# One device-machine session for the kernels: build the CUDA extension, then the
# steps asked for, each under its own timeout.  Usage (on the GPU machine, repo root):
#   tools/gpu_kernels.sh [quick|tests|sweep|sweep-cuda|bench|overhead|overhead-compiled]...
#   (default: tests bench overhead)
#   quick: only the launch-variant and model tests of tests/test_kernels_gpu.py
#   sweep-cuda: only the CUDA forward candidates (msg-bench kernel-sweep --cuda-only), wide widths
# Writes logs, JSON and markdown under ${OUT:-runs/gpu}.
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MSG_KERNEL_BUILD_DIR=${MSG_KERNEL_BUILD_DIR:-/tmp/msg_ext}
steps=${*:-tests bench overhead}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
python3 -c "
import time; t=time.time()
from megatron_msg.kernels import cuda_ext
try:
    cuda_ext.load(verbose=False); print('cuda ext built in %.1fs' % (time.time()-t))
except Exception as e:
    print('CUDA EXTENSION BUILD FAILED:', str(e)[-3000:])
" 2>&1 | tee "$OUT/build.log"
bench="python3 -m megatron_msg.cli.bench"
for s in $steps; do
  case $s in
    quick) timeout ${T_QUICK:-120} python3 -m pytest -q -x tests/test_kernels_gpu.py -k "variants or model_ramp" 2>&1 | tail -15 | tee "$OUT/quick.log" ;;
    # The whole log comes back (a crash's own frames are at the top of faulthandler's dump).
    tests) timeout ${T_TESTS:-240} python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py tests/test_gpu_training.py > "$OUT/tests.log" 2>&1
           grep -A12 "Fatal Python error" "$OUT/tests.log" | head -40; tail -25 "$OUT/tests.log" ;;
    sweep) timeout ${T_SWEEP:-300} $bench kernel-sweep --widths "${SWEEP_WIDTHS:-768,1024,4096,10240}" --out "$OUT" 2>&1 | tee "$OUT/sweep.log" ;;
    sweep-cuda) timeout ${T_SWEEP:-300} $bench kernel-sweep --cuda-only --widths "${SWEEP_WIDTHS:-4096,8192,10240,16384}" --out "$OUT" 2>&1 | tee "$OUT/sweep_cuda.log" ;;
    bench) timeout ${T_BENCH:-300} $bench kernels --out "$OUT" 2>&1 | tee "$OUT/bench.log" ;;
    overhead) timeout ${T_OVER:-300} $bench mask-overhead --out "$OUT" 2>&1 | tee "$OUT/overhead.log" ;;
    overhead-compiled) timeout ${T_OVERC:-300} $bench mask-overhead --compile --windows 3 --out "$OUT" 2>&1 | tee "$OUT/overhead_compiled.log" ;;
    *) echo "unknown step $s" ;;
  esac
  echo "== $s done at +$(( $(date +%s) - t0 ))s"
done
