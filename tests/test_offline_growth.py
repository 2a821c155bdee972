"""Offline growth (msg-grow): checkpoint -> grown checkpoint -> resume equals the live run.

The grown checkpoint must be exactly what the trainer builds live at the growth step, so a
run stopped at the step, grown offline and resumed must give the uninterrupted run's losses
bit for bit (one process; the growth RNG, ramp and Adam state are functions of the config).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_msg.checkpoint.io import latest_checkpoint, open_checkpoint
from megatron_msg.cli.grow import main as msg_grow
from megatron_msg.config import config_from_dict
from megatron_msg.growth import apply as growth_apply
from megatron_msg.growth.offline import OfflineGrowthError, grow_checkpoint
from megatron_msg.model.layout import split_layer_name
from megatron_msg.training.trainer import Trainer

STEPS = 30


def _raw(arch: str = "gpt") -> dict:
    return {
        "model": {"arch": arch, "hidden": 16, "ffn": 32, "heads": 2, "layers": 2, "head_dim": 8, "seq_len": 16},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
        "lr": {"warmup_steps": 4},
        "train": {"steps": STEPS, "batch_size": 2, "grad_accum": 2, "log_interval": 1, "eval_interval": STEPS,
                  "eval_iters": 2, "save_interval": STEPS, "device": "cpu", "tensorboard": False, "plot": False},
        "growth": {"defaults": {"phi": 5}, "stages": [
            {"at_step": 10, "hidden": 24, "ffn": 48, "heads": 3, "rewind_lr": True},
            {"at_step": 20, "layers": 4, "depth_placement": "interleave", "depth_init": "copy"},
        ]},
    }


def _run(raw, out_dir, max_steps=None):
    return Trainer(config_from_dict(raw), out_dir=out_dir, progress=False).run(max_steps=max_steps)


@pytest.mark.parametrize("arch,params_dtype,fmt", [("gpt", "fp32", "logical"), ("bert", "fp32", "logical"),
                                                   ("gpt", "bf16", "logical"), ("gpt", "fp32", "sharded")])
def test_grown_checkpoint_resumes_into_the_live_run(arch, params_dtype, fmt, tmp_path):
    # bf16 parameters: live growth grows the optimizer's fp32 masters, offline growth the
    # checkpoint's (the same values), so the two still agree bit for bit.
    raw = _raw(arch)
    if params_dtype != "fp32":
        raw["train"].update(dtype=params_dtype, params_dtype=params_dtype)
    live = _run(raw, tmp_path / "live")
    stopped = _run(raw, tmp_path / "small", max_steps=10)  # checkpoint at step 10, before growing
    assert stopped.final_step == 10 and stopped.shape == config_from_dict(raw).model.shape
    assert msg_grow([json_config(tmp_path, raw), "--from", str(tmp_path / "small"),
                     "--out-dir", str(tmp_path / "grown"), "--format", fmt]) == 0
    grown = open_checkpoint(latest_checkpoint(tmp_path / "grown"))
    assert (grown.store is not None) == (fmt == "sharded") and not list((tmp_path / "grown").glob(".grown-*"))
    assert grown.state["stage_index"] == 1 and grown.state["ramp"] == {"start_step": 10, "phi": 5}
    resumed = _run(raw, tmp_path / "grown")  # grows the second stage live at step 20
    assert {s: resumed.losses[s] for s in range(10, STEPS)} == {s: live.losses[s] for s in range(10, STEPS)}
    a, b = open_checkpoint(latest_checkpoint(tmp_path / "grown")), open_checkpoint(latest_checkpoint(tmp_path / "live"))
    for name in b.model:
        assert torch.equal(a.model[name], b.model[name]), name
    # The loss curve carries over: the source run's records before step 10, the growth record, the rest.
    records = [json.loads(line) for line in (tmp_path / "grown" / "metrics.jsonl").read_text().splitlines()]
    growth = [r for r in records if r["kind"] == "growth"]
    assert [(g["step"], g.get("offline", False)) for g in growth] == [(10, True), (20, False)]
    assert sorted(r["step"] for r in records if r["kind"] == "train") == list(range(STEPS))


def json_config(tmp_path, raw) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(raw))
    return str(path)


def test_offline_growth_reads_one_layer_at_a_time(tmp_path, monkeypatch):
    raw = _raw()
    _run(raw, tmp_path / "small", max_steps=10)
    fetched = []
    real = growth_apply.stream_growth

    def spy(plan, names, fetch, rule, wanted=lambda n, layer: True):
        def recording(names):
            fetched.append({split_layer_name(n)[0] for n in names})
            return fetch(names)
        return real(plan, names, recording, rule, wanted)

    monkeypatch.setattr("megatron_msg.growth.offline.stream_growth", spy)
    grow_checkpoint(config_from_dict(raw), tmp_path / "small", tmp_path / "grown")
    assert fetched and all(len(layers) == 1 for layers in fetched)  # one global tensor or one layer


def test_offline_growth_refuses_what_does_not_fit(tmp_path):
    raw = _raw()
    _run(raw, tmp_path / "small", max_steps=6)
    cfg = config_from_dict(raw)
    with pytest.raises(OfflineGrowthError, match=r"checkpoint is at step 6, growth.stages\[0\] grows at step 10; "
                                                 r"offline growth applies a stage at its own step only "
                                                 r"\(train to it first: msg-train --max-steps 4\)"):
        grow_checkpoint(cfg, tmp_path / "small", tmp_path / "grown")
    _run(raw, tmp_path / "small", max_steps=4)  # now at step 10
    with pytest.raises(OfflineGrowthError, match="is the source run directory"):
        grow_checkpoint(cfg, tmp_path / "small", tmp_path / "small")
    other = _raw()
    other["growth"]["stages"][0]["hidden"] = 32
    grow_checkpoint(config_from_dict(other), tmp_path / "small", tmp_path / "grown")
    with pytest.raises(OfflineGrowthError, match="already holds checkpoints"):
        grow_checkpoint(cfg, tmp_path / "small", tmp_path / "grown")
    # The grown checkpoint (h=32) against the original schedule (h=24):
    with pytest.raises(OfflineGrowthError, match=r"checkpoint shape \(h=32.* after 1 growth stage\(s\) does not "
                                                 r"match the config's schedule, which gives \(h=24"):
        grow_checkpoint(cfg, tmp_path / "grown", tmp_path / "again")
    with pytest.raises(OfflineGrowthError, match="neither a checkpoint directory"):
        grow_checkpoint(cfg, tmp_path / "nothing", tmp_path / "x")
    one_stage = _raw()
    one_stage["growth"]["stages"] = one_stage["growth"]["stages"][:1]
    shutil.rmtree(tmp_path / "grown")
    grow_checkpoint(config_from_dict(one_stage), tmp_path / "small", tmp_path / "grown")
    with pytest.raises(OfflineGrowthError, match=r"all 1 growth stage\(s\) of the config are already applied"):
        grow_checkpoint(config_from_dict(one_stage), tmp_path / "grown", tmp_path / "again")


def test_msg_grow_reports_errors_with_exit_code_2(tmp_path, capsys):
    assert msg_grow([json_config(tmp_path, _raw()), "--from", str(tmp_path / "missing"),
                     "--out-dir", str(tmp_path / "out")]) == 2
    assert "msg-grow: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
