"""GPT: pre-LN, causal, learned (or rotary) positions, LM head tied to the token embedding.

MSG masks (DESIGN.md): the embedding output, every LayerNorm, every sublayer
output and the final LayerNorm carry the hidden mask; each layer carries its
own FFN, head and depth masks (see transformer.py).

Under tensor parallelism the token embedding and LM head are split by
vocabulary and the loss is the vocab-parallel cross entropy (the full logits
are only gathered when a caller asks for them).  Under pipeline parallelism a
stage model holds its part (placement.py) and runs :meth:`GPT.stage_forward`.
Under sequence parallelism the residual stream between TP regions is
``[batch, seq / tp, hidden]``: the embedding reduce-scatters, LayerNorms and
dropout run on the slice, and the LM head's input is gathered by ``tp.enter``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_msg.config import ModelConfig
from megatron_msg.model.masked_norm import MaskedLayerNorm
from megatron_msg.model.placement import Placement
from megatron_msg.model.transformer import MSGTransformerBase, make_dropout
from megatron_msg.model.uninitialized import Embedding as _UninitializedEmbedding
from megatron_msg.parallel.layers import (TensorParallel, VocabParallelEmbedding, gather_vocab_logits,
                                          vocab_parallel_cross_entropy)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, positions: bool = True):
        super().__init__()
        self.tok = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden, tp)
        # The last stage's copy of a tied embedding needs tokens only; rotary positions live in attention.
        if positions and cfg.position_embedding == "learned":
            self.pos = _UninitializedEmbedding(cfg.seq_len, cfg.hidden)


class GPT(MSGTransformerBase):
    def __init__(self, cfg: ModelConfig, placement: Placement | None = None):
        placement = placement or Placement()
        super().__init__(cfg, pre_ln=True, causal=True, placement=placement)
        tied = cfg.tie_embeddings
        if placement.first or (placement.last and tied):
            self.embed = Embedding(cfg, placement.tp, positions=placement.first)
        self.drop = make_dropout(cfg.dropout, placement)
        if placement.last:
            self.final_ln = MaskedLayerNorm(cfg.hidden, cfg.eps)
            # An untied head is a [vocab, hidden] matrix split by vocabulary, like the embedding.
            self.lm_head = None if tied else VocabParallelEmbedding(cfg.vocab_size, cfg.hidden, placement.tp)

    def embed_tokens(self, tokens: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence length {t} exceeds model.seq_len={self.cfg.seq_len}")
        x = self.embed.tok(tokens)
        if self.cfg.position_embedding == "learned":
            # Under SP the token lookup comes back as this rank's sequence slice; add its positions.
            mine = self.placement.tp.sequence_slice(t)
            x = x + self.embed.pos(torch.arange(mine.start, mine.stop, device=tokens.device))
        if c is not None:
            x = x * c.to(x.dtype)
        return self.drop(x)

    def local_logits(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """Logits of this rank's vocabulary block."""
        x = self.final_ln(x, c)  # on the sequence slice under SP; enter() gathers it
        weight = self.embed.tok.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.placement.tp.enter(x), weight)

    def stage_forward(self, x: torch.Tensor | None, batch: dict, chunk: int = 0) -> torch.Tensor:
        """One pipeline stage (one ``chunk`` of it under interleaving): tokens (the first block) or
        hidden states in; hidden states or the loss (the last block) out."""
        c = self.hidden_mask_or_none()
        if self.placement.first_chunk(chunk):
            x = self.embed_tokens(batch["tokens"], c)
        x = self.run_layers(x, c, chunk=chunk)
        if not self.placement.last_chunk(chunk):
            return x
        return vocab_parallel_cross_entropy(self.local_logits(x, c), batch["targets"],
                                            self.placement.tp, self.cfg.vocab_size)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """tokens: [batch, seq] -> logits [batch, seq, vocab] (and mean CE loss if targets)."""
        self.check_whole("GPT.forward")
        c = self.hidden_mask_or_none()
        logits = self.local_logits(self.run_layers(self.embed_tokens(tokens, c), c), c)
        tp = self.placement.tp
        full = logits if tp.size == 1 else gather_vocab_logits(logits, tp, self.cfg.vocab_size)
        if targets is None:
            return full
        return full, vocab_parallel_cross_entropy(logits, targets, tp, self.cfg.vocab_size)
