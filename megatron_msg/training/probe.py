"""The growth probe on a checkpoint: the loss of a fixed validation batch, in one process.

Live growth logs ``loss_before`` / ``loss_after`` around every growth (Trainer.grow: the
first validation batch, eval mode).  ``msg-grow --verify`` asks the same of an offline
growth: the probe loss of the checkpoint it reads and of the checkpoint it writes, which
MSG's function preservation makes equal.  The whole model is built on one CPU process in
fp32, so this is for models that fit one machine's memory (rehearsals, small runs); the
growth itself streams one tensor at a time whatever the size.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_msg.checkpoint.io import open_checkpoint
from megatron_msg.checkpoint.logical import load_model
from megatron_msg.config import ModelConfig, RunConfig
from megatron_msg.model import build_model
from megatron_msg.training.trainer import build_batches, model_loss


def probe_batch(cfg: RunConfig) -> dict:
    """The growth probe's batch: validation batch 0 of ``cfg``'s data (what Trainer.grow evaluates)."""
    _, valid = build_batches(cfg)
    return valid.get(0, 0)


@torch.no_grad()
def checkpoint_probe_loss(checkpoint: str | Path, batch: dict) -> float:
    """Loss of ``batch`` (``probe_batch``) under the model in ``checkpoint``, fp32, eval mode."""
    ckpt = open_checkpoint(Path(checkpoint))
    model = build_model(ModelConfig(**ckpt.state["model_config"]), initialize=False, device="cpu")
    model.set_masked(ckpt.state["masked"])
    load_model(model, ckpt.model)
    model.eval()
    return model_loss(model, batch).item()


@torch.no_grad()
def checkpoint_logits(checkpoint: str | Path, batch: dict) -> torch.Tensor:
    """The model's output logits for ``batch`` (GPT: next-token, BERT: MLM), fp32, eval mode."""
    ckpt = open_checkpoint(Path(checkpoint))
    model = build_model(ModelConfig(**ckpt.state["model_config"]), initialize=False, device="cpu")
    model.set_masked(ckpt.state["masked"])
    load_model(model, ckpt.model)
    model.eval()
    if "targets" in batch:
        return model(batch["tokens"])
    return model(batch["tokens"], batch["token_types"], batch["padding_mask"]).mlm_logits
