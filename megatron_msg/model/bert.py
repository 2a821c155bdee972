"""BERT: post-LN encoder with token types, an MLM head (tied decoder) and an NSP head.

MSG masks (DESIGN.md): every LayerNorm (embedding LN, the two per layer, the MLM
transform LN) is a masked LN, which both ignores and zeroes new hidden units, so
post-LN needs no other hidden mask, except after the pooler's tanh, whose new
rows would otherwise leak into the NSP classifier (eq. 10-12: mask after the
activation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_msg.config import ModelConfig
from megatron_msg.model.masked_norm import MaskedLayerNorm
from megatron_msg.model.transformer import ACTIVATIONS, MSGTransformerBase, init_weights

IGNORE_INDEX = -100


@dataclass
class BertOutput:
    mlm_logits: torch.Tensor
    nsp_logits: torch.Tensor
    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None


class BertEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.ln = MaskedLayerNorm(cfg.hidden, cfg.eps)


class MLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.ln = MaskedLayerNorm(cfg.hidden, cfg.eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))


class Pooler(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)


class BERT(MSGTransformerBase):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, pre_ln=False, causal=False)
        self.embed = BertEmbedding(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.mlm = MLMHead(cfg)
        self.pooler = Pooler(cfg)
        self.nsp = nn.Linear(cfg.hidden, 2)
        self.act = ACTIVATIONS[cfg.activation]
        init_weights(self, cfg.init_std)

    def forward(self, tokens: torch.Tensor, token_types: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None,
                nsp_labels: torch.Tensor | None = None) -> BertOutput:
        """tokens/token_types/mlm_labels: [batch, seq]; padding_mask: bool [batch, seq], True = real token."""
        b, t = tokens.shape
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence length {t} exceeds model.seq_len={self.cfg.seq_len}")
        c = self.hidden_mask_or_none()
        if token_types is None:
            token_types = torch.zeros_like(tokens)
        x = (self.embed.tok(tokens) + self.embed.pos(torch.arange(t, device=tokens.device))
             + self.embed.token_type(token_types))
        x = self.drop(self.embed.ln(x, c))
        attn_mask = None if padding_mask is None else padding_mask[:, None, None, :]
        for layer in self.layers:
            x = layer(x, c, attn_mask)

        h = self.mlm.ln(self.act(self.mlm.dense(x)), c)
        mlm_logits = F.linear(h, self.embed.tok.weight, self.mlm.bias)
        pooled = torch.tanh(self.pooler.dense(x[:, 0]))
        if c is not None:
            pooled = pooled * c.to(pooled.dtype)
        nsp_logits = self.nsp(pooled)

        out = BertOutput(mlm_logits, nsp_logits)
        if mlm_labels is not None:
            out.mlm_loss = F.cross_entropy(mlm_logits.float().view(-1, mlm_logits.shape[-1]),
                                           mlm_labels.reshape(-1), ignore_index=IGNORE_INDEX)
            out.loss = out.mlm_loss
        if nsp_labels is not None:
            out.nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_labels)
            out.loss = out.nsp_loss if out.loss is None else out.loss + out.nsp_loss
        return out
