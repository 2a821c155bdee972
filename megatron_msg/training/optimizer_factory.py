"""The optimizer a run's config asks for: MSG-aware AdamW, partitioned under ZeRO when asked.

Lives in training/ (not growth/): growth only needs *an* optimizer for the grown model, which
the caller builds (``grow_model(..., new_optimizer=...)``), so growth never depends on how
training partitions its state.
"""
from __future__ import annotations

import torch

from megatron_msg.config import ConfigError, OptimizerConfig
from megatron_msg.model.layout import tensor_spec
from megatron_msg.parallel.topology import ParallelState
from megatron_msg.training.fused_adamw import fused_adamw_available
from megatron_msg.training.optimizer import MSGAdamW
from megatron_msg.training.zero import ZeroAdamW


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, zero_stage: int = 0,
                    ps: ParallelState | None = None,
                    params_dtype: torch.dtype = torch.float32) -> MSGAdamW | ZeroAdamW:
    """AdamW over ``model``'s parameters; with ``zero_stage`` 1 or 2 partitioned over ``ps``'s DP group.

    The ZeRO optimizer makes the parameters views into its flat buffer: build it after
    the model has moved to its device.  ``params_dtype`` bf16/fp16 lowers the (fp32)
    parameters to it and keeps fp32 master weights in the optimizer; values loaded
    into the model afterwards must reach the masters too (``load_model(..., optimizer)``).
    """
    named = list(model.named_parameters())
    device = named[0][1].device if named else torch.device("cpu")
    if cfg.fused and not fused_adamw_available(device):
        raise ConfigError(f"optimizer.fused: this torch ({torch.__version__}) has no fused AdamW kernel for "
                          f"{device.type}; set optimizer.fused: false")
    no_decay = {n for n, _ in named if tensor_spec(n).no_weight_decay}
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                  no_decay=no_decay, params_dtype=params_dtype, fused=cfg.fused)
    if zero_stage:
        return ZeroAdamW(named, ps or ParallelState.single(next(model.parameters()).device), zero_stage, **kwargs)
    return MSGAdamW(named, **kwargs)
