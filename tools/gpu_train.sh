#!/usr/bin/env bash
# One device-machine session for issue 17: msg-bench train at the three GPT shapes and the
# optimizer step on the GPU, each in its own process under its own timeout (all within ~9 min).
# Usage (on the GPU machine, repo root):  tools/gpu_train.sh [768] [1024] [2048] [optimizer] [pipeline]
# (pipeline: plain vs interleaved 1F1B measured on NCCL ranks, one GPU each; skipped with fewer
# than 2 GPUs, since NCCL refuses two ranks on one GPU)
# (default: 768 1024 2048 optimizer pipeline; "tiny" and OPT_DEVICE=cpu try the script on a CPU).  Writes logs, JSON and markdown under ${OUT:-runs/gpu}.
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
steps=${*:-768 1024 2048 optimizer pipeline}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
bench="python3 -m megatron_msg.cli.bench"
for s in $steps; do
  case $s in
    tiny|small|768|1024|2048) timeout ${T_TRAIN:-150} $bench train --size "$s" --steps ${STEPS:-5} --windows ${WINDOWS:-3} \
                     --out "$OUT" > "$OUT/train_$s.log" 2>&1; tail -12 "$OUT/train_$s.log" ;;
    optimizer) timeout ${T_OPT:-90} $bench optimizer --device ${OPT_DEVICE:-cuda} --hidden 1024 --layers 24 --vocab 50304 \
                 --out "$OUT" > "$OUT/optimizer.log" 2>&1; tail -10 "$OUT/optimizer.log" ;;
    pipeline) ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
              if [ "$ngpu" -ge 2 ]; then
                timeout ${T_PIPE:-120} $bench pipeline --device cuda --stages 2 --out "$OUT" > "$OUT/pipeline.log" 2>&1
                tail -14 "$OUT/pipeline.log"
              else echo "pipeline: $ngpu GPU(s), needs 2: skipped"; fi ;;
    *) echo "unknown step $s" ;;
  esac
  echo "== $s done at +$(( $(date +%s) - t0 ))s"
done
