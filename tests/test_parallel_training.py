"""Live multi-stage growth under TP x PP (x DP) through the trainer, against one process.

The single-process reference uses ``parallel.growth_layout_parts = 2``: the
TP run appends each rank's new ffn/head units inside its own block, and the
reference places them identically, so both runs train the same logical model.
They differ only in fp32 summation order (TP splits matmul reductions and adds
all-reduces; PP and DP do not change any arithmetic): about 1e-7 relative at
first.  Training amplifies it (Adam divides by sqrt(v), so entries with tiny v
turn rounding noise into visible update differences), and the measured gap
grows smoothly to ~2e-4 after 200 steps and four growth events (GPT, 2026-11-22).
So the tolerance is 1e-6 over the first, growth-free 30 steps and 1e-3 over the
whole run; a real bug (a wrong shard, a missed gradient sync, a growth placed
differently) moves the loss by 1e-2 or more within a few steps.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_msg.checkpoint.io import latest_checkpoint, open_checkpoint
from megatron_msg.config import ConfigError, Shape, config_from_dict
from megatron_msg.parallel.launch import LaunchEnv, init_parallel
from megatron_msg.parallel.topology import TopologyError
from megatron_msg.training.trainer import Trainer
from tests.dist_harness import run_distributed

STEPS = 200


def _raw(arch: str, **parallel) -> dict:
    return {
        "model": {"arch": arch, "hidden": 16, "ffn": 32, "heads": 2, "layers": 2, "head_dim": 8, "seq_len": 16},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
        "lr": {"warmup_steps": 10, "decay_steps": STEPS},  # independent of train.steps (resume test)
        "train": {"steps": STEPS, "batch_size": 2, "grad_accum": 2, "log_interval": 1, "eval_interval": 50,
                  "eval_iters": 2, "save_interval": 50, "device": "cpu", "tensorboard": False, "plot": False},
        "growth": {"defaults": {"phi": 12}, "stages": [
            {"at_step": 30, "ffn": 48, "rewind_lr": True},
            {"at_step": 60, "layers": 4, "depth_init": "copy"},
            {"at_step": 90, "hidden": 24},
            {"at_step": 120, "heads": 4, "init": "copy"},
            {"at_step": 150, "layers": 6, "ffn": 64, "depth_placement": "interleave"},
        ]},
        "parallel": parallel,
    }


def _train(rank, world, raw, out_dir, max_steps):
    cfg = config_from_dict(raw)
    ps = init_parallel(cfg.parallel, "cpu", LaunchEnv(rank, world, rank))
    res = Trainer(cfg, out_dir=out_dir, progress=False, parallel=ps).run(max_steps=max_steps)
    return {"losses": res.losses, "valid": res.valid_losses, "shape": res.shape, "final_step": res.final_step}


def _records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


@pytest.fixture(scope="module", params=["gpt", "bert"])
def runs(request, tmp_path_factory):
    """(arch, single-process result, TP2xPP2 result, their run directories)."""
    arch = request.param
    single_dir, par_dir = tmp_path_factory.mktemp(f"single_{arch}"), tmp_path_factory.mktemp(f"tp2pp2_{arch}")
    single = Trainer(config_from_dict(_raw(arch, growth_layout_parts=2)), out_dir=single_dir, progress=False).run()
    par = run_distributed(_train, 4, args=(_raw(arch, tp=2, pp=2), par_dir, None))
    return arch, single, par, single_dir, par_dir


def test_growth_under_tp2_pp2_preserves_the_function(runs):
    arch, single, par, _, par_dir = runs
    assert all(r["final_step"] == STEPS and r["shape"] == Shape(24, 64, 4, 6) for r in par)
    growth = [r for r in _records(par_dir) if r["kind"] == "growth"]
    assert [g["step"] for g in growth] == [30, 60, 90, 120, 150]
    for g in growth:  # loss right after every growth equals the loss right before, while sharded
        assert abs(g["loss_after"] - g["loss_before"]) <= 1e-5 * abs(g["loss_before"]), g


def test_tp2_pp2_follows_the_single_process_loss_curve(runs):
    arch, single, par, _, _ = runs
    for r in par:  # every rank reports the same (replica-summed) losses
        assert r["losses"] == par[0]["losses"]
    early = {s: v for s, v in single.losses.items() if s < 30}
    diff = _max_rel_diff({s: par[0]["losses"][s] for s in early}, early)
    assert diff < 1e-6, f"{arch}: max relative loss difference {diff:.2e} before the first growth"
    diff = _max_rel_diff(par[0]["losses"], single.losses)
    assert diff < 1e-3, f"{arch}: max relative loss difference {diff:.2e} over {STEPS} steps"
    assert _max_rel_diff(par[0]["valid"], single.valid_losses) < 1e-3


def _quick_growth_raw(arch: str, **parallel) -> dict:
    """Growth of every dimension on consecutive steps, so the states are compared right after it."""
    raw = _raw(arch, **parallel)
    raw["train"].update(steps=10, save_interval=10, eval_interval=10)
    raw["lr"] = {"warmup_steps": 2}
    # A negligible LR: parameters change by growth only, so they must match (almost) exactly;
    # with a real LR, Adam turns rounding noise in zero-gradient entries (the K bias) into
    # lr-sized differences within a few steps, which says nothing about growth.
    raw["optimizer"] = {"lr": 1e-10, "min_lr": 1e-11}
    raw["growth"] = {"defaults": {"phi": 1}, "stages": [
        {"at_step": 2, "ffn": 48}, {"at_step": 4, "layers": 4, "depth_init": "copy"},
        {"at_step": 6, "hidden": 24}, {"at_step": 8, "heads": 4, "layers": 6, "depth_placement": "interleave"}]}
    return raw


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_gathered_tp2_pp2_state_equals_the_single_process_state(arch, tmp_path):
    # Four growth events in ten steps, live and sharded; then the gathered parameters, masks and
    # Adam moments must equal the single-process run's.
    run_distributed(_train, 4, args=(_quick_growth_raw(arch, tp=2, pp=2), tmp_path / "par", None))
    Trainer(config_from_dict(_quick_growth_raw(arch, growth_layout_parts=2)), out_dir=tmp_path / "one",
            progress=False).run()
    a = open_checkpoint(latest_checkpoint(tmp_path / "par"))
    b = open_checkpoint(latest_checkpoint(tmp_path / "one"))
    assert a.state["model_config"] == b.state["model_config"] and list(a.model) == list(b.model)
    for name, t in b.model.items():
        torch.testing.assert_close(a.model[name], t, rtol=1e-6, atol=1e-8, msg=lambda m: f"{name}: {m}")
    assert list(a.optimizer) == list(b.optimizer)
    for name, st in b.optimizer.items():
        assert a.optimizer[name]["step"] == st["step"], name
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a.optimizer[name][key], st[key], rtol=1e-3, atol=1e-8,
                                       msg=lambda m: f"{name}.{key}: {m}")


def test_resume_under_tp2_pp2_and_on_another_layout(runs, tmp_path):
    arch, _, par, _, _ = runs
    raw = _raw(arch, tp=2, pp=2)
    raw["train"]["steps"] = 132  # enough to cover a kill mid-ramp (step 123 of the ramp 120..132)
    raw["growth"]["stages"] = raw["growth"]["stages"][:4]
    ref = {s: v for s, v in par[0]["losses"].items() if s < 132}
    run_dir, other_dir = tmp_path / "tp2pp2", tmp_path / "tp2dp2"
    first = run_distributed(_train, 4, args=(raw, run_dir, 123))
    assert first[0]["final_step"] == 123
    shutil.copytree(run_dir, other_dir)  # the step-123 checkpoint, for the other layout below
    resumed = run_distributed(_train, 4, args=(raw, run_dir, None))
    for step in range(123, 132):  # same layout: bit-identical to the uninterrupted run
        assert resumed[0]["losses"][step] == ref[step], step
    # The checkpoint is the logical state, so another layout (here TP2 x DP2) continues it.
    other = json.loads(json.dumps(raw))
    other["parallel"] = {"tp": 2, "dp": 2, "growth_layout_parts": 2}
    cont = run_distributed(_train, 4, args=(other, other_dir, None))
    assert _max_rel_diff({s: cont[0]["losses"][s] for s in range(123, 132)},
                         {s: ref[s] for s in range(123, 132)}) < 1e-5


# --------------------------------------------------------------------------- topology errors

def _edit(raw: dict, path: str, value) -> dict:
    from megatron_msg.config import apply_override
    apply_override(raw, f"{path}={json.dumps(value)}")
    return raw


@pytest.mark.parametrize("edits,message", [
    # heads not divisible by tp after growth (stage 3 grows heads 2 -> 5)
    ({"parallel.tp": 2, "growth.stages[3].heads": 5, "parallel.growth_layout_parts": 1},
     "growth.stages[3].heads: 5 is not divisible by parallel.tp=2"),
    # ffn not divisible by tp at the start
    ({"parallel.tp": 2, "model.ffn": 33, "growth.stages[0].ffn": 48},
     "model.ffn: 33 is not divisible by parallel.tp=2"),
    # layers not divisible by pp after growth (stage 1 grows 2 -> 3 layers)
    ({"parallel.pp": 2, "growth.stages[1].layers": 3}, "growth.stages[1].layers: 3 is not divisible by parallel.pp=2"),
    ({"parallel.pp": 4}, "model.layers: 2 is not divisible by parallel.pp=4"),
    ({"parallel.dp": 4}, "train.grad_accum: 2 is not divisible by parallel.dp=4"),
    ({"parallel.tp": 0}, "parallel.tp: must be >= 1"),
])
def test_wrong_topology_is_a_config_error(edits, message):
    raw = _raw("gpt")
    for path, value in edits.items():
        _edit(raw, path, value)
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert str(err.value).startswith(message), str(err.value)


def test_world_size_must_match_the_layout():
    cfg = config_from_dict(_raw("gpt", tp=2, pp=2))
    with pytest.raises(TopologyError, match="started 3 process\\(es\\) but parallel.tp \\* pp \\* dp = 2 \\* 2 \\* 1 = 4"):
        init_parallel(cfg.parallel, "cpu", LaunchEnv(rank=0, world_size=3, local_rank=0))


def test_torchrun_nproc_4_runs_msg_train(tmp_path):
    raw = _raw("gpt", tp=2, pp=2)
    raw["train"].update(steps=40, eval_interval=20, save_interval=20)
    raw["growth"]["stages"] = raw["growth"]["stages"][:1]
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", str(_free_port()),
           "-m", "megatron_msg.cli.train", str(cfg_path), "--out-dir", str(tmp_path / "run"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: step 40/40" in proc.stdout and proc.stdout.count("done:") == 1  # only rank 0 reports
    growth = [r for r in _records(tmp_path / "run") if r["kind"] == "growth"]
    assert len(growth) == 1 and abs(growth[0]["loss_after"] - growth[0]["loss_before"]) < 1e-5


def test_torchrun_with_the_wrong_process_count_fails_before_training(tmp_path):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(_raw("gpt", tp=2, pp=2)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "megatron_msg.cli.train", str(cfg_path), "--out-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode != 0
    assert "started 2 process(es) but parallel.tp * pp * dp = 2 * 2 * 1 = 4" in proc.stderr
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("step_*"))


def _free_port() -> int:
    from tests.dist_harness import free_port
    return free_port()


def _launch_config(tmp_path, stages: list[dict], **parallel) -> str:
    """A 12-step run with one growth, written as a config file for a launcher test."""
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")
    raw = _raw("gpt", **parallel)
    raw["train"].update(steps=12, eval_interval=12, save_interval=12)
    raw["lr"] = {"warmup_steps": 2}
    raw["growth"]["stages"] = stages
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(raw))
    return str(path)


def _assert_one_preserving_growth(run_dir) -> None:
    growth = [r for r in _records(run_dir) if r["kind"] == "growth"]
    assert len(growth) == 1 and abs(growth[0]["loss_after"] - growth[0]["loss_before"]) < 1e-5


DS_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def test_deepspeed_launcher_runs_msg_train(tmp_path):
    # The deepspeed launcher appends --local_rank=N and exports RANK/WORLD_SIZE; one node.
    cfg_path = _launch_config(tmp_path, [{"at_step": 6, "ffn": 48, "heads": 4}], tp=2, dp=2)
    cmd = ["deepspeed", "--num_gpus", "4", "--master_port", str(_free_port()), "--module", "megatron_msg.cli.train",
           cfg_path, "--out-dir", str(tmp_path / "run"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **DS_ENV})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "done: step 12/12" in proc.stdout
    _assert_one_preserving_growth(tmp_path / "run")


def test_deepspeed_hostfile_two_nodes_without_ssh(tmp_path):
    # A two-"node" hostfile launched the way clusters without ssh do it: one launcher per node
    # with --no_ssh --node_rank, both on this machine.  TP2 x PP2 across the two nodes.
    cfg_path = _launch_config(tmp_path, [{"at_step": 6, "hidden": 24, "layers": 4}], tp=2, pp=2)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    port = str(_free_port())
    env = {**os.environ, **DS_ENV}
    procs = [subprocess.Popen(["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n),
                               "--master_addr", "127.0.0.1", "--master_port", port, "--module",
                               "megatron_msg.cli.train", cfg_path, "--out-dir", str(tmp_path / "run"),
                               "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for n in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    assert "done: step 12/12" in outs[0] and "done:" not in outs[1]  # global rank 0 is on node 0
    _assert_one_preserving_growth(tmp_path / "run")


def _batch_losses(rank, world, raw, out_dir, steps):
    cfg = config_from_dict(raw)
    ps = init_parallel(cfg.parallel, "cpu", LaunchEnv(rank, world, rank)) if world > 1 else None
    trainer = Trainer(cfg, out_dir=out_dir, progress=False, parallel=ps)
    while trainer.step < steps:
        trainer.advance()
    return {"each": trainer.eval_batch_losses(3), "mean": trainer._eval_loss(3), "probe": trainer._probe_loss()}


def test_per_batch_eval_losses_are_each_batch_own_and_the_same_on_every_replica(tmp_path):
    """Trainer.eval_batch_losses (what tools/probe_noise.py measures) gives each validation batch's own
    loss: they differ, their mean is evaluate()'s, the first is the growth probe's, and DP=2 replicas
    report the one-process values."""
    raw = _raw("gpt")
    raw["growth"] = {}
    one = _batch_losses(0, 1, raw, tmp_path / "one", 12)
    assert len(set(one["each"])) == 3
    assert sum(one["each"]) / 3 == pytest.approx(one["mean"], rel=1e-6)
    assert one["each"][0] == one["probe"]
    dp2 = run_distributed(_batch_losses, 2, (_raw("gpt", dp=2) | {"growth": {}}, tmp_path / "dp2", 12))
    for replica in dp2:
        assert replica["each"] == pytest.approx(one["each"], rel=1e-5)
