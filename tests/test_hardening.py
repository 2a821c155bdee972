"""Failing fast and in one line (issue 18, the parts built so far): a hung rank becomes an error on the
others within parallel.timeout_s, a config error is reported once per launch, missing inputs and an
unwritable run directory are found before any training."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_msg.cli.train import main as msg_train
from megatron_msg.config import ConfigError, load_config

RAW = {
    "model": {"arch": "gpt", "hidden": 16, "ffn": 32, "heads": 2, "layers": 2, "head_dim": 8, "seq_len": 16},
    "lr": {"warmup_steps": 2},
    "train": {"steps": 400, "batch_size": 2, "grad_accum": 2, "log_interval": 1, "eval_interval": 1000,
              "save_interval": 1000, "tensorboard": False, "plot": False, "device": "cpu"},
}


def _free_port() -> str:
    from tests.dist_harness import free_port
    return str(free_port())


def _torchrun(tmp_path, raw, nproc=2, extra=()):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps(raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           _free_port(), "-m", "megatron_msg.cli.train", str(cfg), "--out-dir", str(tmp_path / "run"),
           "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def _worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank (a child of the launcher)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.slow
def test_a_hung_rank_is_a_one_line_error_on_the_other_rank_within_the_timeout(tmp_path):
    raw = json.loads(json.dumps(RAW))
    raw["parallel"] = {"dp": 2, "timeout_s": 6}
    proc = _torchrun(tmp_path, raw)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    hung = _worker_pid(proc.pid, 1)
    assert hung is not None
    lines: list[tuple[float, str]] = []  # stderr lines as they arrive, with the time
    reader = threading.Thread(target=lambda: lines.extend((time.time(), ln) for ln in proc.stderr), daemon=True)
    reader.start()
    os.kill(hung, signal.SIGSTOP)  # rank 1 stops answering, as a hung GPU or a stuck filesystem would
    stopped_at = time.time()
    report = "msg-train: rank 0: a collective failed"
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any(ln.startswith(report) for _, ln in list(lines)):
            time.sleep(0.05)
    finally:  # the launcher would wait its SIGTERM grace period (30 s) for the stopped rank: end it now
        try:
            os.kill(hung, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    reader.join(timeout=10)
    when, line = next((t, ln) for t, ln in lines if ln.startswith(report))
    assert "another rank is hung or has died" in line and "parallel.timeout_s=6" in line
    assert when - stopped_at < 6 + 5, when - stopped_at  # within the timeout (plus the step it was in)
    assert not any("Traceback" in ln for t, ln in lines if t <= when)  # the report is the line, not a traceback
    assert proc.returncode != 0


@pytest.mark.slow
def test_a_config_error_is_reported_once_per_launch(tmp_path):
    raw = json.loads(json.dumps(RAW))
    raw["parallel"] = {"dp": 2}
    raw["growth"] = {"stages": [{"at_step": 10, "hidden": 8}]}
    proc = _torchrun(tmp_path, raw)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count("msg-train: config error: growth.stages[0].hidden") == 1, err[-2000:]


def test_a_config_error_only_one_rank_sees_is_reported_by_that_rank(tmp_path, capsys):
    """Rank 0 may not share the failure (a file missing on another node): the rank waits out the grace
    period that lets rank 0 speak for the launch, then names itself, and never exits silently."""
    import argparse
    from megatron_msg.cli.train import _load_config_on_rank
    args = argparse.Namespace(config=None, overrides=[f"data.path={tmp_path}/missing.jsonl"])
    started = time.monotonic()
    assert _load_config_on_rank(args, rank=3, grace_s=0.2) is None
    assert time.monotonic() - started >= 0.2
    err = capsys.readouterr().err
    assert err.startswith("msg-train: rank 3: config error: data.path: no such file") and err.count("\n") == 1
    assert _load_config_on_rank(args, rank=0) is None  # rank 0 reports at once, without a rank
    assert capsys.readouterr().err.startswith("msg-train: config error: data.path: no such file")


def test_timeout_s_is_validated():
    with pytest.raises(ConfigError, match=r"^parallel.timeout_s: must be > 0 seconds"):
        load_config(None, ["parallel.timeout_s=0"])


def test_a_missing_jsonl_corpus_fails_validation(tmp_path, capsys):
    assert msg_train(["--set", f"data.path={tmp_path}/nope.jsonl", "--validate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msg-train: config error: data.path: no such file") and err.count("\n") == 1


def test_an_unwritable_run_directory_is_found_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    argv = ["--set", "train.tensorboard=false", "--out-dir", str(blocker / "run"),
            "--no-progress"]
    assert msg_train(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("msg-train: config error: train.out_dir: cannot write to") and err.count("\n") == 1


def _write_raw(tmp_path, raw, name="run.yaml") -> str:
    import yaml
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _tiny_run(tmp_path, **data) -> dict:
    raw = json.loads(json.dumps(RAW))
    raw["train"].update(steps=4, eval_interval=4, eval_iters=1, batch_size=2, grad_accum=1)
    raw["data"] = data
    return raw


def _indexed_corpus(tmp_path) -> str:
    from megatron_msg.data.preprocessing import PreprocessConfig, preprocess_jsonl
    from megatron_msg.training.batches import BUNDLED_CORPUS
    stats = preprocess_jsonl(PreprocessConfig(inputs=[str(BUNDLED_CORPUS)], output_prefix=str(tmp_path / "c"),
                                              tokenizer="byte", progress=False))
    return stats.prefix


def _cut(path: Path, size: int) -> None:
    with path.open("r+b") as fh:
        fh.truncate(size)


def _bad_magic(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:9] = b"XXXXXXXXX"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    ("bad_json", r"c\.jsonl:2: malformed JSON"),
    ("no_text_key", r"c\.jsonl:1: no 'text' field \(set data\.text_key\)"),
    ("empty", r"c\.jsonl: no documents"),
    ("cut_bin", r"c_text_document\.bin: \d+ bytes, but .*c_text_document\.idx describes \d+ bytes"),
    ("cut_idx", r"c_text_document\.idx: \d+ bytes, but its header promises"),
    ("bad_magic", r"c_text_document\.idx: bad magic"),
])
def test_a_damaged_corpus_is_one_line_and_exit_2_at_training_start(tmp_path, capsys, damage, message):
    """Data that passed --validate (the files exist) but cannot be read as training data: before,
    a 20-line traceback and exit 1 from inside the dataset code."""
    import re
    if damage in ("bad_json", "no_text_key", "empty"):
        corpus = tmp_path / "c.jsonl"
        corpus.write_text({"bad_json": '{"text": "fine"}\n{"text": cut',
                           "no_text_key": '{"body": "x"}\n', "empty": "\n\n"}[damage])
        raw = _tiny_run(tmp_path, path=str(corpus))
    else:
        prefix = Path(_indexed_corpus(tmp_path))
        if damage == "cut_bin":
            _cut(prefix.with_suffix(".bin"), 1000)
        elif damage == "cut_idx":
            _cut(prefix.with_suffix(".idx"), 100)
        else:
            _bad_magic(prefix.with_suffix(".idx"))
        raw = _tiny_run(tmp_path, path=str(prefix), format="indexed")
    out_dir = tmp_path / "run"
    assert msg_train([_write_raw(tmp_path, raw), "--out-dir", str(out_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("msg-train: data error: "), err
    assert re.search(message, err), err
    assert not out_dir.exists()  # refused before anything was written


HUGE = {"hidden": 16384, "ffn": 65536, "heads": 128, "layers": 96}  # ~100B parameters: 4.6 TB of fp32 state


def test_a_model_that_cannot_fit_is_refused_before_it_is_built(tmp_path, capsys):
    raw = _tiny_run(tmp_path)
    raw["model"].update(HUGE, head_dim=128)
    out_dir = tmp_path / "run"
    t0 = time.perf_counter()
    assert msg_train([_write_raw(tmp_path, raw), "--out-dir", str(out_dir), "--no-progress"]) == 2
    assert time.perf_counter() - t0 < 60  # before: built until the allocator failed
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("msg-train: config error: train.memory_check: start (step 0, (h=16384, ffn=65536, "
                          "heads=128, L=96)) needs ~"), err
    assert "per rank, but this host has" in err and "train.memory_check=false" in err
    assert not out_dir.exists()


def test_a_growth_stage_that_cannot_fit_is_refused_at_the_start_of_the_run(tmp_path, capsys):
    """The late failure this check exists for: a stage hours into the run that would not fit."""
    raw = _tiny_run(tmp_path)
    raw["train"]["steps"] = 400
    raw["model"]["head_dim"] = 128
    raw["growth"] = {"defaults": {"phi": 10}, "stages": [{"at_step": 100, "ffn": 64}, {"at_step": 300, **HUGE}]}
    assert msg_train([_write_raw(tmp_path, raw), "--out-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msg-train: config error: train.memory_check: stage 1 (step 300, "), err


def test_the_memory_check_counts_only_stages_still_to_run_and_each_pipeline_rank_once():
    from megatron_msg.training.memory_check import MemoryEstimateError, check_memory, rank_memory_bytes, stages_to_run
    cfg = load_config(None, ["model.head_dim=8", "model.hidden=16", "model.ffn=32", "model.heads=2", "model.layers=2",
                             "train.steps=100", "lr.warmup_steps=5", "growth.stages=[{at_step: 50, ffn: 4096, phi: 10}]"])
    needs = stages_to_run(cfg, 0)
    assert [n.plan.name for n in needs] == ["start", "stage 0"] and needs[1].bytes > needs[0].bytes
    assert [n.plan.name for n in stages_to_run(cfg, 60)] == ["stage 0"]
    check_memory(cfg, 0, needs[1].bytes, "x")  # exactly enough
    with pytest.raises(MemoryEstimateError, match=r"^train.memory_check: stage 0 \(step 50"):
        check_memory(cfg, 60, needs[1].bytes - 1, "x")
    with pytest.raises(MemoryEstimateError, match=r"^train.memory_check: start \(step 0"):
        check_memory(cfg, 0, needs[0].bytes - 1, "x")
    check_memory(cfg, 0, None, "x")  # unknown memory: nothing to check against
    # pp > 1: the first stage's activations and the last stage's logits sit on different ranks
    pp = load_config(None, ["model.layers=4", "parallel.pp=2"])
    plan = stages_to_run(pp, 0)[0].plan
    parts = plan.memory_bytes
    state = parts["weights"] + parts["gradients"] + parts["optimizer"]
    assert rank_memory_bytes(plan) == state + max(parts["activations"], parts["logits"])


def test_memory_check_false_skips_the_estimate(tmp_path, monkeypatch):
    import megatron_msg.training.trainer as trainer_module
    from megatron_msg.training.trainer import Trainer
    seen = []
    monkeypatch.setattr(trainer_module, "check_memory", lambda *a: seen.append(a))
    raw = _tiny_run(tmp_path)
    for flag in (False, True):
        raw["train"]["memory_check"] = flag
        Trainer(load_config(_write_raw(tmp_path, raw)), out_dir=tmp_path / f"run{flag}", progress=False)
    assert len(seen) == 1 and seen[0][1] == 0  # only the checked run, from step 0


def test_removed_on_failure_takes_back_only_what_the_failed_command_added(tmp_path):
    from megatron_msg.cli.outputs import removed_on_failure
    new = tmp_path / "new"
    with pytest.raises(RuntimeError), removed_on_failure(new):
        (new / "checkpoints" / ".tmp-step_1").mkdir(parents=True)
        raise RuntimeError("a damaged source met halfway")
    assert not new.exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("the user's")
    with pytest.raises(KeyboardInterrupt), removed_on_failure(old):
        (old / "weights.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt
    assert sorted(p.name for p in old.iterdir()) == ["notes.txt"]
    with removed_on_failure(new):  # success keeps everything
        new.mkdir()
    assert new.is_dir()


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A tiny run stopped at step 4 with checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("stopped")
    raw = json.loads(json.dumps(RAW))
    raw["train"].update(steps=6, save_interval=2, eval_interval=3, eval_iters=1, grad_accum=1)
    config = _write_raw(root, raw)
    assert msg_train([config, "--out-dir", str(root / "run"), "--max-steps", "4", "--no-progress"]) == 0
    return config, root / "run"


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_failed_reshard_leaves_no_output(stopped_run, tmp_path, capsys):
    """Found by tests/test_cli_property.py: a checksum mismatch met while writing left the new run
    directory holding a checkpoints/.tmp-* directory."""
    import shutil
    from megatron_msg.cli.reshard import main as msg_reshard
    _, run = stopped_run
    shutil.copytree(run, tmp_path / "run")
    shard = next((tmp_path / "run" / "checkpoints" / "step_00000004").rglob("*.distcp"))
    _flip_middle(shard)
    out = tmp_path / "out"
    assert msg_reshard([str(tmp_path / "run"), "--out-dir", str(out), "--dp", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msg-reshard: ") and "checksum" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_metrics_record_that_is_not_an_object_is_one_line_at_resume(stopped_run, tmp_path, capsys):
    """Found by tests/test_cli_property.py: `[]` in metrics.jsonl was an AttributeError at resume."""
    import shutil
    config, run = stopped_run
    shutil.copytree(run, tmp_path / "run")
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(["[]"] + lines[1:]) + "\n")
    assert msg_train([config, "--out-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl:1: not a metrics record (a JSON object), got list" in err, err


@pytest.mark.parametrize("record, message", [
    ('{"kind": "train", "loss": 1.0}', "a 'train' record without 'step'"),
    ('{"kind": "valid", "step": "7", "loss": 1.0}', "step is '7', not a number"),
])
def test_metrics_records_with_missing_or_mistyped_fields_are_one_line(tmp_path, record, message):
    from megatron_msg.metrics_file import iter_metrics
    from megatron_msg.training.metrics import MetricsError
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 0, "loss": 2.0}\n' + record + "\n" + '{"kind": "train", "step": 2}')
    with pytest.raises(MetricsError, match=rf"metrics.jsonl:2: {message}"):
        list(iter_metrics(path, MetricsError))


def test_a_data_sidecar_that_is_not_an_object_is_a_data_error(tmp_path, capsys):
    """Found by tests/test_cli_property.py: a .meta.json holding `[]` was an AttributeError."""
    prefix = Path(_indexed_corpus(tmp_path))
    prefix.with_suffix(".meta.json").write_text("[]\n")
    raw = _tiny_run(tmp_path, path=str(prefix), format="indexed")
    assert msg_train([_write_raw(tmp_path, raw), "--out-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msg-train: data error: ") and "meta.json: expected a JSON object, got list" in err, err
