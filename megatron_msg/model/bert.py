"""BERT: post-LN encoder with token types, an MLM head (tied decoder) and an NSP head.

MSG masks (DESIGN.md): every LayerNorm (embedding LN, the two per layer, the MLM
transform LN) is a masked LN, which both ignores and zeroes new hidden units, so
post-LN needs no other hidden mask, except after the pooler's tanh, whose new
rows would otherwise leak into the NSP classifier (eq. 10-12: mask after the
activation).

Tensor/pipeline parallel layout as in gpt.py: the token embedding, MLM decoder
and MLM bias are split by vocabulary; the MLM transform, pooler and NSP head
are small and replicated; the last pipeline stage holds its own copy of the
(always tied) token embedding.  Under sequence parallelism the embeddings, the
embedding LN and the MLM transform run on this rank's sequence slice; the MLM
decoder's input is gathered by ``tp.enter`` and the pooler's token 0 by a
gather whose backward keeps the slice (the pooler is repeated on every rank).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_msg.config import ModelConfig
from megatron_msg.model.masked_norm import MaskedLayerNorm
from megatron_msg.model.placement import Placement
from megatron_msg.model.transformer import ACTIVATIONS, MSGTransformerBase, make_dropout
from megatron_msg.model.uninitialized import Embedding, Linear
from megatron_msg.parallel.layers import (TensorParallel, VocabParallelEmbedding, gather_vocab_logits,
                                          vocab_parallel_cross_entropy)
from megatron_msg.parallel.mappings import gather_sequence_for_replicated

IGNORE_INDEX = -100


@dataclass
class BertOutput:
    mlm_logits: torch.Tensor
    nsp_logits: torch.Tensor
    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None


class BertEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, full: bool = True):
        super().__init__()
        self.tok = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden, tp)
        if full:  # the last stage's copy of the tied embedding needs tokens only
            if cfg.position_embedding == "learned":  # rotary positions live in attention
                self.pos = Embedding(cfg.seq_len, cfg.hidden)
            self.token_type = Embedding(cfg.type_vocab_size, cfg.hidden)
            self.ln = MaskedLayerNorm(cfg.hidden, cfg.eps)


class MLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.dense = Linear(cfg.hidden, cfg.hidden)
        self.ln = MaskedLayerNorm(cfg.hidden, cfg.eps)
        self.bias = nn.Parameter(torch.zeros(tp.vocab_range(cfg.vocab_size)[1]))


class Pooler(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden, cfg.hidden)


class BERT(MSGTransformerBase):
    FULL_SEQUENCE_PREFIXES = ("pooler.", "nsp.")

    def __init__(self, cfg: ModelConfig, placement: Placement | None = None):
        placement = placement or Placement()
        super().__init__(cfg, pre_ln=False, causal=False, placement=placement)
        self.embed = BertEmbedding(cfg, placement.tp, full=placement.first)
        self.drop = make_dropout(cfg.dropout, placement)
        self.act = ACTIVATIONS[cfg.activation]
        if placement.last:
            self.mlm = MLMHead(cfg, placement.tp)
            self.pooler = Pooler(cfg)
            self.nsp = Linear(cfg.hidden, 2)

    @staticmethod
    def attention_mask(padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        """bool [batch, seq] (True = real token) -> SDPA mask [batch, 1, 1, seq]."""
        return None if padding_mask is None else padding_mask[:, None, None, :]

    def embed_tokens(self, tokens: torch.Tensor, token_types: torch.Tensor | None,
                     c: torch.Tensor | None) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence length {t} exceeds model.seq_len={self.cfg.seq_len}")
        if token_types is None:
            token_types = torch.zeros_like(tokens)
        # Under SP the token lookup comes back as this rank's sequence slice; add its
        # positions and token types.
        mine = self.placement.tp.sequence_slice(t)
        x = self.embed.tok(tokens)
        if self.cfg.position_embedding == "learned":  # rotary positions act in attention instead
            x = x + self.embed.pos(torch.arange(mine.start, mine.stop, device=tokens.device))
        x = x + self.embed.token_type(token_types[:, mine])
        return self.drop(self.embed.ln(x, c))

    def heads(self, x: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLM logits of this rank's vocabulary block, NSP logits)."""
        tp = self.placement.tp
        h = self.mlm.ln(self.act(self.mlm.dense(x)), c)  # on the sequence slice under SP
        mlm_logits = F.linear(tp.enter(h), self.embed.tok.weight, self.mlm.bias)
        if tp.splits_sequence:
            # Token 0 is the first token of rank 0's slice: gather every rank's first token
            # (tp rows, not the whole sequence) and take rank 0's.
            x = gather_sequence_for_replicated(x[:, :1], tp.group)
        pooled = torch.tanh(self.pooler.dense(x[:, 0]))
        if c is not None:
            pooled = pooled * c.to(pooled.dtype)
        return mlm_logits, self.nsp(pooled)

    def losses(self, mlm_logits, nsp_logits, mlm_labels, nsp_labels):
        mlm = None if mlm_labels is None else vocab_parallel_cross_entropy(
            mlm_logits, mlm_labels, self.placement.tp, self.cfg.vocab_size, IGNORE_INDEX)
        nsp = None if nsp_labels is None else F.cross_entropy(nsp_logits.float(), nsp_labels)
        total = mlm if nsp is None else (nsp if mlm is None else mlm + nsp)
        return total, mlm, nsp

    def stage_forward(self, x: torch.Tensor | None, batch: dict, chunk: int = 0) -> torch.Tensor:
        """One pipeline stage (one ``chunk`` of it under interleaving): tokens (the first block) or
        hidden states in; hidden states or the loss (the last block) out."""
        c = self.hidden_mask_or_none()
        if self.placement.first_chunk(chunk):
            x = self.embed_tokens(batch["tokens"], batch.get("token_types"), c)
        x = self.run_layers(x, c, self.attention_mask(batch.get("padding_mask")), chunk=chunk)
        if not self.placement.last_chunk(chunk):
            return x
        return self.losses(*self.heads(x, c), batch.get("mlm_labels"), batch.get("nsp_labels"))[0]

    def forward(self, tokens: torch.Tensor, token_types: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None,
                nsp_labels: torch.Tensor | None = None) -> BertOutput:
        """tokens/token_types/mlm_labels: [batch, seq]; padding_mask: bool [batch, seq], True = real token."""
        self.check_whole("BERT.forward")
        c = self.hidden_mask_or_none()
        x = self.run_layers(self.embed_tokens(tokens, token_types, c), c, self.attention_mask(padding_mask))
        mlm_local, nsp_logits = self.heads(x, c)
        tp = self.placement.tp
        mlm_logits = mlm_local if tp.size == 1 else gather_vocab_logits(mlm_local, tp, self.cfg.vocab_size)
        loss, mlm, nsp = self.losses(mlm_local, nsp_logits, mlm_labels, nsp_labels)
        return BertOutput(mlm_logits, nsp_logits, loss, mlm, nsp)
