"""The model's masked layer computes the MSG formulas of DESIGN.md.

transformer.Layer runs its masks the fast way (masks folded into proj/fc2, residual adds
fused into the LayerNorms and the depth mix, docs/kernels.md).  Here a literal
transcription of the formulas, masking activations one by one, is the oracle: in fp64,
with every mask at a different fractional value, the layer's output and every gradient
must agree to fp64 rounding.  A mask wired to the wrong place (FFN mask on the hidden
units, head mask after the projection, hidden mask missing on a sublayer output) fails.
"""
import pytest
import torch
import torch.nn.functional as F

from megatron_msg.config import Shape
from megatron_msg.kernels.reference import masked_layer_norm_reference as masked_ln
from tests.helpers import fresh

SHAPE = Shape(24, 40, 3, 1)
HEAD_DIM = 8


def _ln(ln, x, c):
    return masked_ln(x, ln.weight, ln.bias, c, ln.eps)


def _attention(layer, x, head_mask, causal, attn_mask=None):
    attn = layer.attn
    b, t, _ = x.shape
    q, k, v = attn.qkv(x).view(b, t, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None)
    o = o * head_mask.view(1, -1, 1, 1)  # each head's output times its mask, before the projection
    return attn.proj(o.transpose(1, 2).reshape(b, t, -1))


def _mlp(layer, x, ffn_mask):
    mlp = layer.mlp
    return mlp.fc2(mlp.act(mlp.fc1(x)) * ffn_mask)  # FFN mask after the activation


def literal_pre_ln(layer, x, c):
    """GPT block: masked LNs, sublayer outputs times c before the residual add, depth mix."""
    h = x + _attention(layer, _ln(layer.ln1, x, c), layer.head_mask, causal=True) * c
    out = h + _mlp(layer, _ln(layer.ln2, h, c), layer.ffn_mask) * c
    return x + layer.depth_mask * (out - x)


def literal_post_ln(layer, x, c, attn_mask):
    """BERT block: masked LN after each residual add, depth mix."""
    x1 = _ln(layer.ln1, x + _attention(layer, x, layer.head_mask, False, attn_mask), c)
    x2 = _ln(layer.ln2, x1 + _mlp(layer, x1, layer.ffn_mask), c)
    return x + layer.depth_mask * (x2 - x)


def _ramped_layer(arch):
    model = fresh(arch, SHAPE, head_dim=HEAD_DIM).double()
    layer = model.layers[0]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every mask entry a different value in (0.1, 1]
        for buf in (layer.ffn_mask, layer.head_mask, layer.depth_mask):
            buf.copy_(0.1 + 0.9 * torch.rand(buf.shape, generator=g, dtype=buf.dtype))
        for p in layer.parameters():  # LN weights/biases away from 1/0, so every term shows
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    c = 0.1 + 0.9 * torch.rand(SHAPE.hidden, generator=g, dtype=torch.float64)
    x = torch.randn(2, 6, SHAPE.hidden, generator=g, dtype=torch.float64)
    return layer, x, c


def _grads(layer, x, fn):
    x = x.clone().requires_grad_()
    out = fn(x)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    params = [p for _, p in layer.named_parameters()]
    grads = torch.autograd.grad(out, [x, *params], dy)
    return out.detach(), grads


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_masked_layer_equals_the_msg_formulas(arch):
    layer, x, c = _ramped_layer(arch)
    attn_mask = None
    if arch == "bert":  # a padding mask, as BERT passes one
        keep = torch.ones(2, 6, dtype=torch.bool)
        keep[1, 4:] = False
        attn_mask = keep[:, None, None, :]
    oracle = (lambda t: literal_pre_ln(layer, t, c)) if arch == "gpt" else \
        (lambda t: literal_post_ln(layer, t, c, attn_mask))
    got, got_grads = _grads(layer, x, lambda t: layer(t, c, attn_mask))
    want, want_grads = _grads(layer, x, oracle)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_masks_of_one_give_the_unmasked_layer(arch):
    """All masks at 1 (a finished ramp): the masked path equals the plain one (the one the
    model switches to) to rounding, and an old layer's depth mix returns its output exactly."""
    layer, x, _ = _ramped_layer(arch)
    with torch.no_grad():
        for buf in (layer.ffn_mask, layer.head_mask, layer.depth_mask):
            buf.fill_(1.0)
    ones = torch.ones(SHAPE.hidden, dtype=torch.float64)
    torch.testing.assert_close(layer(x, ones), layer(x, None), rtol=1e-12, atol=1e-12)
