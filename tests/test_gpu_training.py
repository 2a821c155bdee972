"""Training features whose CUDA path differs from the CPU one (skipped without a GPU).

* Activation recomputation replays the CUDA generator (dropout draws from it on a
  GPU, from the CPU generator in the CPU tests): losses must equal a run without
  recomputation bit for bit.
* 16-bit parameters with fp32 masters on the GPU: parameters bf16, checkpointed
  masters fp32, growth function-preserving (up to the rounding of shape-dependent
  cuBLAS kernels; exact on CPU, tests/test_master_weights.py).
"""
from __future__ import annotations

import json

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from megatron_msg.checkpoint.io import latest_checkpoint, open_checkpoint  # noqa: E402
from megatron_msg.config import config_from_dict  # noqa: E402
from megatron_msg.training.trainer import Trainer  # noqa: E402
from tests.test_zero import STEPS, _raw  # noqa: E402


def _cuda(raw: dict, **train) -> dict:
    raw["train"].update(device="cuda", **train)
    raw["model"].update(dropout=0.1, attention_dropout=0.1)
    return raw


def _run(raw, out_dir):
    trainer = Trainer(config_from_dict(raw), out_dir=out_dir, progress=False)
    return trainer, trainer.run()


def test_recomputation_on_cuda_gives_the_same_losses(tmp_path):
    _, ref = _run(_cuda(_raw("gpt")), tmp_path / "none")
    _, got = _run(_cuda(_raw("gpt"), recompute="full"), tmp_path / "full")
    assert len(ref.losses) == STEPS
    assert got.losses == ref.losses


def test_bf16_parameters_on_cuda(tmp_path):
    trainer, result = _run(_cuda(_raw("gpt", "bf16"), params_dtype="bf16", recompute="full"), tmp_path)
    assert result.final_step == STEPS
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    ckpt = open_checkpoint(latest_checkpoint(tmp_path))
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.float().cpu(), ckpt.model[name].bfloat16().float()), name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    growths = [r for r in records if r.get("kind") == "growth"]
    assert len(growths) == 4
    for r in growths:  # cuBLAS may pick another kernel for the grown shapes: rounding, not function
        assert abs(r["loss_after"] - r["loss_before"]) <= 5e-3 * abs(r["loss_before"]), r
