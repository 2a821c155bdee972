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
