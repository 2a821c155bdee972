"""Peak extra CPU memory of one checkpoint save, and of the resume that reads it back.

Builds a trainer for a GPT of the given shape (bundled corpus, one process), trains one
step (so the AdamW moments exist), then in the same process measures the growth of the
peak resident set (VmHWM) caused by ``Trainer.save()``; a second process measures
the growth caused by resuming from that checkpoint (model + optimizer construction are
included there, since that is what a resume costs).  Prints one JSON line.

    python tools/checkpoint_memory.py --hidden 768 --layers 12 --out /tmp/ckmem

Run it against two checkouts (PYTHONPATH=<checkout>) to compare checkpoint formats.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def _reset_peak() -> float:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); returns the current RSS in MB.

    ``ru_maxrss`` cannot be used: a child inherits its parent's peak across fork and exec.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _extra_peak_mb(start: float) -> float:
    return _status_mb("VmHWM") - start


def _config(a: argparse.Namespace):
    from megatron_msg.config import config_from_dict
    return config_from_dict({
        "model": {"arch": "gpt", "hidden": a.hidden, "ffn": 4 * a.hidden, "heads": a.hidden // 64,
                  "head_dim": 64, "layers": a.layers, "seq_len": 64},
        "lr": {"warmup_steps": 1},
        "train": {"steps": 2, "batch_size": 2, "log_interval": 1, "eval_interval": 1000, "eval_iters": 1,
                  "save_interval": 1000, "device": "cpu", "tensorboard": False, "plot": False},
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--out", default="/tmp/checkpoint_memory")
    p.add_argument("--phase", choices=["save", "resume"], default="save", help=argparse.SUPPRESS)
    a = p.parse_args()
    import torch
    torch.set_num_threads(1)
    from megatron_msg.training.trainer import Trainer
    out = Path(a.out)
    if a.phase == "save":
        shutil.rmtree(out, ignore_errors=True)
        trainer = Trainer(_config(a), out_dir=out, progress=False)
        trainer.train_step(0)  # creates the AdamW moments; no checkpoint yet
        import gc
        gc.collect()
        before = _reset_peak()
        t0 = time.perf_counter()
        trainer.save()
        save_s = time.perf_counter() - t0
        save_extra = _extra_peak_mb(before)
        params = trainer.model.num_parameters()
        res = json.loads(subprocess.run([sys.executable, __file__, "--phase", "resume", "--hidden", str(a.hidden),
                                         "--layers", str(a.layers), "--out", str(out)],
                                        check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(json.dumps({"parameters": params, "state_mb": round(params * 12 / 2 ** 20),
                          "rss_before_save_mb": round(before), "save_extra_mb": round(save_extra), "save_s": round(save_s, 2),
                          **res}))
    else:
        start = _reset_peak()
        t0 = time.perf_counter()
        trainer = Trainer(_config(a), out_dir=out, progress=False)  # resumes from the checkpoint
        resume_s = time.perf_counter() - t0
        assert trainer.step == 0 and trainer.optimizer.named_state(), "did not resume"
        print(json.dumps({"resume_peak_over_start_mb": round(_extra_peak_mb(start)),
                          "resume_rss_after_mb": round(_status_mb("VmRSS") - start),
                          "resume_s": round(resume_s, 2)}))


if __name__ == "__main__":
    main()
