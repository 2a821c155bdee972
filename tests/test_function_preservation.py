"""MSG growth is exactly function-preserving for GPT and BERT; the baselines are measured not to be."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_msg.config import Shape
from tests.helpers import fresh, grown, make_batch, outputs, rel_err, tiny_cfg

TOL = 1e-5  # relative max error: fp32 rounding
ARCHS = ("gpt", "bert")
INITS = ("normal", "zeros", "copy")
BASE = Shape(32, 64, 4, 2)
ONE_DIM = {"hidden": Shape(48, 64, 4, 2), "ffn": Shape(32, 96, 4, 2), "heads": Shape(32, 64, 6, 2),
           "layers": Shape(32, 64, 4, 4), "all": Shape(56, 100, 5, 3)}


def _check_preserved(arch, base: Shape, new: Shape, init: str, mode: str, **spec_kw):
    model = fresh(arch, base)
    model.train(mode == "train")  # dropout is 0: train mode must be exact too
    batch = make_batch(arch, model.cfg)
    with torch.no_grad():
        before, loss_before = outputs(model, arch, batch)
    big = grown(model, new, init=init, **spec_kw).model
    big.train(mode == "train")
    assert big.masked
    with torch.no_grad():
        after, loss_after = outputs(big, arch, batch)
    assert rel_err(before, after) <= TOL, (arch, new, init, rel_err(before, after))
    assert abs(loss_before.item() - loss_after.item()) <= TOL * abs(loss_before.item())
    return big, batch


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dim", list(ONE_DIM))
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_msg_is_exact_for_every_dimension_and_init(arch, dim, init, mode):
    _check_preserved(arch, BASE, ONE_DIM[dim], init, mode)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("placement,depth_init", [("top", "random"), ("top", "copy"),
                                                  ("interleave", "random"), ("interleave", "copy")])
def test_msg_depth_placements_are_exact(arch, placement, depth_init):
    _check_preserved(arch, BASE, Shape(32, 64, 4, 5), "normal", "eval",
                     depth_placement=placement, depth_init=depth_init)


dims = st.tuples(st.integers(8, 40), st.integers(8, 80), st.integers(1, 4), st.integers(1, 3))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(ARCHS), old=dims, extra=dims, init=st.sampled_from(INITS),
       head_dim=st.integers(2, 12), seed=st.integers(0, 2**16), mode=st.sampled_from(["train", "eval"]))
def test_msg_is_exact_on_random_shapes(arch, old, extra, init, head_dim, seed, mode):
    base = Shape(*old)
    # grow a random subset of the dimensions (at least one)
    grow = [e % 3 for e in extra]
    new = Shape(base.hidden + grow[0] * 5, base.ffn + grow[1] * 7, base.heads + grow[2], base.layers + extra[3] % 3)
    if new == base:
        new = Shape(base.hidden + 1, base.ffn, base.heads, base.layers)
    model = fresh(arch, base, head_dim=head_dim)
    model.train(mode == "train")
    batch = make_batch(arch, model.cfg, seed=seed)
    with torch.no_grad():
        before, lb = outputs(model, arch, batch)
    big = grown(model, new, init=init, seed=seed).model
    big.train(mode == "train")
    with torch.no_grad():
        after, la = outputs(big, arch, batch)
    assert rel_err(before, after) <= TOL
    assert abs(lb.item() - la.item()) <= TOL * abs(lb.item())


@pytest.mark.parametrize("arch", ARCHS)
def test_new_weights_get_gradients_once_masks_open(arch):
    big, batch = _check_preserved(arch, BASE, ONE_DIM["all"], "normal", "train")
    # c = 0: the new units are invisible, so their weights get exactly zero gradient ...
    _, loss = outputs(big, arch, batch)
    loss.backward()
    fc1 = big.layers[0].mlp.fc1.weight
    assert fc1.grad[64:].abs().max() == 0
    big.zero_grad()
    # ... and after one ramp step (c > 0) every new block of weights learns.
    for buf in big.mask_buffers().values():
        buf.clamp_(min=0.1)
    _, loss = outputs(big, arch, batch)
    loss.backward()
    L = big.layers
    assert L[0].mlp.fc1.weight.grad[64:].abs().sum() > 0  # new FFN rows
    assert L[0].mlp.fc2.weight.grad[:, 64:].abs().sum() > 0  # new FFN columns
    assert L[0].attn.qkv.weight.grad.view(3, 5, 8, -1)[:, 4:].abs().sum() > 0  # new head
    assert L[0].ln1.weight.grad[32:].abs().sum() > 0  # new hidden units
    assert L[2].mlp.fc1.weight.grad.abs().sum() > 0  # new layer
    assert big.embed.tok.weight.grad[:, 32:].abs().sum() > 0


def _error_after(arch, new, operator, init="normal"):
    model = fresh(arch, BASE).eval()
    batch = make_batch(arch, model.cfg)
    with torch.no_grad():
        before, _ = outputs(model, arch, batch)
        big = grown(model, new, operator=operator, init=init).model.eval()
        assert not big.masked
        after, _ = outputs(big, arch, batch)
    return rel_err(before, after)


@pytest.mark.parametrize("arch", ARCHS)
def test_net2net_is_exact_for_ffn_and_heads_but_not_hidden(arch):
    """Paper section 2.3.1: copy-and-split preserves FFN/heads but LayerNorm breaks it for hidden."""
    assert _error_after(arch, ONE_DIM["ffn"], "net2net") <= TOL
    assert _error_after(arch, ONE_DIM["heads"], "net2net") <= TOL
    assert _error_after(arch, ONE_DIM["hidden"], "net2net") > 1e-3
    assert _error_after(arch, ONE_DIM["layers"], "net2net") > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dim", ["hidden", "ffn", "heads", "layers"])
def test_nomask_is_not_exact(arch, dim):
    assert _error_after(arch, ONE_DIM[dim], "nomask") > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_stack_is_not_exact(arch):
    assert _error_after(arch, Shape(32, 64, 4, 4), "stack") > 1e-3


def test_grown_model_without_masks_is_the_plain_model():
    """After the ramp (all masks 1) the masked path and the fast path compute the same function."""
    big = grown(fresh("gpt"), ONE_DIM["all"]).model.eval()
    for buf in big.mask_buffers().values():
        buf.fill_(1.0)
    batch = make_batch("gpt", big.cfg)
    with torch.no_grad():
        masked, _ = outputs(big, "gpt", batch)
        big.set_masked(False)
        plain, _ = outputs(big, "gpt", batch)
    assert rel_err(masked, plain) <= TOL


def test_growth_is_deterministic_and_pure():
    model = fresh("gpt")
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    a = grown(model, ONE_DIM["all"], seed=7).model.state_dict()
    b = grown(model, ONE_DIM["all"], seed=7).model.state_dict()
    c = grown(model, ONE_DIM["all"], seed=8).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())  # input untouched


def test_old_weights_land_at_their_positions():
    model = fresh("gpt")
    big = grown(model, ONE_DIM["all"]).model
    old, new = model.state_dict(), big.state_dict()
    assert torch.equal(new["layers.1.mlp.fc1.weight"][:64, :32], old["layers.1.mlp.fc1.weight"])
    q_old = old["layers.0.attn.qkv.weight"].view(3, 4, 8, 32)
    q_new = new["layers.0.attn.qkv.weight"].view(3, 5, 8, 56)
    assert torch.equal(q_new[:, :4, :, :32], q_old)
    assert torch.equal(new["hidden_mask"], torch.tensor([1.0] * 32 + [0.0] * 24))
    assert new["layers.2.depth_mask"].item() == 0 and new["layers.1.depth_mask"].item() == 1
    assert torch.equal(new["layers.0.head_mask"], torch.tensor([1.0, 1, 1, 1, 0]))


def test_tensor_parallel_layout_rule_appends_per_block():
    """With parts=2 each half of a dimension appends its own new units (every rank grows locally)."""
    model = fresh("gpt")
    big = grown(model, Shape(32, 96, 4, 2), parts={"ffn": 2}).model
    mask = big.layers[0].ffn_mask
    assert torch.equal(mask, torch.tensor([1.0] * 32 + [0.0] * 16 + [1.0] * 32 + [0.0] * 16))
    old = model.layers[0].mlp.fc1.weight
    new = big.layers[0].mlp.fc1.weight
    assert torch.equal(new[:32], old[:32]) and torch.equal(new[48:80], old[32:])
    with pytest.raises(ValueError, match="equal parts"):
        grown(model, Shape(32, 95, 4, 2), parts={"ffn": 2})


def test_bert_head_dim_constant_and_heads_times_head_dim_differs_from_hidden():
    cfg = tiny_cfg("bert", Shape(32, 64, 3, 2), head_dim=8)  # 3*8 = 24 != 32
    assert cfg.heads * cfg.head_dim != cfg.hidden
    _check_preserved("bert", Shape(32, 64, 3, 2), Shape(40, 64, 5, 2), "normal", "eval")
