"""From-scratch initialisation as a pure function of (seed, tensor name).

Every logical tensor is drawn from its own generator, keyed by the run seed and
its name, following the layout rules (weight ~ N(0, std), bias 0, LayerNorm
weight 1, masks 1).  A sharded model initialises each local tensor by cutting
its block out of the logical one, so a model built at any TP x PP layout is
exactly the single-device model of the same seed, and no rank ever needs more
than one logical tensor in memory at a time.
"""
from __future__ import annotations

import torch

from megatron_msg.checkpoint.shard import shard_tensor
from megatron_msg.config import ModelConfig
from megatron_msg.model.layout import BIAS, LN_WEIGHT, WEIGHT, tensor_spec
from megatron_msg.parallel.random import derive_seed


def initial_tensor(name: str, shape: tuple[int, ...], std: float, seed: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The from-scratch value of ``name`` (growth uses it for new entries, with its own generator)."""
    spec = tensor_spec(name)
    if spec.is_mask or spec.init == LN_WEIGHT:
        return torch.ones(shape)
    if spec.init == BIAS:
        return torch.zeros(shape)
    assert spec.init == WEIGHT, spec.init
    g = generator or torch.Generator().manual_seed(derive_seed(seed, "init", name))
    return torch.randn(shape, generator=g).mul_(std)


def logical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> full shape of every parameter and buffer of the whole model (no memory used)."""
    from megatron_msg.model import build_model
    with torch.device("meta"):
        model = build_model(cfg, initialize=False)
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def logical_num_parameters(cfg: ModelConfig) -> int:
    from megatron_msg.model import build_model
    with torch.device("meta"):
        model = build_model(cfg, initialize=False)
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def initialize_(model: torch.nn.Module, seed: int) -> None:
    """Fill every parameter and buffer of ``model`` (whole or sharded) from the logical init."""
    cfg, placement = model.cfg, model.placement
    shapes = logical_shapes(cfg) if not placement.whole else None
    for name, t in model.state_dict(keep_vars=True).items():
        full_shape = tuple(t.shape) if shapes is None else shapes[name]
        full = initial_tensor(name, full_shape, cfg.init_std, seed)
        local = shard_tensor(name, full, cfg, placement.tp.size, placement.tp.rank)
        t.copy_(local)
