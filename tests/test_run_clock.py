"""Wall time in metrics.jsonl, an evaluation before the first step, and train.threads (issue 19)."""
from __future__ import annotations

import json

import torch

from megatron_msg.checkpoint.io import open_checkpoint
from megatron_msg.config import config_from_dict
from megatron_msg.training.clock import RunClock
from megatron_msg.training.trainer import Trainer, cpu_threads


def _raw(**train) -> dict:
    return {"model": {"hidden": 16, "ffn": 32, "heads": 2, "layers": 2, "head_dim": 8, "seq_len": 16},
            "lr": {"warmup_steps": 1},
            "train": {"steps": 8, "batch_size": 2, "eval_interval": 4, "eval_iters": 1, "log_interval": 1,
                      "save_interval": 4, "tensorboard": False, "plot": False, **train},
            "growth": {"defaults": {"phi": 1}, "stages": [{"at_step": 3, "ffn": 48}]}}


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_records_carry_training_and_evaluation_time_and_the_run_starts_with_an_evaluation(tmp_path):
    result = Trainer(config_from_dict(_raw()), out_dir=tmp_path / "run", progress=False).run()
    records = _records(tmp_path / "run")
    valid = [r for r in records if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [-1, 3, 7] and sorted(result.valid_losses) == [-1, 3, 7]
    assert valid[0]["time_s"] == 0 and valid[0]["eval_time_s"] > 0  # before any step: the initial loss
    train_times = [r["time_s"] for r in records if r["kind"] == "train"]
    assert len(train_times) == 8 and train_times == sorted(train_times) and train_times[0] > 0
    assert [r["eval_time_s"] for r in valid] == sorted(r["eval_time_s"] for r in valid)
    growth = next(r for r in records if r["kind"] == "growth")
    assert train_times[2] <= growth["time_s"] <= train_times[3]  # growth counts as training time
    clock = open_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000008").state["clock"]
    assert clock["train_s"] >= train_times[-1] and clock["eval_s"] >= valid[-1]["eval_time_s"]


def test_eval_at_start_false_skips_the_initial_evaluation(tmp_path):
    Trainer(config_from_dict(_raw(eval_at_start=False)), out_dir=tmp_path / "run", progress=False).run()
    assert [r["step"] for r in _records(tmp_path / "run") if r["kind"] == "valid"] == [3, 7]


def test_a_resumed_run_continues_the_checkpoints_clock_and_keeps_the_initial_evaluation(tmp_path):
    cfg = config_from_dict(_raw())
    Trainer(cfg, out_dir=tmp_path / "run", progress=False).run(max_steps=4)
    saved = open_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000004").state["clock"]
    Trainer(cfg, out_dir=tmp_path / "run", progress=False).run()
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records if r["kind"] == "valid"] == [-1, 3, 7]  # not evaluated at start again
    after = [r for r in records if r["kind"] == "train" and r["step"] >= 4]
    assert after and after[0]["time_s"] > saved["train_s"]  # from the checkpoint's time on, not from zero


def test_run_clock_state_round_trips_and_an_old_checkpoint_starts_at_zero():
    clock = RunClock(1.5, 0.25, 2.0)
    assert RunClock.from_state(clock.state_dict()) == clock
    assert RunClock.from_state(None) == RunClock() and RunClock.from_state({"unknown": 3}) == RunClock()
    with clock.timing("eval"):
        pass
    assert clock.eval_s >= 0.25 and clock.train_s == 1.5


def test_thread_count_is_the_setting_else_the_cores_shared_among_the_ranks_on_the_host(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert cpu_threads(3, 1) == 3 and cpu_threads(None, 1) is None
    assert cpu_threads(None, 4) == 4 and cpu_threads(None, 32) == 1
    before = torch.get_num_threads()
    try:
        Trainer(config_from_dict(_raw(threads=1)), out_dir=tmp_path / "run", progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_resuming_a_finished_run_reports_its_last_validation_loss(tmp_path, capsys):
    """Before: "last validation loss nan" (this invocation evaluated nothing)."""
    import yaml
    from megatron_msg.cli.train import main as msg_train
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_raw()))
    assert msg_train([str(config), "--out-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert msg_train([str(config), "--out-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    again = capsys.readouterr().out.strip().splitlines()[-1]
    assert "nan" not in again and again.split("last validation loss ")[1] == first.split("last validation loss ")[1]
