"""GPT and BERT with MSG masks."""
from __future__ import annotations

import torch

from megatron_msg.config import ModelConfig
from megatron_msg.model.placement import Placement


def build_model(cfg: ModelConfig, placement: Placement | None = None, seed: int | None = None,
                initialize: bool = True):
    """The model (or this rank's part of it) for ``cfg.arch`` at ``cfg``'s shape.

    Initialisation is a pure function of ``seed`` and each tensor's name
    (model/init.py); ``seed=None`` draws the seed from torch's global generator,
    so ``torch.manual_seed`` still decides a single-device model.
    """
    placement = placement or Placement()
    if cfg.arch == "gpt":
        from megatron_msg.model.gpt import GPT as cls
    elif cfg.arch == "bert":
        from megatron_msg.model.bert import BERT as cls
    else:
        raise ValueError(f"model.arch: unknown architecture {cfg.arch!r}")
    model = cls(cfg, placement)
    if initialize:
        from megatron_msg.model.init import initialize_
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        initialize_(model, seed)
    return model
