"""A step whose gradients are inf/nan never reaches the weights, and never a checkpoint.

Without fp16 loss scaling (which skips overflowed steps by design, test_loss_scale.py)
such a step is skipped while ``train.skip_nonfinite_steps`` allows, and otherwise
stops training with TrainingDivergedError before anything is saved: the last
checkpoint stays the last sound state.  The NaN is injected into one parameter's
gradient at chosen steps by a hook, so the trainer's own path reacts to it.
"""
from __future__ import annotations

import pytest
import torch

from megatron_msg.checkpoint.io import latest_checkpoint, open_checkpoint
from megatron_msg.cli.train import main as msg_train
from megatron_msg.config import ConfigError, config_from_dict
from megatron_msg.parallel.launch import LaunchEnv, init_parallel
from megatron_msg.training.trainer import Trainer, TrainingDivergedError
from tests.dist_harness import run_distributed
from tests.test_zero import _raw

POISON = "layers.0.mlp.fc1.weight"


def _poisoned(raw, out_dir, steps: set[int], parallel=None, poison_here: bool = True) -> Trainer:
    trainer = Trainer(config_from_dict(raw), out_dir=out_dir, progress=False, parallel=parallel)
    param = dict(trainer.model.named_parameters()).get(POISON)
    if poison_here and param is not None:  # the first growth (step 8) replaces the model: poison before it
        param.register_hook(lambda g: g * float("nan") if trainer.step in steps else g)
    return trainer


def test_a_nonfinite_step_stops_training_and_saves_nothing(tmp_path):
    raw = _raw("gpt")
    raw["train"]["save_interval"] = 2
    trainer = _poisoned(raw, tmp_path, {5})
    with pytest.raises(TrainingDivergedError, match=r"step 5: the gradient norm is nan .* 0 of "
                                                    r"train.skip_nonfinite_steps=0 .*/step_00000004"):
        trainer.run()
    last = open_checkpoint(latest_checkpoint(tmp_path))
    assert last.state["step"] == 4  # nothing written at or after the bad step
    assert all(torch.isfinite(last.model[n]).all() for n in last.model)


def test_allowed_nonfinite_steps_are_skipped_and_counted(tmp_path):
    raw = _raw("gpt")
    raw["train"]["skip_nonfinite_steps"] = 1
    trainer = _poisoned(raw, tmp_path / "skip", {3})
    before = {}  # the weight entering each step (read in backward, before the step's update)
    param = dict(trainer.model.named_parameters())[POISON]

    def record(grad):
        before.setdefault(trainer.step, param.detach().clone())
        return grad
    param.register_hook(record)
    result = trainer.run(max_steps=5)
    assert torch.equal(before[3], before[4])
    assert not torch.equal(before[2], before[3])
    assert result.final_step == 5 and all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert open_checkpoint(latest_checkpoint(tmp_path / "skip")).state["nonfinite_skipped"] == 1
    # The allowance is spent: a resumed run stops at the next one.
    again = _poisoned(raw, tmp_path / "skip", {6})
    with pytest.raises(TrainingDivergedError, match=r"step 6: .* 1 of train.skip_nonfinite_steps=1"):
        again.run()


def _dp_run(rank, world, raw, out_dir):
    cfg = config_from_dict(raw)
    ps = init_parallel(cfg.parallel, "cpu", LaunchEnv(rank, world, rank))
    trainer = _poisoned(raw, out_dir, {5}, parallel=ps, poison_here=rank == 1)  # one TP rank's shard only
    try:
        trainer.run()
    except TrainingDivergedError as exc:
        return str(exc).split(":")[0], trainer.step
    return None, trainer.step


def test_every_rank_stops_at_the_same_step_when_one_shard_is_nonfinite(tmp_path):
    results = run_distributed(_dp_run, 4, args=(_raw("gpt", tp=2, dp=2), tmp_path))
    assert results == [("step 5", 5)] * 4


def test_msg_train_exits_3_on_divergence_and_rejects_a_negative_allowance(tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match=r"train.skip_nonfinite_steps: must be >= 0, got -1"):
        config_from_dict({"train": {"skip_nonfinite_steps": -1}})
    import megatron_msg.training.trainer as trainer_module

    def diverge(self, step):
        raise TrainingDivergedError(f"step {step}: the gradient norm is nan")
    monkeypatch.setattr(trainer_module.Trainer, "train_step", diverge)
    code = msg_train(["--set", "train.steps=3", "--set", "lr.warmup_steps=1", "--set", "growth.stages=[]",
                      "--set", "train.device=cpu", "--out-dir", str(tmp_path), "--no-progress"])
    assert code == 3
    assert "msg-train: training diverged: step 0: the gradient norm is nan" in capsys.readouterr().err
