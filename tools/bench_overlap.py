"""Data-parallel step time with the gradient all-reduce overlapped with backward, and without.

    python tools/bench_overlap.py [--hidden 512] [--layers 4] [--dp 2] [--steps 5] [--windows 5]

Starts ``--dp`` gloo processes (torchrun, one torch thread each, DP only) and builds two
trainers of the same run in them, ``parallel.overlap_grad_reduce`` true and false, then times
their ``Trainer.advance`` in interleaved windows (median window, ms per step; the slowest
rank's).  One JSON line with both and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()


def _raw(a, overlap: bool) -> dict:
    return {"model": {"arch": "gpt", "hidden": a.hidden, "ffn": 4 * a.hidden, "heads": a.hidden // 64,
                      "head_dim": 64, "layers": a.layers, "seq_len": 64},
            "lr": {"warmup_steps": 1},
            "train": {"steps": 10 ** 6, "batch_size": 2, "grad_accum": a.dp, "log_interval": 10 ** 6,
                      "eval_interval": 10 ** 6, "save_interval": 10 ** 6, "device": "cpu", "tensorboard": False,
                      "plot": False},
            "parallel": {"dp": a.dp, "overlap_grad_reduce": overlap, "bucket_mb": a.bucket_mb}}


def _worker(a) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from megatron_msg.config import config_from_dict
    from megatron_msg.parallel.launch import LaunchEnv, init_parallel
    from megatron_msg.training.step_bench import interleaved_medians
    from megatron_msg.training.trainer import Trainer
    env = LaunchEnv.from_environ()
    ps = init_parallel(config_from_dict(_raw(a, True)).parallel, "cpu", env)
    tmp = Path(tempfile.mkdtemp(prefix=f"overlap-{env.rank}-"))
    variants = {}
    for overlap in (True, False):
        trainer = Trainer(config_from_dict(_raw(a, overlap)), out_dir=tmp / str(overlap), progress=False, parallel=ps)
        variants["overlapped" if overlap else "after backward"] = trainer.advance
    times = interleaved_medians(variants, a.steps, a.windows, torch.device("cpu"))
    medians = {k: statistics.median(v) for k, v in times.items()}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, medians)
    if dist.get_rank() == 0:
        worst = {k: max(r[k] for r in rows) for k in medians}
        params = sum(p.numel() for p in trainer.model.parameters())
        print(json.dumps({"dp": a.dp, "hidden": a.hidden, "layers": a.layers, "parameters": params,
                          "bucket_mb": a.bucket_mb, "step_ms": {k: round(v, 2) for k, v in worst.items()},
                          "overlapped_vs_after": round(worst["overlapped"] / worst["after backward"], 3)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.job:
        return _worker(a)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{HERE.parent.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.dp), str(HERE), "--job",
           "--hidden", str(a.hidden), "--layers", str(a.layers), "--dp", str(a.dp), "--bucket-mb", str(a.bucket_mb),
           "--steps", str(a.steps), "--windows", str(a.windows)]
    out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    print([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])


if __name__ == "__main__":
    main()
