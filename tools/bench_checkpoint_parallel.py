"""Parallel (sharded) checkpoint save and load against the rank-0 (gathered, per-tensor) path, same state.

Run under torchrun (gloo, CPU), e.g. four ranks as TP2 x DP2 with ZeRO-1:

    torchrun --nproc-per-node 4 tools/bench_checkpoint_parallel.py --tp 2 --dp 2 --zero 1 \\
        --hidden 1024 --layers 8 --out /tmp/ckbench

Every rank builds the same GPT (bundled corpus), trains one step so the AdamW moments exist,
then, with a barrier around each, saves in the sharded format and in the logical format (the
same state); ``--repeat N`` repeats the pair N times (new steps).  ``--phase load --format F``
(a separate torchrun) resumes the newest checkpoint of format F in fresh processes.  For every
operation it reports each rank's wall time and the growth of its peak resident memory (VmHWM,
reset before the operation: for a load that includes building the model and optimizer), and
rank 0 prints one JSON line.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from pathlib import Path


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def _reset_peak() -> float:
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS (Linux >= 4.0)
    return _status_mb("VmRSS")


def _raw(a: argparse.Namespace, fmt: str) -> dict:
    return {
        "model": {"arch": "gpt", "hidden": a.hidden, "ffn": 4 * a.hidden, "heads": a.hidden // 64,
                  "head_dim": 64, "layers": a.layers, "seq_len": 64},
        "lr": {"warmup_steps": 1},
        "train": {"steps": 1000, "batch_size": 2, "grad_accum": a.dp, "log_interval": 1, "eval_interval": 1000,
                  "eval_iters": 1, "save_interval": 1000, "device": "cpu", "tensorboard": False, "plot": False,
                  "checkpoint_format": fmt, "keep_checkpoints": 100},
        "parallel": {"tp": a.tp, "pp": a.pp, "dp": a.dp, "zero_stage": a.zero},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--out", default="/tmp/ckbench")
    p.add_argument("--phase", choices=["save", "load"], default="save",
                   help="save: build, train a step, save both formats; load: resume one (--format) in fresh processes")
    p.add_argument("--format", choices=["sharded", "logical"], default="sharded")
    a = p.parse_args()
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from megatron_msg.config import config_from_dict
    from megatron_msg.model.init import logical_num_parameters
    from megatron_msg.parallel.launch import LaunchEnv, init_parallel
    from megatron_msg.training.trainer import Trainer

    env = LaunchEnv.from_environ()
    out = {f: Path(a.out) / f for f in ("sharded", "logical")}
    cfg = {f: config_from_dict(_raw(a, f)) for f in out}
    ps = init_parallel(cfg["sharded"].parallel, "cpu", env)
    if not dist.is_initialized():  # one process: the trainer needs no group, the timing barriers do
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if a.phase == "save" and rank == 0:
        for d in out.values():
            shutil.rmtree(d, ignore_errors=True)
    dist.barrier()

    def timed(fn):
        gc.collect()
        dist.barrier()
        base = _reset_peak()
        t0 = time.perf_counter()
        result = fn()
        dist.barrier()  # the operation ends when the last rank is done
        wall = time.perf_counter() - t0
        row = [None] * world
        dist.all_gather_object(row, {"wall_s": wall, "extra_peak_mb": _status_mb("VmHWM") - base})
        return result, row

    if a.phase == "load":  # a fresh process: its peak is the resume's own (model, optimizer, reads)
        _, row = timed(lambda: Trainer(cfg[a.format], out_dir=out[a.format], progress=False, parallel=ps))
        if rank == 0:
            print(json.dumps({"world": world, "format": a.format, "load": row}), flush=True)
        dist.destroy_process_group()
        return
    trainer = Trainer(cfg["sharded"], out_dir=out["sharded"], progress=False, parallel=ps)
    trainer.train_step(0)  # the AdamW moments exist from here on
    report = {"world": world, "layout": {"tp": a.tp, "pp": a.pp, "dp": a.dp, "zero": a.zero},
              "hidden": a.hidden, "layers": a.layers, "saves": []}
    for i in range(a.repeat):
        trainer.step = i + 1
        pair = {}
        for fmt in ("sharded", "logical"):
            trainer.cfg, trainer.out_dir, trainer._saved_step = cfg[fmt], out[fmt], None
            _, pair[fmt] = timed(trainer.save)
        report["saves"].append(pair)
    if rank == 0:
        ckpt = out["sharded"] / "checkpoints" / f"step_{a.repeat:08d}"
        report["state_bytes"] = sum(f.stat().st_size for f in ckpt.rglob("*.distcp"))
        report["parameters"] = logical_num_parameters(cfg["sharded"].model)
        print(json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
