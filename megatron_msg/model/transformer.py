"""Transformer building blocks with MSG masks.

Masks are persistent buffers (saved with the model) that the forward pass reads
only while a growth ramp is active; the caller passes ``masked=False`` once all
masks are 1 and the blocks then run the plain, unmasked computation (DESIGN.md:
"once every mask is 1 the masks are removed from the computation").

Where each mask acts (DESIGN.md, MSG semantics):
* hidden mask  -> every LayerNorm (masked LN, eq. 16-19) and, in pre-LN blocks,
                  every sublayer output added to the residual stream;
* ffn mask     -> after the activation of the first FFN projection (eq. 10-12);
* head mask    -> each head's attention output, before the output projection;
* depth mask   -> ``x + c * (layer(x) - x)`` around a whole layer (eq. 20).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_msg import kernels
from megatron_msg.config import ModelConfig
from megatron_msg.model.masked_norm import MaskedLayerNorm

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def init_weights(module: nn.Module, std: float) -> None:
    """Fresh-model init; matches the ``weight``/``bias``/``ln_weight`` rules in layout.py."""
    for mod in module.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, 0.0, std)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Embedding):
            nn.init.normal_(mod.weight, 0.0, std)


class Attention(nn.Module):
    """Multi-head self-attention with packed QKV laid out as [3, heads, head_dim]."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.heads, self.head_dim, self.causal = cfg.heads, cfg.head_dim, causal
        inner = cfg.heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden, 3 * inner)
        self.proj = nn.Linear(inner, cfg.hidden)
        self.attention_dropout = cfg.attention_dropout

    def forward(self, x: torch.Tensor, head_mask: torch.Tensor | None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=self.causal and attn_mask is None,
            dropout_p=self.attention_dropout if self.training else 0.0)
        if head_mask is not None:
            o = kernels.scale_heads(o, head_mask)
        return self.proj(o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, cfg.hidden)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor, ffn_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if ffn_mask is not None:
            h = h * ffn_mask.to(h.dtype)  # mask after the activation: any activation works
        return self.fc2(h)


class Layer(nn.Module):
    """One Transformer layer, pre-LN (GPT) or post-LN (BERT), with its own masks."""

    def __init__(self, cfg: ModelConfig, pre_ln: bool, causal: bool):
        super().__init__()
        self.pre_ln = pre_ln
        self.ln1 = MaskedLayerNorm(cfg.hidden, cfg.eps)
        self.attn = Attention(cfg, causal)
        self.ln2 = MaskedLayerNorm(cfg.hidden, cfg.eps)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.register_buffer("ffn_mask", torch.ones(cfg.ffn))
        self.register_buffer("head_mask", torch.ones(cfg.heads))
        self.register_buffer("depth_mask", torch.ones(()))

    def forward(self, x: torch.Tensor, hidden_mask: torch.Tensor | None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if hidden_mask is None:
            return self._pre(x, None, None, None, attn_mask) if self.pre_ln else \
                self._post(x, None, None, None, attn_mask)
        fm, hm = self.ffn_mask, self.head_mask
        y = self._pre(x, hidden_mask, fm, hm, attn_mask) if self.pre_ln else \
            self._post(x, hidden_mask, fm, hm, attn_mask)
        return kernels.depth_mix(x, y, self.depth_mask)

    def _pre(self, x, c, fm, hm, attn_mask):
        # Pre-LN: the residual stream is never normalised, so each sublayer output is
        # masked before it is added (new hidden units of the stream stay c-scaled).
        a = self.dropout(self.attn(self.ln1(x, c), hm, attn_mask))
        x = x + (a if c is None else a * c.to(a.dtype))
        f = self.dropout(self.mlp(self.ln2(x, c), fm))
        return x + (f if c is None else f * c.to(f.dtype))

    def _post(self, x, c, fm, hm, attn_mask):
        # Post-LN: the masked LN ignores (and zeroes) the new units of its input,
        # so sublayer outputs need no separate mask.
        x = self.ln1(x + self.dropout(self.attn(x, hm, attn_mask)), c)
        return self.ln2(x + self.dropout(self.mlp(x, fm)), c)


class MSGTransformerBase(nn.Module):
    """State shared by GPT and BERT: the config, the hidden mask, the masked flag."""

    def __init__(self, cfg: ModelConfig, pre_ln: bool, causal: bool):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Layer(cfg, pre_ln, causal) for _ in range(cfg.layers))
        self.register_buffer("hidden_mask", torch.ones(cfg.hidden))
        # Python-side switch between the masked path and the plain fast path.  It
        # only flips at growth / ramp end, so torch.compile recompiles at most once.
        self.masked = False

    def set_masked(self, masked: bool) -> None:
        self.masked = masked

    def hidden_mask_or_none(self) -> torch.Tensor | None:
        return self.hidden_mask if self.masked else None

    def mask_buffers(self) -> dict[str, torch.Tensor]:
        return {n: b for n, b in self.named_buffers() if n.endswith("_mask")}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
