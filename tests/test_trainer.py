"""The trainer: a multi-stage run, exact resume after interruption or SIGKILL, and the CLI."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_msg.checkpoint.io import (FORMAT, LEGACY_FORMAT, CheckpointError, LogicalTensor, latest_checkpoint,
                                        open_checkpoint, save_checkpoint)
from megatron_msg.config import Shape, config_from_dict
from megatron_msg.training.trainer import Trainer

RAW = {
    "model": {"arch": "gpt", "hidden": 16, "ffn": 32, "heads": 2, "layers": 1, "head_dim": 8, "seq_len": 16},
    "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
    "lr": {"warmup_steps": 5},
    "train": {"steps": 48, "batch_size": 4, "log_interval": 1, "eval_interval": 16, "eval_iters": 1,
              "save_interval": 7, "tensorboard": False, "plot": False},
    "growth": {"defaults": {"phi": 6}, "stages": [
        {"at_step": 8, "ffn": 48, "rewind_lr": True},
        {"at_step": 16, "layers": 3, "depth_init": "copy"},
        {"at_step": 24, "hidden": 24},
        {"at_step": 32, "heads": 3, "init": "copy"},
    ]},
}


def _cfg(arch="gpt", checkpoint_format="sharded"):
    raw = json.loads(json.dumps(RAW))
    raw["model"]["arch"] = arch
    raw["train"]["checkpoint_format"] = checkpoint_format
    return config_from_dict(raw)


@pytest.fixture(scope="module", params=["gpt", "bert"])
def reference(request, tmp_path_factory):
    arch = request.param
    out = tmp_path_factory.mktemp(f"ref_{arch}")
    res = Trainer(_cfg(arch), out_dir=out, progress=False).run()
    return arch, res


def test_full_schedule_grows_every_dimension_and_preserves_loss(reference):
    arch, res = reference
    assert res.final_step == 48 and res.shape == Shape(24, 48, 3, 3)
    records = [json.loads(line) for line in (res.out_dir / "metrics.jsonl").read_text().splitlines()]
    growth = [r for r in records if r["kind"] == "growth"]
    assert [g["step"] for g in growth] == [8, 16, 24, 32]
    for g in growth:  # function preservation, live in the run
        assert abs(g["loss_after"] - g["loss_before"]) <= 1e-5 * abs(g["loss_before"])
    masks = {r["step"]: r["mask"] for r in records if r["kind"] == "train"}
    assert [masks[s] for s in range(24, 30)] == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    assert masks[23] is None and masks[30] is None  # ramp over: masks removed
    assert res.losses[47] < res.losses[0]


@pytest.mark.parametrize("stop_after", [12, 20, 27, 31])  # mid-ramp, mid-stage, mid-ramp, just before a growth
def test_resume_reproduces_the_uninterrupted_losses(reference, tmp_path, stop_after):
    arch, ref = reference
    cfg = _cfg(arch)
    first = Trainer(cfg, out_dir=tmp_path, progress=False).run(max_steps=stop_after)
    assert first.final_step == stop_after
    assert latest_checkpoint(tmp_path).name == f"step_{stop_after:08d}"
    second = Trainer(cfg, out_dir=tmp_path, progress=False).run()
    assert second.final_step == 48
    for step in range(stop_after, 48):
        assert second.losses[step] == ref.losses[step], step  # bit-identical
    assert second.valid_losses == {s: v for s, v in ref.valid_losses.items() if s >= stop_after}


def test_checkpoint_holds_masks_ramp_and_optimizer_mid_ramp(tmp_path):
    Trainer(_cfg(), out_dir=tmp_path, progress=False).run(max_steps=27)
    ckpt = open_checkpoint(latest_checkpoint(tmp_path))
    state = ckpt.state
    assert state["ramp"] == {"start_step": 24, "phi": 6} and state["masked"]
    hm = ckpt.model["hidden_mask"]
    assert torch.equal(hm[16:], torch.full((8,), 2 / 6)) and hm[:16].eq(1).all()
    opt = ckpt.optimizer["layers.0.mlp.fc1.weight"]
    assert opt["exp_avg"].shape == opt["exp_avg_sq"].shape == (48, 24)
    assert opt["step_offset"] is not None and opt["step"] == 27  # grown at step 8 and 24: per-entry offsets
    assert "hidden_mask" not in ckpt.optimizer  # masks are buffers: no optimizer state
    assert state["step"] == 27 and state["stage_index"] == 3


def test_checkpoint_is_one_directory_per_tensor_and_a_small_state_file(tmp_path):
    """The universal-checkpoint-like layout: tensors/<name>/{fp32,exp_avg,exp_avg_sq}.pt, no tensor in state.pt."""
    trainer = Trainer(_cfg(checkpoint_format="logical"), out_dir=tmp_path, progress=False)
    trainer.run(max_steps=10)
    root = latest_checkpoint(tmp_path)
    names = {p.name for p in (root / "tensors").iterdir()}
    assert names == set(trainer.model.state_dict())
    fc1 = root / "tensors" / "layers.0.mlp.fc1.weight"
    assert {p.name for p in fc1.iterdir()} == {"fp32.pt", "exp_avg.pt", "exp_avg_sq.pt", "step_offset.pt"}
    assert {p.name for p in (root / "tensors" / "hidden_mask").iterdir()} == {"fp32.pt"}
    state = torch.load(root / "state.pt", weights_only=True)
    assert state["format"] == FORMAT

    def tensors_in(obj):
        if torch.is_tensor(obj):
            return 1
        if isinstance(obj, dict):
            return sum(tensors_in(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(tensors_in(v) for v in obj)
        return 0
    assert tensors_in(state) == 0
    assert torch.equal(torch.load(fc1 / "fp32.pt", weights_only=True),
                       trainer.model.state_dict()["layers.0.mlp.fc1.weight"])


def test_checkpoint_writes_each_tensor_as_it_arrives(tmp_path):
    """save_checkpoint consumes the stream lazily: tensor k is on disk before tensor k+1 is asked for,
    which is what lets a rank gather, write and drop one logical tensor at a time."""
    seen = []

    def stream():
        for i in range(3):
            if i:
                tmp = next((tmp_path / "checkpoints").glob(".tmp-step_*"))
                assert (tmp / "tensors" / f"t{i - 1}" / "fp32.pt").is_file()
            seen.append(i)
            yield LogicalTensor(f"t{i}", torch.full((2,), float(i)), None)

    path = save_checkpoint(tmp_path, 5, {"step": 5}, {}, keep=2, tensors=stream())
    assert seen == [0, 1, 2]
    ckpt = open_checkpoint(path)
    assert list(ckpt.model) == ["t0", "t1", "t2"] and torch.equal(ckpt.model["t2"], torch.full((2,), 2.0))
    assert len(ckpt.optimizer) == 0


def test_first_format_checkpoint_still_resumes(tmp_path):
    """A checkpoint of the first format (every tensor in one state.pt) resumes to the same losses."""
    cfg = _cfg(checkpoint_format="logical")
    ref = Trainer(cfg, out_dir=tmp_path / "ref", progress=False).run(max_steps=30)
    Trainer(cfg, out_dir=tmp_path / "old", progress=False).run(max_steps=27)
    root = latest_checkpoint(tmp_path / "old")
    ckpt = open_checkpoint(root)
    legacy = {**ckpt.state, "format": LEGACY_FORMAT, "model": dict(ckpt.model), "optimizer": dict(ckpt.optimizer)}
    import shutil
    shutil.rmtree(root / "tensors")
    (root / "manifest.json").unlink()  # the first format had none
    torch.save(legacy, root / "state.pt")
    res = Trainer(cfg, out_dir=tmp_path / "old", progress=False).run(max_steps=3)
    assert res.final_step == 30
    assert all(res.losses[s] == ref.losses[s] for s in range(27, 30))


def test_checkpoint_that_does_not_match_the_schedule_is_refused(tmp_path):
    Trainer(_cfg(), out_dir=tmp_path, progress=False).run(max_steps=20)
    raw = json.loads(json.dumps(RAW))
    raw["growth"]["stages"][1]["layers"] = 2
    with pytest.raises(CheckpointError, match="does not match the config's schedule"):
        Trainer(config_from_dict(raw), out_dir=tmp_path, progress=False)


def _write_cfg(path: Path, steps: int) -> Path:
    raw = json.loads(json.dumps(RAW))
    raw["train"]["steps"] = steps
    raw["train"]["save_interval"] = 5
    import yaml
    path.write_text(yaml.safe_dump(raw))
    return path


def _train_losses(out: Path) -> dict:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


@pytest.mark.slow
def test_sigkill_at_an_arbitrary_moment_then_resume(tmp_path):
    cfg = _write_cfg(tmp_path / "run.yaml", steps=48)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "megatron_msg.cli.train", str(cfg), "--no-progress"]
    subprocess.run(cmd + ["--out-dir", str(tmp_path / "ref")], check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out-dir", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill somewhere after the second growth, mid-run
        if (out / "metrics.jsonl").exists() and max(_train_losses(out), default=-1) >= 21:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(out) is not None
    subprocess.run(cmd + ["--out-dir", str(out)], check=True, env=env, capture_output=True)
    assert _train_losses(out) == _train_losses(tmp_path / "ref")


@pytest.mark.slow
def test_readme_demo_command_runs_end_to_end(tmp_path):
    """The README's demo (`msg-train`, bundled config) shortened: 4 growth events, loss plot written."""
    exe = Path(sys.executable).with_name("msg-train")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "megatron_msg.cli.train"]
    out = tmp_path / "demo"
    proc = subprocess.run(cmd + ["--out-dir", str(out), "--set", "train.steps=700", "--set", "train.batch_size=4",
                                 "--set", "train.eval_iters=1", "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "final shape (h=96, ffn=256, heads=6, L=6)" in proc.stdout
    assert (out / "loss_curve.png").stat().st_size > 10_000
    growth = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "growth"]
    assert len(growth) >= 4
    shapes = [Shape(16 * 2, 64, 2, 2)] + [_parse_shape(g["shape"]) for g in growth]
    grown_dims = {d for a, b in zip(shapes, shapes[1:]) for d in b.grows_from(a)}
    assert grown_dims == {"hidden", "ffn", "heads", "layers"}


def _parse_shape(text: str) -> Shape:
    import re
    return Shape(*map(int, re.findall(r"=(\d+)", text)))


def test_cli_rejects_a_bad_config_with_the_field_name(tmp_path, capsys):
    from megatron_msg.cli.train import main
    p = tmp_path / "bad.yaml"
    p.write_text("growth: {stages: [{at_step: 10, hidden: 8}]}\n")
    assert main([str(p), "--validate"]) == 2
    assert "growth.stages[0].hidden" in capsys.readouterr().err


def test_training_reads_a_megatron_indexed_dataset(tmp_path):
    """msg-preprocess output (.bin/.idx) feeds the trainer; the run grows and resumes as usual."""
    from megatron_msg.cli.preprocess import main as preprocess
    from megatron_msg.training.batches import BUNDLED_CORPUS
    assert preprocess(["--input", str(BUNDLED_CORPUS), "--output-prefix", str(tmp_path / "corpus"),
                       "--tokenizer", "byte", "--workers", "1", "--no-progress"]) == 0
    raw = json.loads(json.dumps(RAW))
    raw["data"] = {"format": "indexed", "path": str(tmp_path / "corpus_text_document"), "splits": "90,10,0"}
    raw["train"]["steps"] = 20
    raw["growth"]["stages"] = raw["growth"]["stages"][:2]
    cfg = config_from_dict(raw)
    ref = Trainer(cfg, out_dir=tmp_path / "a", progress=False).run()
    assert ref.shape == Shape(16, 48, 2, 3)
    Trainer(cfg, out_dir=tmp_path / "b", progress=False).run(max_steps=11)
    res = Trainer(cfg, out_dir=tmp_path / "b", progress=False).run()
    assert all(res.losses[s] == ref.losses[s] for s in range(11, 20))
