"""DeepSpeed interoperability (issue 16, item 3), with a real DeepSpeed ZeRO-2 engine on CPU (2 gloo ranks).

* DeepSpeed -> us: a DeepSpeed engine trains our GPT module on our batches and saves; DeepSpeed's
  own ``ds_to_universal`` converts the save; ``msg-deepspeed import`` makes our checkpoint of it,
  and our trainer continues the run.
* us -> DeepSpeed: ``msg-deepspeed export`` writes our checkpoint as a universal checkpoint, and
  a DeepSpeed engine with ``load_universal`` continues it.

Both continuations are compared with our uninterrupted run.  Under ZeRO-1 bit for bit:
DeepSpeed's engine wraps the same module, its ``torch.optim.AdamW`` (single-tensor path)
computes the update with the same operations as our unfused one (``optimizer.fused: false``,
training/optimizer.py), it reduces the gradients once per step after accumulating the
micro-batches, as we do, and with 2 ranks x 2
micro-batches its scaling (loss / 2, then the mean over 2 ranks) and ours (loss / 4, then the
sum) differ by powers of two, which are exact; so its own steps equal ours too (asserted),
which is what makes "continues the same run" checkable at all.  Under ZeRO-2 DeepSpeed reduces
each micro-batch's gradients as backward produces them, (a1 + b1) + (a2 + b2) where we sum
(a1 + a2) + (b1 + b2): the last bits of the parameters differ from the first step on
(measured: up to 2.4e-7 absolute in the parameters after six steps, 2026-12-02), and the losses agree to 1e-6
relative (measured: at most one ulp of the loss); a wrong tensor, moment or step count moves
them by 1e-3 or more.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

from megatron_msg.cli.deepspeed import main as msg_deepspeed  # noqa: E402
from megatron_msg.config import config_from_dict  # noqa: E402
from megatron_msg.parallel.launch import LaunchEnv, init_parallel  # noqa: E402
from megatron_msg.training.trainer import Trainer  # noqa: E402
from tests.deepspeed_driver import ds_train  # noqa: E402
from tests.dist_harness import run_distributed  # noqa: E402

HANDOVER, STEPS = 6, 12


def _raw(zero: int = 1, **train) -> dict:
    return {
        "model": {"arch": "gpt", "hidden": 16, "ffn": 32, "heads": 2, "layers": 2, "head_dim": 8, "seq_len": 16},
        # fused: false: our unfused update is torch.optim.AdamW's single-tensor arithmetic, which
        # DeepSpeed's torch_adam runs (the fused kernel rounds differently: training/fused_adamw.py)
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "weight_decay": 0.01, "grad_clip": 0.0, "fused": False},
        "lr": {"warmup_steps": 2},
        "train": {"steps": STEPS, "batch_size": 2, "grad_accum": 4, "log_interval": 1, "eval_interval": 100,
                  "eval_iters": 1, "save_interval": HANDOVER, "keep_checkpoints": 3, "device": "cpu",
                  "tensorboard": False, "plot": False, **train},
        "parallel": {"dp": 2, "zero_stage": zero},
    }


def _train(rank, world, raw, out_dir):
    cfg = config_from_dict(raw)
    ps = init_parallel(cfg.parallel, "cpu", LaunchEnv(rank, world, rank))
    return Trainer(cfg, out_dir=out_dir, progress=False, parallel=ps).run().losses


def _same_run(got: dict, want: dict, zero: int) -> None:
    assert got.keys() == want.keys()
    if zero == 1:
        assert got == want
    else:
        assert max(abs(got[s] - want[s]) / abs(want[s]) for s in got) < 1e-6


@pytest.fixture(scope="module", params=[1, 2])
def ours(request, tmp_path_factory):
    """(ZeRO stage, our uninterrupted DP2 run's directory, its losses); checkpoints at the handover and the end."""
    zero = request.param
    out = tmp_path_factory.mktemp(f"ours_zero{zero}")
    return zero, out, run_distributed(_train, 2, args=(_raw(zero), out))[0]


def test_deepspeed_save_converted_by_ds_to_universal_continues_in_our_trainer(ours, tmp_path, capsys):
    zero, _, ref = ours
    ds = run_distributed(ds_train, 2, args=(_raw(zero), 0, HANDOVER, str(tmp_path / "ds")))[0]
    _same_run(ds, {s: ref[s] for s in range(HANDOVER)}, zero)  # the same run, step for step
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(tmp_path / "ds" / f"global_step{HANDOVER}"), "--output_folder",
                    str(tmp_path / "universal" / f"global_step{HANDOVER}"), "--num_extract_workers", "1",
                    "--num_merge_workers", "1"], check=True, env=env, capture_output=True)
    (tmp_path / "run.yaml").write_text(json.dumps(_raw(zero)))
    assert msg_deepspeed(["import", str(tmp_path / "universal"), str(tmp_path / "run.yaml"),
                          "--out-dir", str(tmp_path / "run")]) == 0
    continued = run_distributed(_train, 2, args=(_raw(zero), tmp_path / "run"))[0]
    _same_run(continued, {s: ref[s] for s in range(HANDOVER, STEPS)}, zero)
    (tmp_path / "universal" / f"global_step{HANDOVER}" / "zero" / "layers.0.attn.qkv.weight" / "step.pt").unlink()
    assert msg_deepspeed(["import", str(tmp_path / "universal"), str(tmp_path / "run.yaml"),
                          "--out-dir", str(tmp_path / "run2")]) == 2
    assert "layers.0.attn.qkv.weight/step.pt: missing" in capsys.readouterr().err
    assert not list((tmp_path / "run2").glob("checkpoints/step_*"))  # nothing committed


def test_our_checkpoint_exported_to_universal_continues_in_a_deepspeed_engine(ours, tmp_path):
    zero, out, ref = ours
    ckpt = out / "checkpoints" / f"step_{HANDOVER:08d}"
    assert msg_deepspeed(["export", str(ckpt), "--out", str(tmp_path / "universal")]) == 0
    tag = tmp_path / "universal" / f"global_step{HANDOVER}"
    assert (tmp_path / "universal" / "latest_universal").read_text() == tag.name
    assert (tag / "zero" / "layers.0.mlp.fc1.weight" / "exp_avg_sq.pt").is_file()
    continued = run_distributed(ds_train, 2, args=(_raw(zero), HANDOVER, STEPS, None, str(tmp_path / "universal")))[0]
    _same_run(continued, {s: ref[s] for s in range(HANDOVER, STEPS)}, zero)


def test_what_deepspeed_cannot_hold_is_refused_by_name(tmp_path, capsys):
    raw = _raw(steps=10, save_interval=100)
    raw["parallel"] = {}
    raw["growth"] = {"defaults": {"phi": 4}, "stages": [{"at_step": 3, "ffn": 48}]}
    Trainer(config_from_dict(raw), out_dir=tmp_path / "mid", progress=False).run(max_steps=5)  # ramp 3..7
    assert msg_deepspeed(["export", str(tmp_path / "mid"), "--out", str(tmp_path / "u1")]) == 2
    assert "inside a growth ramp" in capsys.readouterr().err
    Trainer(config_from_dict(raw), out_dir=tmp_path / "mid", progress=False).run(max_steps=4)  # ramp over at 7
    assert msg_deepspeed(["export", str(tmp_path / "mid"), "--out", str(tmp_path / "u2")]) == 2
    assert "per-entry Adam steps left by a growth" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text(json.dumps(_raw()))
    assert msg_deepspeed(["import", str(tmp_path), str(tmp_path / "bad.yaml"), "--out-dir", str(tmp_path / "x")]) == 2
    assert "not a DeepSpeed universal checkpoint" in capsys.readouterr().err
