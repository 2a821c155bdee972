"""GPT: pre-LN, causal, learned positions, LM head tied to the token embedding.

MSG masks (DESIGN.md): the embedding output, every LayerNorm, every sublayer
output and the final LayerNorm carry the hidden mask; each layer carries its
own FFN, head and depth masks (see transformer.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_msg.config import ModelConfig
from megatron_msg.model.masked_norm import MaskedLayerNorm
from megatron_msg.model.transformer import MSGTransformerBase, init_weights


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos = nn.Embedding(cfg.seq_len, cfg.hidden)


class GPT(MSGTransformerBase):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, pre_ln=True, causal=True)
        self.embed = Embedding(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.final_ln = MaskedLayerNorm(cfg.hidden, cfg.eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """tokens: [batch, seq] -> logits [batch, seq, vocab] (and mean CE loss if targets)."""
        t = tokens.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence length {t} exceeds model.seq_len={self.cfg.seq_len}")
        c = self.hidden_mask_or_none()
        x = self.embed.tok(tokens) + self.embed.pos(torch.arange(t, device=tokens.device))
        if c is not None:
            x = x * c.to(x.dtype)
        x = self.drop(x)
        for layer in self.layers:
            x = layer(x, c)
        x = self.final_ln(x, c)
        weight = self.embed.tok.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, weight)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss
