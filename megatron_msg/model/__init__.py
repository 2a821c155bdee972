"""GPT and BERT with MSG masks."""
from __future__ import annotations

import torch

from megatron_msg.config import ModelConfig
from megatron_msg.model.placement import Placement


def build_model(cfg: ModelConfig, placement: Placement | None = None, seed: int | None = None,
                initialize: bool = True, device: torch.device | str | None = None,
                params_dtype: torch.dtype | None = None):
    """The model (or this rank's part of it) for ``cfg.arch`` at ``cfg``'s shape.

    Initialisation is a pure function of ``seed`` and each tensor's name
    (model/init.py); ``seed=None`` draws the seed from torch's global generator,
    so ``torch.manual_seed`` still decides a single-device model.

    The modules are built on the meta device and each tensor is then allocated
    once, on ``device`` (default: the current default device) and, for the
    parameters, in ``params_dtype`` (default fp32; masks stay fp32).  So a large
    rank's model never exists as a CPU copy or in fp32 on its way to a GPU in
    16-bit.  ``initialize=False`` leaves the values unset (the caller loads them);
    16-bit parameters need it, since their fp32 initial values belong in the
    optimizer's masters (training/optimizer.py).
    """
    placement = placement or Placement()
    if cfg.arch == "gpt":
        from megatron_msg.model.gpt import GPT as cls
    elif cfg.arch == "bert":
        from megatron_msg.model.bert import BERT as cls
    else:
        raise ValueError(f"model.arch: unknown architecture {cfg.arch!r}")
    if params_dtype not in (None, torch.float32) and initialize:
        raise ValueError("build_model: 16-bit params_dtype needs initialize=False "
                         "(initialise in fp32, then let the optimizer take the masters and lower them)")
    device = torch.device(device) if device is not None else torch.get_default_device()
    with torch.device("meta"):
        model = cls(cfg, placement)
    if device.type != "meta":
        _materialize(model, device, params_dtype)
    if initialize:
        from megatron_msg.model.init import initialize_
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        initialize_(model, seed)
    return model


def _materialize(model: torch.nn.Module, device: torch.device, params_dtype: torch.dtype | None) -> None:
    """Allocate every tensor of a meta-built ``model`` on ``device``, one at a time (values unset)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=params_dtype or p.dtype, device=device), p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
