"""Per-stage training settings (growth.stages[i].lr / min_lr / warmup_steps / batch_size / grad_accum).

FLM-101B changes the peak LR, the warm-up and the global batch at each growth.  The LR of a step
and the samples it reads must be pure functions of the config, kept across a resume, and a
resume with a config that changes the steps already trained is refused.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from megatron_msg.checkpoint.io import CheckpointError
from megatron_msg.config import ConfigError, config_from_dict
from megatron_msg.training.batches import BatchSchedule, IndexedGPTBatches
from megatron_msg.training.lr import lr_at, lr_segments
from megatron_msg.training.trainer import Trainer


def raw_config(stages, steps=40, **train):
    return {"model": {"hidden": 16, "ffn": 32, "heads": 2, "layers": 2, "head_dim": 8, "seq_len": 16},
            "optimizer": {"lr": 4e-3, "min_lr": 4e-4},
            "lr": {"warmup_steps": 4, "decay": "cosine", "rewind_warmup_steps": 2},
            "train": {"steps": steps, "batch_size": 4, "grad_accum": 2, "eval_interval": 10, "eval_iters": 1,
                      "log_interval": 1, "save_interval": 100, "tensorboard": False, "plot": False, **train},
            "growth": {"defaults": {"phi": 3}, "stages": stages}}


FLM_LIKE = [{"at_step": 15, "hidden": 32, "heads": 4, "lr": 3.4e-3, "min_lr": 3.4e-4, "warmup_steps": 3},
            {"at_step": 28, "layers": 4, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 1, "grad_accum": 3,
             "batch_size": 2}]


def test_stage_settings_are_inherited_and_an_lr_starts_a_segment():
    cfg = config_from_dict(raw_config([{"at_step": 10, "ffn": 64, "batch_size": 8},
                                       {"at_step": 20, "layers": 4, "lr": 1e-3},
                                       {"at_step": 30, "hidden": 32}]))
    s0, s1, s2 = cfg.resolved_stages()
    assert (s0.batch_size, s0.grad_accum, s0.lr, s0.rewind_lr) == (8, 2, 4e-3, False)
    assert (s1.batch_size, s1.lr, s1.min_lr, s1.warmup_steps, s1.rewind_lr) == (8, 1e-3, 4e-4, 2, True)
    assert (s2.batch_size, s2.lr, s2.rewind_lr) == (8, 1e-3, False)  # inherited, no new segment
    assert s0.global_batch == 16


def test_lr_follows_each_segment_warmup_peak_and_decay_to_its_own_floor():
    cfg = config_from_dict(raw_config(FLM_LIKE))
    segs = lr_segments(cfg)
    assert [(s.start, s.peak, s.floor, s.warmup) for s in segs] == [
        (0, 4e-3, 4e-4, 4), (15, 3.4e-3, 3.4e-4, 3), (28, 2e-3, 2e-4, 1)]
    lr = [lr_at(s, segs, cfg.lr, cfg.train.steps) for s in range(cfg.train.steps)]
    assert lr[0] == pytest.approx(4e-3 / 4) and lr[3] == pytest.approx(4e-3)
    assert lr[15] == pytest.approx(3.4e-3 / 3) and lr[17] == pytest.approx(3.4e-3)
    assert lr[28] == pytest.approx(2e-3)  # a one-step warm-up reaches the peak at once
    # Cosine from the segment's peak (after its warm-up) to its floor at the run's last step.
    for step in (20, 24):
        progress = (step - 18) / (40 - 18)
        assert lr[step] == pytest.approx(3.4e-4 + (3.4e-3 - 3.4e-4) * 0.5 * (1 + math.cos(math.pi * progress)))
    assert min(lr[28:]) >= 2e-4 - 1e-12


def test_lr_rewind_at_gives_a_run_without_growth_the_rewinds_of_a_growth_schedule():
    """lr.rewind_at (issue 19): the full-size control of a growth benchmark gets the same LR as the
    growth schedule, rewind for rewind, without a fake growth event."""
    growth = config_from_dict(raw_config([{"at_step": 12, "ffn": 64, "rewind_lr": True},
                                          {"at_step": 25, "layers": 4, "rewind_lr": True}]))
    control_raw = raw_config([])
    control_raw["lr"]["rewind_at"] = [12, 25]
    control = config_from_dict(control_raw)
    lr = lambda cfg: [lr_at(s, lr_segments(cfg), cfg.lr, cfg.train.steps) for s in range(cfg.train.steps)]  # noqa: E731
    assert lr(control) == lr(growth)
    assert lr(control)[12] == pytest.approx(4e-3 / 2)  # rewind_warmup_steps 2: half the peak, then the peak
    # At a step that also starts a stage's own segment, the stage's settings win.
    both_raw = raw_config([{"at_step": 12, "ffn": 64, "lr": 1e-3, "min_lr": 1e-4}])
    both_raw["lr"]["rewind_at"] = [12, 25]
    segs = lr_segments(config_from_dict(both_raw))
    assert [(s.start, s.peak, s.floor) for s in segs] == [(0, 4e-3, 4e-4), (12, 1e-3, 1e-4), (25, 1e-3, 1e-4)]


def test_partial_rewinds_and_a_faster_decay_shape_every_rewind_alike():
    """lr.rewind_peak / lr.rewind_decay (issue 19's LR policies): a growth stage's rewind and an
    lr.rewind_at rewind at the same step give the same LR, so the full-size control keeps the policy."""
    policy = {"rewind_peak": 0.5, "rewind_decay": 0.5}
    growth_raw = raw_config([{"at_step": 12, "ffn": 64, "rewind_lr": True},
                             {"at_step": 25, "layers": 4, "rewind_lr": True}])
    growth_raw["lr"].update(policy)
    control_raw = raw_config([])
    control_raw["lr"].update(policy, rewind_at=[12, 25])
    plain = config_from_dict(raw_config([{"at_step": 12, "ffn": 64, "rewind_lr": True},
                                         {"at_step": 25, "layers": 4, "rewind_lr": True}]))
    lr = lambda cfg: [lr_at(s, lr_segments(cfg), cfg.lr, cfg.train.steps) for s in range(cfg.train.steps)]  # noqa: E731
    growth, control = config_from_dict(growth_raw), config_from_dict(control_raw)
    assert lr(control) == lr(growth)
    got, full_rewind = lr(growth), lr(plain)
    assert got[:12] == full_rewind[:12]  # the first segment is the run's own
    assert got[13] == pytest.approx(0.5 * 4e-3) and full_rewind[13] == pytest.approx(4e-3)  # after the 2-step warm-up
    # The second rewind decays from step 27 (after its warm-up) over half the 13 steps left: floor from step 33.
    assert [s.end for s in lr_segments(growth)] == [None, 14 + round(0.5 * 26), 27 + round(0.5 * 13)]
    assert got[32] > 4e-4 and got[33:] == [pytest.approx(4e-4)] * 7
    assert all(a >= b for a, b in zip(got[27:], got[28:]))  # it decays, never climbs


@pytest.mark.parametrize("lr, words", [
    ({"rewind_peak": 0}, r"lr.rewind_peak: must be in \(0, 1\]"),
    ({"rewind_peak": 1.5}, r"lr.rewind_peak: must be in \(0, 1\]"),
    ({"rewind_decay": 0}, r"lr.rewind_decay: must be in \(0, 1\]"),
    ({"rewind_peak": 0.05}, r"lr.rewind_peak: 0.05 x the peak 0.004 \(growth.stages\[0\]\) is below its min_lr 0.0004"),
])
def test_bad_lr_rewind_policies_name_the_field(lr, words):
    raw = raw_config([{"at_step": 12, "ffn": 64, "rewind_lr": True}])
    raw["lr"].update(lr)
    with pytest.raises(ConfigError, match=words):
        config_from_dict(raw)


@pytest.mark.parametrize("rewinds, words", [
    ([0], r"lr.rewind_at: every step must be in \(0, train.steps=40\)"),
    ([40], r"lr.rewind_at: every step must be in"),
    ([20, 10], r"lr.rewind_at: steps must be increasing and distinct"),
    ([10, 11], r"lr.rewind_warmup_steps: a warm-up of 2 steps from the rewind at step 10 \(lr.rewind_at\) does not end"),
])
def test_bad_lr_rewinds_name_the_field(rewinds, words):
    raw = raw_config([])
    raw["lr"]["rewind_at"] = rewinds
    with pytest.raises(ConfigError, match=words):
        config_from_dict(raw)


def test_batch_schedule_numbers_samples_cumulatively():
    cfg = config_from_dict(raw_config(FLM_LIKE))
    sched = BatchSchedule.from_config(cfg)
    assert [(s.start, s.batch_size, s.grad_accum, s.first_sample) for s in sched.segments] == [
        (0, 4, 2, 0), (28, 2, 3, 28 * 8)]
    assert sched.samples_before(28) == 224 and sched.samples_before(30) == 224 + 2 * 6
    assert sched.first_sample(29, 2) == 224 + 6 + 2 * 2
    assert sched.samples_before(cfg.train.steps) == 28 * 8 + 12 * 6
    # One batch size: exactly the numbering of before per-stage batches, (step * accum + micro) * batch.
    flat = BatchSchedule.constant(4, 2)
    assert all(flat.first_sample(s, m) == (s * 2 + m) * 4 for s in range(5) for m in range(2))


def test_indexed_batches_read_the_samples_the_schedule_numbers():
    dataset = [{"tokens": np.full(5, i)} for i in range(1000)]
    cfg = config_from_dict(raw_config(FLM_LIKE))
    batches = IndexedGPTBatches(dataset, BatchSchedule.from_config(cfg))
    assert batches.get(27, 1)["tokens"][:, 0].tolist() == [27 * 8 + 4 + b for b in range(4)]
    assert batches.get(29, 2)["tokens"][:, 0].tolist() == [224 + 6 + 4, 224 + 6 + 5]  # micro-batches of 2


@pytest.mark.parametrize("stages,field,words", [
    ([{"at_step": 10, "ffn": 64, "lr": 1e-3, "rewind_lr": False}], "growth.stages[0].rewind_lr", "contradicts"),
    ([{"at_step": 10, "ffn": 64, "lr": 1e-4}], "growth.stages[0].lr", "min_lr=0.0004 is not in [0, lr=0.0001]"),
    ([{"at_step": 10, "ffn": 64, "min_lr": 1e-2}], "growth.stages[0].min_lr", "not in [0, lr"),
    ([{"at_step": 10, "ffn": 64, "lr": -1.0}], "growth.stages[0].lr", "must be > 0"),
    ([{"at_step": 10, "ffn": 64, "warmup_steps": 12}, {"at_step": 20, "layers": 4, "lr": 1e-3}],
     "growth.stages[0].warmup_steps", "does not end before the next LR segment at step 20"),
    ([{"at_step": 35, "ffn": 64, "warmup_steps": 5}], "growth.stages[0].warmup_steps", "train.steps=40"),
    ([{"at_step": 10, "ffn": 64, "batch_size": 0}], "growth.stages[0].batch_size", ">= 1"),
    ([{"at_step": 10, "ffn": 64, "grad_accum": 3, "dp": 2, "tp": 1}], "growth.stages[0].grad_accum",
     "not divisible by dp=2"),
    ([{"at_step": 10, "ffn": 64, "dp": 2, "tp": 1}, {"at_step": 20, "layers": 4, "grad_accum": 3}],
     "growth.stages[1].grad_accum", "not divisible by dp=2"),
    ([{"at_step": 3, "ffn": 64, "rewind_lr": True}], "lr.warmup_steps", "first LR rewind at step 3"),
])
def test_bad_stage_settings_name_the_field(stages, field, words):
    raw = raw_config(stages)
    if any("dp" in s for s in stages):
        raw["parallel"] = {"tp": 2}
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    assert str(exc.value).startswith(field), str(exc.value)
    assert words in str(exc.value), str(exc.value)


@pytest.fixture(scope="module")
def indexed_data(tmp_path_factory):
    from megatron_msg.data import PreprocessConfig, preprocess_jsonl
    from megatron_msg.training.batches import BUNDLED_CORPUS
    out = tmp_path_factory.mktemp("data")
    stats = preprocess_jsonl(PreprocessConfig(inputs=[str(BUNDLED_CORPUS)], output_prefix=str(out / "c"),
                                              progress=False))
    return stats.prefix


def _records(run_dir, kind):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == kind]


def test_a_run_resumed_inside_a_stage_keeps_its_settings_and_its_losses(tmp_path, indexed_data):
    raw = raw_config(FLM_LIKE)
    raw["data"] = {"format": "indexed", "path": indexed_data, "splits": "90,10,0"}
    cfg = config_from_dict(raw)
    whole = Trainer(cfg, out_dir=tmp_path / "whole", progress=False).run()
    Trainer(cfg, out_dir=tmp_path / "split", progress=False).run(max_steps=31)  # stops inside stage 1
    resumed_trainer = Trainer(cfg, out_dir=tmp_path / "split", progress=False)
    assert resumed_trainer.step == 31
    resumed = resumed_trainer.run()
    assert resumed.losses == {s: v for s, v in whole.losses.items() if s >= 31}
    train = {r["step"]: r for r in _records(tmp_path / "whole", "train")}
    segs = lr_segments(cfg)
    assert all(r["lr"] == lr_at(s, segs, cfg.lr, cfg.train.steps) for s, r in train.items())
    assert train[27]["global_batch"] == 8 and train[28]["global_batch"] == 6


def test_resume_refuses_a_config_that_changes_the_steps_already_trained(tmp_path, indexed_data):
    raw = raw_config(FLM_LIKE)
    raw["data"] = {"format": "indexed", "path": indexed_data, "splits": "90,10,0"}
    Trainer(config_from_dict(raw), out_dir=tmp_path, progress=False).run(max_steps=31)
    changed = json.loads(json.dumps(raw))
    changed["growth"]["stages"][1]["grad_accum"] = 2  # the stage the checkpoint is in
    with pytest.raises(CheckpointError, match=r"consumed_samples: checkpoint 242, config 236"):
        Trainer(config_from_dict(changed), out_dir=tmp_path, progress=False)
    changed = json.loads(json.dumps(raw))
    changed["growth"]["stages"][1]["lr"] = 1e-3
    with pytest.raises(CheckpointError, match=r"lr_segment"):
        Trainer(config_from_dict(changed), out_dir=tmp_path, progress=False)
    # A stage the run has not reached yet may still change.
    later = json.loads(json.dumps(raw))
    later["train"]["steps"] = 50
    later["growth"]["stages"].append({"at_step": 45, "ffn": 64, "lr": 1e-3, "min_lr": 1e-4})
    assert Trainer(config_from_dict(later), out_dir=tmp_path, progress=False).step == 31


def test_validate_prints_each_stages_layout_batch_and_lr(tmp_path, capsys):
    from megatron_msg.cli.train import main as msg_train
    raw = raw_config(FLM_LIKE)
    raw["parallel"] = {"dp": 2}
    raw["growth"]["stages"][0].update(tp=2, dp=1)
    raw["growth"]["stages"][1]["grad_accum"] = 4
    (tmp_path / "run.yaml").write_text(json.dumps(raw))
    assert msg_train([str(tmp_path / "run.yaml"), "--validate"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "tp1 x pp1 x dp2; batch 4x2=8 (128 tokens); lr 0.004->0.0004 warmup 4 (cosine)" in lines[0]
    assert lines[1].endswith("; layout tp2 x pp1 x dp1; rewind lr 0.0034->0.00034 warmup 3")
    assert lines[2].endswith("; batch 2x4=8 (128 tokens); rewind lr 0.002->0.0002 warmup 1")
