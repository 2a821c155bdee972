"""Checkpoint integrity: checksummed files, damage named and skipped, never a silent restart,
nothing partial taken as complete after a kill at any moment (issue 16, item 4).

The damage tests name files of the per-tensor format (``train.checkpoint_format: logical``);
the sharded format's damage cases are in test_sharded_checkpoint.py.  The kill tests run the
default (sharded) format: every commit rule is shared by both."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_msg.checkpoint.io import (MANIFEST, CheckpointError, LogicalTensor, checkpoint_damage, find_latest,
                                        latest_checkpoint, open_checkpoint, save_checkpoint)
from megatron_msg.cli.train import main as msg_train
from megatron_msg.config import config_from_dict
from megatron_msg.jsonl import iter_jsonl
from megatron_msg.training.trainer import Trainer

RAW = {
    "model": {"arch": "gpt", "hidden": 16, "ffn": 32, "heads": 2, "layers": 2, "head_dim": 8, "seq_len": 16},
    "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
    "lr": {"warmup_steps": 3},
    "train": {"steps": 24, "batch_size": 4, "log_interval": 1, "eval_interval": 12, "eval_iters": 1,
              "save_interval": 6, "keep_checkpoints": 3, "tensorboard": False, "plot": False,
              "checkpoint_format": "logical"},
    "growth": {"defaults": {"phi": 3}, "stages": [{"at_step": 8, "ffn": 48}, {"at_step": 14, "layers": 3}]},
}
FC1 = "tensors/layers.0.mlp.fc1.weight"


def _cfg():
    return config_from_dict(json.loads(json.dumps(RAW)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's losses."""
    return Trainer(_cfg(), out_dir=tmp_path_factory.mktemp("ref"), progress=False).run().losses


def _stopped_at(tmp_path, steps) -> Path:
    Trainer(_cfg(), out_dir=tmp_path, progress=False).run(max_steps=steps)
    return tmp_path / "checkpoints"


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_every_file_is_in_the_manifest_with_its_size_and_checksum(tmp_path):
    root = _stopped_at(tmp_path, 12) / "step_00000012"
    manifest = json.loads((root / MANIFEST).read_text())
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == files and manifest["step"] == 12
    from megatron_msg.checkpoint.io import file_crc32
    for rel, entry in manifest["files"].items():
        assert entry == {"bytes": (root / rel).stat().st_size, "crc32": file_crc32(root / rel)}
    assert checkpoint_damage(root) is None


def test_a_flipped_byte_is_named_and_the_previous_complete_checkpoint_is_offered(tmp_path, reference, capsys):
    ckpts = _stopped_at(tmp_path, 13)  # steps 6 and 12 saved, and 13 at the stop
    _flip_a_byte(ckpts / "step_00000013" / FC1 / "exp_avg.pt")
    assert checkpoint_damage(ckpts / "step_00000013") is None  # same size: found when read
    with pytest.raises(CheckpointError) as exc:
        Trainer(_cfg(), out_dir=tmp_path, progress=False)
    message = str(exc.value)
    assert f"{FC1}/exp_avg.pt: checksum mismatch" in message
    assert f"--resume-from {ckpts / 'step_00000012'}" in message
    # The CLI: one line, exit 2; then resuming from the offered checkpoint repeats the uninterrupted run.
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(RAW))
    capsys.readouterr()
    assert msg_train([str(cfg_path), "--out-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msg-train: checkpoint error: ") and err.count("\n") == 1
    resumed = Trainer(_cfg(), out_dir=tmp_path, progress=False, resume_from=ckpts / "step_00000012").run()
    assert resumed.losses == {s: v for s, v in reference.items() if s >= 12}
    assert checkpoint_damage(ckpts / "step_00000018") is None and checkpoint_damage(ckpts / "step_00000024") is None


@pytest.mark.parametrize("damage,words", [
    (lambda root: (root / FC1 / "fp32.pt").write_bytes(b"truncated"), "fp32.pt is 9 bytes, the manifest says"),
    (lambda root: (root / FC1 / "exp_avg_sq.pt").unlink(), "exp_avg_sq.pt is missing"),
    (lambda root: (root / MANIFEST).unlink(), "manifest.json is missing"),
    (lambda root: (root / "state.pt").unlink(), "state.pt is missing"),
    (lambda root: (root / MANIFEST).write_text("{not json"), "unreadable manifest"),
])
def test_a_structurally_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, reference, damage, words,
                                                                               capsys):
    ckpts = _stopped_at(tmp_path, 13)
    damage(ckpts / "step_00000013")
    found = find_latest(tmp_path)
    assert found.path == ckpts / "step_00000012" and found.damaged[0][0] == "step_00000013"
    assert words in found.damaged[0][1]
    capsys.readouterr()
    trainer = Trainer(_cfg(), out_dir=tmp_path, progress=False)
    assert trainer.step == 12
    assert "warning: checkpoint step_00000013 is damaged" in capsys.readouterr().out
    assert trainer.run().losses == {s: v for s, v in reference.items() if s >= 12}
    assert checkpoint_damage(ckpts / "step_00000018") is None
    assert not (ckpts / "step_00000013").exists()  # superseded damage is pruned


def test_a_deleted_latest_is_no_reason_to_start_over(tmp_path, reference):
    ckpts = _stopped_at(tmp_path, 13)
    (ckpts / "latest").unlink()
    trainer = Trainer(_cfg(), out_dir=tmp_path, progress=False)
    assert trainer.step == 13
    assert trainer.run().losses == {s: v for s, v in reference.items() if s >= 13}


def test_a_run_directory_whose_checkpoints_are_all_damaged_never_restarts_silently(tmp_path, capsys):
    ckpts = _stopped_at(tmp_path, 7)  # steps 6 and 7
    for step in (6, 7):
        (ckpts / f"step_{step:08d}" / "state.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"has checkpoints but none is complete \(step_00000007: state.pt is 1 "
                                              r"bytes, .*step_00000006: state.pt is 1 bytes"):
        Trainer(_cfg(), out_dir=tmp_path, progress=False)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(RAW))
    assert msg_train([str(cfg_path), "--out-dir", str(tmp_path), "--no-progress", "--max-steps", "1"]) == 2
    assert "--no-resume" in capsys.readouterr().err
    # --no-resume starts over, and says it removes the old checkpoints (else they would be resumed later)
    trainer = Trainer(_cfg(), out_dir=tmp_path, resume=False, progress=False)
    assert trainer.step == 0 and not any(ckpts.glob("step_*"))
    assert "removed the previous run's 2 checkpoint(s)" in capsys.readouterr().out


def test_mismatched_metadata_is_refused(tmp_path):
    ckpts = _stopped_at(tmp_path, 13)
    a, b = ckpts / "step_00000012", ckpts / "step_00000013"
    (b / MANIFEST).write_bytes((a / MANIFEST).read_bytes())  # the manifest of another step
    assert "its manifest is for step 12, not 13" in checkpoint_damage(b)
    (b / MANIFEST).unlink()
    (b / "state.pt").write_bytes((a / "state.pt").read_bytes())
    manifest = json.loads((a / MANIFEST).read_text())
    manifest["step"] = 13  # a manifest that agrees with the directory, beside the state of step 12
    (b / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="state.pt is for step 12, the manifest for step 13"):
        open_checkpoint(b)


def test_stale_temporaries_of_killed_saves_are_removed_and_a_step_is_never_saved_twice(tmp_path, capsys):
    ckpts = _stopped_at(tmp_path, 6)
    (ckpts / ".tmp-step_00000012.4242" / "tensors").mkdir(parents=True)
    (ckpts / ".damaged-step_00000009.4242").mkdir()
    trainer = Trainer(_cfg(), out_dir=tmp_path, progress=False)
    out = capsys.readouterr().out
    assert "removed" in out and ".tmp-step_00000012.4242" in out and not list(ckpts.glob(".tmp-*"))
    assert not list(ckpts.glob(".damaged-*"))
    # Stopping right after a periodic save does not write that step again.
    before = (ckpts / "step_00000006" / MANIFEST).stat().st_mtime_ns
    assert trainer.save() == ckpts / "step_00000006"
    assert (ckpts / "step_00000006" / MANIFEST).stat().st_mtime_ns == before
    with pytest.raises(CheckpointError, match="already exists and is complete: a step is never saved twice"):
        save_checkpoint(tmp_path, 6, {"step": 6}, {}, keep=2, tensors=[LogicalTensor("t", torch.zeros(2), None)])


def test_a_damaged_checkpoint_of_the_same_step_is_replaced(tmp_path):
    ckpts = _stopped_at(tmp_path, 13)
    (ckpts / "step_00000013" / "meta.json").write_text("{}")
    trainer = Trainer(_cfg(), out_dir=tmp_path, progress=False)  # resumes 12, reaches 13 again
    assert trainer.step == 12
    trainer.run(max_steps=1)
    assert checkpoint_damage(ckpts / "step_00000013") is None and find_latest(tmp_path).damaged == []


def test_msg_compare_and_msg_export_name_a_damaged_checkpoint(tmp_path, capsys):
    from megatron_msg.cli.compare import main as msg_compare
    from megatron_msg.cli.export import main as msg_export
    ckpts = _stopped_at(tmp_path, 7)
    for step in (6, 7):
        (ckpts / f"step_{step:08d}" / FC1 / "fp32.pt").unlink()
    assert msg_compare([str(tmp_path)]) == 2
    assert "none is complete" in capsys.readouterr().err
    assert msg_export([str(ckpts / "step_00000007"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "damaged checkpoint: tensors/layers.0.mlp.fc1.weight/fp32.pt is missing" in err and err.count("\n") == 1


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_at_resume_and_by_msg_grow(tmp_path, reference, capsys):
    from megatron_msg.cli.grow import main as msg_grow
    _stopped_at(tmp_path, 8)  # at the first growth's step
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"kind": "train", "step": 8, "lo')  # a write cut by a kill
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(RAW))
    capsys.readouterr()
    assert msg_grow([str(cfg_path), "--from", str(tmp_path), "--out-dir", str(tmp_path / "grown")]) == 0
    err = capsys.readouterr().err
    assert f"{metrics}:" in err and "the last line is cut off" in err
    assert json.loads((tmp_path / "grown" / "metrics.jsonl").read_text().splitlines()[-1])["kind"] == "growth"
    trainer = Trainer(_cfg(), out_dir=tmp_path, progress=False)  # the source run resumes too
    assert "the last line is cut off" in capsys.readouterr().err
    assert trainer.run().losses == {s: v for s, v in reference.items() if s >= 8}
    with metrics.open("a") as f:  # damage before the last line is not a torn write: named, not skipped
        f.write('{"kind": "train", "step": 99, "lo\n{"kind": "valid", "step": 99, "loss": 1.0}\n')
    from megatron_msg.training.metrics import MetricsError
    with pytest.raises(MetricsError, match=r"metrics.jsonl:\d+: malformed JSON"):
        Trainer(_cfg(), out_dir=tmp_path, progress=False)


# --------------------------------------------------------------------------- kills

def _write_cfg(path: Path, **train) -> Path:
    raw = json.loads(json.dumps(RAW))
    # wide enough that a save takes a noticeable time, so kills land inside saves too
    raw["model"].update(hidden=64, ffn=256, heads=4, vocab_size=4096)
    raw["growth"]["stages"] = [{"at_step": 8, "ffn": 512}, {"at_step": 14, "layers": 3}]
    raw["train"].update(save_interval=1, keep_checkpoints=2, checkpoint_format="sharded", **train)
    path.write_text(json.dumps(raw))
    return path


def _cli_and_reference(tmp_path: Path) -> tuple[list[str], dict]:
    """msg-train's command line for the kill tests' config, its environment, and the uninterrupted
    run of it in ``tmp_path/ref``."""
    cfg = _write_cfg(tmp_path / "run.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "megatron_msg.cli.train", str(cfg), "--no-progress"]
    subprocess.run(cmd + ["--out-dir", str(tmp_path / "ref")], check=True, env=env, capture_output=True)
    return cmd, env


def _losses(out: Path) -> dict:
    recs = [r for _, r in iter_jsonl(out / "metrics.jsonl", torn_tail_ok=True, warn=lambda m: None)]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


@pytest.mark.slow
def test_kill_9_at_random_moments_never_leaves_a_partial_checkpoint_taken_as_complete(tmp_path):
    cmd, env = _cli_and_reference(tmp_path)
    out, rng = tmp_path / "killed", random.Random(0)
    kills = inside_a_save = 0
    # Start (or resume), kill -9, look at what is on disk; until at least three kills have landed
    # inside a save (a new .tmp-* directory left behind).  Every other kill is aimed at the moment a
    # save's temporary directory appears (sharded saves are short: random kills alone hit few).
    def temporaries() -> set[str]:
        return {p.name for p in (out / "checkpoints").glob(".tmp-*")}

    while (inside_a_save < 3 or kills < 5) and kills < 30:
        left = temporaries()  # by an earlier kill (the next start removes them)
        proc = subprocess.Popen(cmd + ["--out-dir", str(out)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        target = min(22, max(_losses(out), default=0) + 1 + kills % 3) if (out / "metrics.jsonl").exists() else 1
        deadline = time.time() + 60
        if kills % 2:  # aimed
            while time.time() < deadline and proc.poll() is None and not (temporaries() - left):
                time.sleep(0.0005)
        else:  # at a random moment after the target step
            while time.time() < deadline and proc.poll() is None and not (
                    (out / "metrics.jsonl").exists() and max(_losses(out), default=-1) >= target):
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.2))  # a save (every step) takes about 0.05 s here
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        inside_a_save += bool(temporaries() - left)
        found = find_latest(out)
        if found.path is not None:
            assert checkpoint_damage(found.path) is None and found.damaged == []
            open_checkpoint(found.path).model["embed.tok.weight"]  # noqa: B018 - readable, checksum matches
    assert inside_a_save >= 3
    subprocess.run(cmd + ["--out-dir", str(out)], check=True, env=env, capture_output=True)
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert _losses(out) == _losses(tmp_path / "ref")


@pytest.mark.slow
def test_sigterm_then_sigkill_during_the_shutdown_save_leaves_a_resumable_run(tmp_path):
    cmd, env = _cli_and_reference(tmp_path)
    out = tmp_path / "preempted"
    for grace in (0.05, 0.5, 3.0):  # a scheduler's preemption: SIGTERM, then SIGKILL after a grace period
        proc = subprocess.Popen(cmd + ["--out-dir", str(out)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and
                                              max(_losses(out), default=-1) >= 3 + 4 * grace):
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        time.sleep(grace)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        found = find_latest(out)
        assert found.path is not None and checkpoint_damage(found.path) is None
    subprocess.run(cmd + ["--out-dir", str(out)], check=True, env=env, capture_output=True)
    assert _losses(out) == _losses(tmp_path / "ref")


@pytest.mark.slow
def test_kill_9_during_msg_grow_leaves_no_partial_output_and_a_rerun_completes(tmp_path):
    cfg = _write_cfg(tmp_path / "run.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "megatron_msg.cli.train", str(cfg), "--no-progress"]
    subprocess.run(train + ["--out-dir", str(tmp_path / "small"), "--max-steps", "8"], check=True, env=env,
                   capture_output=True)
    grow = [sys.executable, "-m", "megatron_msg.cli.grow", str(cfg), "--from", str(tmp_path / "small"),
            "--out-dir", str(tmp_path / "grown")]
    rng = random.Random(1)
    for _ in range(3):
        proc = subprocess.Popen(grow, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.5, 3.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if any((tmp_path / "grown" / "checkpoints").glob("step_*")):
            assert checkpoint_damage(tmp_path / "grown" / "checkpoints" / "step_00000008") is None
            break
    else:
        assert subprocess.run(grow, env=env, capture_output=True).returncode == 0  # the rerun is not refused
    subprocess.run(train + ["--out-dir", str(tmp_path / "grown")], check=True, env=env, capture_output=True)
    subprocess.run(train + ["--out-dir", str(tmp_path / "live")], check=True, env=env, capture_output=True)
    assert {s: v for s, v in _losses(tmp_path / "live").items() if s >= 8} == \
        {s: v for s, v in _losses(tmp_path / "grown").items() if s >= 8}


@pytest.mark.slow
def test_kill_9_during_msg_reshard_leaves_no_partial_output_and_a_rerun_completes(tmp_path):
    cfg = _write_cfg(tmp_path / "run.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "megatron_msg.cli.train", str(cfg), "--no-progress", "--out-dir",
                    str(tmp_path / "src"), "--max-steps", "10"], check=True, env=env, capture_output=True)
    reshard = [sys.executable, "-m", "megatron_msg.cli.reshard", str(tmp_path / "src"), "--out-dir",
               str(tmp_path / "out"), "--tp", "2", "--dp", "2", "--zero", "1", "--no-progress"]
    rng, ckpts = random.Random(2), tmp_path / "out" / "checkpoints"
    inside = attempts = 0
    while inside < 2 and attempts < 10:  # kill -9 at a random moment after the reshard has begun writing
        attempts += 1
        proc = subprocess.Popen(reshard, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline and not (ckpts.is_dir() and any(ckpts.glob(".tmp-*"))):
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.2))  # the writing takes about half a second here
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = sorted(ckpts.glob("step_*"))
        if done:  # it finished before the kill: complete, never partial; start over
            assert checkpoint_damage(done[0]) is None
            shutil.rmtree(tmp_path / "out")
            continue
        inside += 1
        assert find_latest(tmp_path / "out").path is None  # a .tmp-* at most, never taken as a checkpoint
    assert inside >= 2
    assert subprocess.run(reshard, env=env, capture_output=True).returncode == 0  # the rerun is not refused
    assert not list(ckpts.glob(".tmp-*"))
    src, out = open_checkpoint(latest_checkpoint(tmp_path / "src")), open_checkpoint(latest_checkpoint(tmp_path / "out"))
    for name in src.model:
        assert torch.equal(src.model[name], out.model[name]), name
