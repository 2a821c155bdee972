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

How the masked path runs, so that a ramp costs (almost) nothing on the GPU
(docs/kernels.md; measured in docs/benchmarks.md): the LayerNorms are the fused
masked-LN op; the FFN, head and sublayer-output masks are folded into the
weights of fc2 / proj (``out_mask * W x * in_mask``, an O(out x in) scaling
instead of a pass over the activations); in pre-LN blocks the mid-block residual
add is fused into LN2 and the last residual add into the depth mix.  Each of
these equals the masked formula above (up to float rounding); on CPU the same
calls run the PyTorch reference.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_msg import kernels
from megatron_msg.config import ModelConfig
from megatron_msg.model.masked_norm import MaskedLayerNorm
from megatron_msg.model.placement import Placement
from megatron_msg.model.rotary import apply_rotary, rotary_angles
from megatron_msg.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_msg.parallel.recompute import recompute

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class RegionDropout(nn.Dropout):
    """Dropout drawn from the TP-region generator: under sequence parallelism each rank
    holds different tokens of the residual stream, so the masks must differ per rank."""

    def __init__(self, p: float, rng):
        super().__init__(p)
        self.rng = rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.p > 0):
            return x
        with self.rng.fork():
            return super().forward(x)


def make_dropout(p: float, placement: Placement) -> nn.Dropout:
    """Dropout for activations between TP regions (plain ``nn.Dropout`` unless SP splits them)."""
    if not placement.tp.splits_sequence:
        return nn.Dropout(p)
    if placement.rng is None and p > 0:
        raise ValueError("sequence parallelism with dropout needs an RNGTracker in the placement "
                         "(sequence-split dropout draws from the TP-region generator)")
    return RegionDropout(p, placement.rng)


class Attention(nn.Module):
    """Multi-head self-attention with packed QKV laid out as [3, heads, head_dim].

    Under tensor parallelism each rank holds ``heads / tp`` whole heads: QKV is
    column-parallel (packed [3, local heads, head_dim] per rank) and the output
    projection row-parallel, so attention itself needs no communication.
    """

    def __init__(self, cfg: ModelConfig, causal: bool, placement: Placement):
        super().__init__()
        tp = placement.tp
        self.heads = tp.local(cfg.heads, "model.heads")  # this rank's heads
        self.head_dim, self.causal = cfg.head_dim, causal
        inner = cfg.heads * cfg.head_dim
        self.qkv = ColumnParallelLinear(cfg.hidden, 3 * inner, tp)
        self.proj = RowParallelLinear(inner, cfg.hidden, tp)
        self.attention_dropout = cfg.attention_dropout
        self.rng = placement.rng
        self.rope_theta = cfg.rope_theta if cfg.position_embedding == "rope" else None

    def forward(self, x: torch.Tensor, head_mask: torch.Tensor | None,
                attn_mask: torch.Tensor | None = None, out_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output, with this rank's head mask and the hidden ``out_mask`` (on the
        output features) folded into the output projection."""
        qkv = self.qkv(x)
        b, t = qkv.shape[:2]  # the full sequence: under SP x is a slice, qkv gathered it
        q, k, v = qkv.view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rope_theta is not None:
            cos, sin = rotary_angles(t, self.head_dim, self.rope_theta, device=q.device)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        p = self.attention_dropout if self.training else 0.0
        # Dropout on a rank's own heads draws from the TP-region generator (parallel/random.py).
        region = self.rng.fork() if p > 0 and self.rng is not None else contextlib.nullcontext()
        with region:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               is_causal=self.causal and attn_mask is None, dropout_p=p)
        head_cols = None if head_mask is None else kernels.head_columns(head_mask, self.head_dim)
        return self.proj(o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim),
                         in_mask=head_cols, out_mask=out_mask)


class MLP(nn.Module):
    """FFN with fc1 column-parallel and fc2 row-parallel (each rank holds ffn / tp neurons)."""

    def __init__(self, cfg: ModelConfig, placement: Placement):
        super().__init__()
        tp = placement.tp
        tp.local(cfg.ffn, "model.ffn")
        self.fc1 = ColumnParallelLinear(cfg.hidden, cfg.ffn, tp)
        self.fc2 = RowParallelLinear(cfg.ffn, cfg.hidden, tp)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor, ffn_mask: torch.Tensor | None,
                out_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``fc2(ffn_mask * act(fc1 x)) * out_mask``: the FFN mask acts after the activation
        (so any activation works); both masks are folded into fc2's weight."""
        return self.fc2(self.act(self.fc1(x)), in_mask=ffn_mask, out_mask=out_mask)


class Layer(nn.Module):
    """One Transformer layer, pre-LN (GPT) or post-LN (BERT), with its own masks."""

    def __init__(self, cfg: ModelConfig, pre_ln: bool, causal: bool, placement: Placement):
        super().__init__()
        self.pre_ln = pre_ln
        self.ln1 = MaskedLayerNorm(cfg.hidden, cfg.eps)
        self.attn = Attention(cfg, causal, placement)
        self.ln2 = MaskedLayerNorm(cfg.hidden, cfg.eps)
        self.mlp = MLP(cfg, placement)
        self.dropout = make_dropout(cfg.dropout, placement)
        # Masks of this rank's own neurons and heads (sharded like the weights).
        self.register_buffer("ffn_mask", torch.ones(placement.tp.local(cfg.ffn, "model.ffn")))
        self.register_buffer("head_mask", torch.ones(self.attn.heads))
        self.register_buffer("depth_mask", torch.ones(()))

    def forward(self, x: torch.Tensor, hidden_mask: torch.Tensor | None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if hidden_mask is None:
            return self._pre(x, attn_mask) if self.pre_ln else self._post(x, attn_mask)
        if self.pre_ln:
            return self._pre_masked(x, hidden_mask, attn_mask)
        return kernels.depth_mix(x, self._post_masked(x, hidden_mask, attn_mask), self.depth_mask)

    def _pre(self, x, attn_mask):
        x = x + self.dropout(self.attn(self.ln1(x), None, attn_mask))
        return x + self.dropout(self.mlp(self.ln2(x), None))

    def _post(self, x, attn_mask):
        x = self.ln1(x + self.dropout(self.attn(x, None, attn_mask)))
        return self.ln2(x + self.dropout(self.mlp(x, None)))

    def _pre_masked(self, x, c, attn_mask):
        # Pre-LN: the residual stream is never normalised, so each sublayer output is
        # masked by c before it is added (new hidden units of the stream stay c-scaled);
        # the c-scaling rides in proj/fc2's weights (dropout commutes with it).
        ln1, ln2 = self.ln1, self.ln2
        y1 = kernels.masked_layer_norm(x, ln1.weight, ln1.bias, c, ln1.eps)
        a = self.dropout(self.attn(y1, self.head_mask, attn_mask, out_mask=c))
        y2, h = kernels.add_masked_layer_norm(x, a, ln2.weight, ln2.bias, c, ln2.eps)  # h = x + c*attn
        f = self.dropout(self.mlp(y2, self.ffn_mask, out_mask=c))
        return kernels.depth_residual_add(x, h, f, self.depth_mask)  # x + d*((h + c*mlp) - x)

    def _post_masked(self, x, c, attn_mask):
        # Post-LN: the masked LN ignores (and zeroes) the new units of its input,
        # so sublayer outputs need no hidden mask; each residual add is fused into its LN.
        ln1, ln2 = self.ln1, self.ln2
        a = self.dropout(self.attn(x, self.head_mask, attn_mask))
        x, _ = kernels.add_masked_layer_norm(x, a, ln1.weight, ln1.bias, c, ln1.eps)
        f = self.dropout(self.mlp(x, self.ffn_mask))
        return kernels.add_masked_layer_norm(x, f, ln2.weight, ln2.bias, c, ln2.eps)[0]


class LayerStack(nn.ModuleDict):
    """Layers keyed by their global index, so a pipeline stage's parameter names are
    the logical names (``layers.5.mlp.fc1.weight`` on whichever stage holds layer 5).
    Iterates over layers in order; ``stack[i]`` is global layer ``i``."""

    def __getitem__(self, index) -> "Layer":
        return super().__getitem__(str(index))

    def __iter__(self):
        return iter(self._modules.values())

    def indices(self) -> list[int]:
        return [int(k) for k in self._modules]


class MSGTransformerBase(nn.Module):
    """State shared by GPT and BERT: the config, placement, layers, hidden mask, masked flag."""

    # Replicated parameters whose consumers run on the full (gathered) sequence, identically
    # on every TP rank, so their gradients are complete even under SP (BERT's pooler, NSP).
    FULL_SEQUENCE_PREFIXES: tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig, pre_ln: bool, causal: bool, placement: Placement):
        super().__init__()
        self.cfg, self.placement = cfg, placement
        placement.tp.sequence_slice(cfg.seq_len)  # ValueError early if SP cannot split seq_len
        self.layers = LayerStack({str(i): Layer(cfg, pre_ln, causal, placement)
                                  for i in placement.layer_indices(cfg.layers)})
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
        """Parameters of the logical model (not of this rank's shard)."""
        from megatron_msg.model.init import logical_num_parameters
        return logical_num_parameters(self.cfg)

    def run_layers(self, x: torch.Tensor, c: torch.Tensor | None,
                   attn_mask: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
        """This stage's layers (only those of ``chunk`` under interleaving; None: all of them)."""
        policy, rng = self.placement.recompute, self.placement.rng
        random = self.training and (self.cfg.dropout > 0 or self.cfg.attention_dropout > 0)
        layers = list(self.layers)
        if chunk is not None and self.placement.virtual > 1:
            # position counts from the chunk's first layer: recompute_layers=N recomputes the
            # first N layers of every chunk, each chunk being a small stage of its own.
            layers = [self.layers[i] for i in self.placement.chunk_layer_indices(self.cfg.layers, chunk)]
        for position, layer in enumerate(layers):
            if policy.recomputes(position) and torch.is_grad_enabled():
                x = recompute(layer, x, c, attn_mask, rng=rng, random=random)
            else:
                x = layer(x, c, attn_mask)
        return x

    def activation_shape(self, batch_size: int, seq_len: int) -> tuple[int, int, int]:
        """Shape of the hidden states passed between pipeline stages.

        ``[batch, seq / tp, hidden]`` under sequence parallelism (each rank sends its slice),
        else ``[batch, seq, hidden]``.
        """
        s = self.placement.tp.sequence_slice(seq_len)
        return (batch_size, s.stop - s.start, self.cfg.hidden)

    def sequence_parallel_grad_names(self) -> list[str]:
        """Parameters whose gradients are partial per TP rank and must be summed over the TP group.

        Under SP, replicated parameters used on the sequence slice (LayerNorms, row-parallel
        biases, position/token-type embeddings, the MLM transform) see only this rank's
        tokens.  Without SP every replicated parameter sees the whole sequence: none.
        """
        if not self.placement.tp.splits_sequence:
            return []
        from megatron_msg.model.layout import tensor_spec
        return [n for n, _ in self.named_parameters()
                if tensor_spec(n).tp_split_dim() is None and not n.startswith(self.FULL_SEQUENCE_PREFIXES)]

    def check_whole(self, what: str) -> None:
        if not (self.placement.first and self.placement.last):
            raise RuntimeError(f"{what} needs the whole pipeline; a stage model runs stage_forward()")
