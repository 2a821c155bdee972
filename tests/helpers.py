"""Small shared builders for the tests."""
from __future__ import annotations

import torch

from megatron_msg.config import ModelConfig, Shape
from megatron_msg.growth.apply import grow_model
from megatron_msg.growth.operators import GrowthSpec
from megatron_msg.model import build_model


def tiny_cfg(arch: str, shape: Shape = Shape(32, 64, 4, 2), head_dim: int = 8, **kw) -> ModelConfig:
    return ModelConfig(arch=arch, hidden=shape.hidden, ffn=shape.ffn, heads=shape.heads, layers=shape.layers,
                       head_dim=head_dim, vocab_size=kw.pop("vocab_size", 61), seq_len=kw.pop("seq_len", 12), **kw)


def make_batch(arch: str, cfg: ModelConfig, batch: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = cfg.seq_len
    tokens = torch.randint(0, cfg.vocab_size, (batch, t), generator=g)
    if arch == "gpt":
        return {"tokens": tokens, "targets": torch.randint(0, cfg.vocab_size, (batch, t), generator=g)}
    padding = torch.ones(batch, t, dtype=torch.bool)
    padding[0, t - 3:] = False  # some padding, to exercise the attention mask
    labels = torch.where(torch.rand(batch, t, generator=g) < 0.3, tokens, torch.full_like(tokens, -100))
    return {"tokens": tokens, "token_types": (torch.arange(t) >= t // 2).long().expand(batch, t).contiguous(),
            "padding_mask": padding, "mlm_labels": labels, "nsp_labels": torch.randint(0, 2, (batch,), generator=g)}


def outputs(model, arch: str, batch: dict):
    """(flat logits, loss) of a GPT or BERT model on a batch."""
    if arch == "gpt":
        logits, loss = model(batch["tokens"], batch["targets"])
        return logits.reshape(-1), loss
    out = model(batch["tokens"], batch["token_types"], batch["padding_mask"], batch["mlm_labels"],
                batch["nsp_labels"])
    return torch.cat([out.mlm_logits.reshape(-1), out.nsp_logits.reshape(-1)]), out.loss


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def grown(model, new: Shape, **spec_kw):
    spec = GrowthSpec(old=model.cfg.shape, new=new, head_dim=model.cfg.head_dim, **spec_kw)
    return grow_model(model, spec)


def fresh(arch: str, shape: Shape = Shape(32, 64, 4, 2), **kw):
    return build_model(tiny_cfg(arch, shape, **kw))
