"""msg-reshard + our load against DeepSpeed's ds_to_universal + universal load, on the same state.

    python tools/bench_reshard_vs_deepspeed.py --hidden 1024 --layers 8 --out /tmp/rsbench

Steps (CPU, gloo, 4 local processes where a job is parallel; DS_ACCELERATOR=cpu):

1. a DeepSpeed ZeRO-2 engine (DP4, torch AdamW) wrapping our GPT trains one step and saves
   (``engine.save_checkpoint`` with ``universal_checkpoint_info``): the state both paths start from;
2. setup, not timed: ``msg-deepspeed import`` of that state and ``msg-reshard --dp 4 --zero 2``,
   i.e. the same state as our own DP4 ZeRO-2 run would have saved it;
3. timed, DeepSpeed's path: ``python -m deepspeed.checkpoint.ds_to_universal`` (one extract and
   one merge worker), then a fresh 4-process DeepSpeed engine on DP4 ZeRO-1 loading the universal
   checkpoint (``load_universal``);
4. timed, ours: ``msg-reshard --tp 2 --dp 2 --zero 1``, then a fresh 4-process trainer on
   TP2 x DP2 ZeRO-1 resuming it.

Conversions: wall time and peak resident memory of the converting processes (children's
``ru_maxrss``, the largest process).  Loads: each rank's wall time and growth of its peak resident
memory over the operation (engine or trainer construction plus the load).  One JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _raw(a, **parallel) -> dict:
    return {
        "model": {"arch": "gpt", "hidden": a.hidden, "ffn": 4 * a.hidden, "heads": a.hidden // 64, "head_dim": 64,
                  "layers": a.layers, "seq_len": 64},
        "optimizer": {"grad_clip": 0.0},
        "lr": {"warmup_steps": 1},
        "train": {"steps": 1000, "batch_size": 1, "grad_accum": 4, "log_interval": 1, "eval_interval": 1000,
                  "eval_iters": 1, "save_interval": 1000, "device": "cpu", "tensorboard": False, "plot": False},
        "parallel": parallel,
    }


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _timed_child(cmd: list[str], env: dict) -> dict:
    """Wall time and the largest resident set among the processes of ``cmd`` (run in a fresh child)."""
    # ru_maxrss of RUSAGE_CHILDREN is the maximum over all waited-for descendants so far: measure
    # through an intermediate python so earlier children do not count.
    probe = ("import resource,subprocess,sys,time,json;t=time.perf_counter();"
             "subprocess.run(sys.argv[1:],check=True,stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL);"
             "print(json.dumps({'wall_s':time.perf_counter()-t,"
             "'peak_mb':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024}))")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, env=env, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _worker(a) -> None:
    """The 4-process jobs (under torchrun): --job ds-save | ds-load | our-load."""
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from megatron_msg.config import config_from_dict
    from megatron_msg.parallel.launch import LaunchEnv, init_parallel
    env = LaunchEnv.from_environ()
    if a.job == "our-load":
        from megatron_msg.training.trainer import Trainer
        cfg = config_from_dict(_raw(a, tp=2, dp=2, zero_stage=1))
        ps = init_parallel(cfg.parallel, "cpu", env)
        dist.barrier()
        base, t0 = _reset(), time.perf_counter()
        Trainer(cfg, out_dir=a.out / "ours_target", progress=False, parallel=ps)
        _report(dist, t0, base)
        return
    dist.init_process_group("gloo")
    os.environ["DS_ACCELERATOR"] = "cpu"
    from tests.deepspeed_driver import ds_train
    zero = 2 if a.job == "ds-save" else 1
    raw = _raw(a, dp=4, zero_stage=zero)
    rank, world = dist.get_rank(), dist.get_world_size()
    if a.job == "ds-save":
        ds_train(rank, world, raw, 0, 1, save_dir=str(a.out / "ds"))
    else:
        dist.barrier()
        base, t0 = _reset(), time.perf_counter()
        ds_train(rank, world, raw, 1, 1, load_dir=str(a.out / "universal"))  # build, load, no step
        _report(dist, t0, base)


def _reset() -> float:
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _report(dist, t0: float, base: float) -> None:
    dist.barrier()
    row = [None] * dist.get_world_size()
    dist.all_gather_object(row, {"wall_s": time.perf_counter() - t0, "extra_peak_mb": _status_mb("VmHWM") - base})
    if dist.get_rank() == 0:
        print(json.dumps(row), flush=True)


def _torchrun(a, job: str, env: dict) -> list:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", str(HERE), "--job", job,
           "--hidden", str(a.hidden), "--layers", str(a.layers), "--out", str(a.out)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:  # say why (a start-up failure of one run was once lost here)
        raise SystemExit(f"{job} exited with {out.returncode}:\n{out.stderr[-3000:]}")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("[")]
    return json.loads(lines[-1]) if lines else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("/tmp/rsbench"))
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    p.add_argument("--skip-save", action="store_true", help="reuse the DeepSpeed save of a previous run")
    a = p.parse_args()
    if a.job:
        sys.path.insert(0, str(HERE.parent.parent))
        return _worker(a)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{HERE.parent.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    tag = "global_step1"
    if not a.skip_save:
        shutil.rmtree(a.out, ignore_errors=True)
        a.out.mkdir(parents=True)
        _torchrun(a, "ds-save", env)
        (a.out / "run.yaml").write_text(json.dumps(_raw(a, dp=4, zero_stage=2)))
    for d in ("universal", "imported", "ours_source", "ours_target"):
        shutil.rmtree(a.out / d, ignore_errors=True)
    report = {"hidden": a.hidden, "layers": a.layers}
    report["ds_to_universal"] = _timed_child(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(a.out / "ds" / tag),
         "--output_folder", str(a.out / "universal" / tag), "--num_extract_workers", "1", "--num_merge_workers", "1"],
        env)
    # The same state as our DP4 ZeRO-2 run would have saved it (setup, not timed).
    subprocess.run([sys.executable, "-m", "megatron_msg.cli.deepspeed", "import", str(a.out / "universal"),
                    str(a.out / "run.yaml"), "--out-dir", str(a.out / "imported")], check=True, env=env,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "megatron_msg.cli.reshard", str(a.out / "imported"), "--out-dir",
                    str(a.out / "ours_source"), "--dp", "4", "--zero", "2", "--no-progress"], check=True, env=env,
                   capture_output=True)
    report["msg_reshard"] = _timed_child(
        [sys.executable, "-m", "megatron_msg.cli.reshard", str(a.out / "ours_source"), "--out-dir",
         str(a.out / "ours_target"), "--tp", "2", "--dp", "2", "--zero", "1", "--no-progress"], env)
    report["ds_universal_load"] = _torchrun(a, "ds-load", env)
    report["our_load"] = _torchrun(a, "our-load", env)
    report["bytes"] = {"deepspeed_save": _du(a.out / "ds" / tag), "universal": _du(a.out / "universal" / tag),
                       "ours": _du(a.out / "ours_target" / "checkpoints")}
    print(json.dumps(report), flush=True)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


if __name__ == "__main__":
    main()
