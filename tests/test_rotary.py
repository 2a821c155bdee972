"""Rotary position embeddings (model.position_embedding: rope): what they compute, that MSG
growth stays exact with them, and that the parallel model equals the single-process one.
The Hugging Face GPT-NeoX export (tests/test_export.py) checks them against an independent
implementation."""
from __future__ import annotations

import pytest
import torch

from megatron_msg.config import ConfigError, Shape, config_from_dict
from megatron_msg.model.rotary import apply_rotary, rotary_angles
from tests.dist_harness import run_distributed
from tests.helpers import fresh, grown, make_batch, outputs, rel_err
from tests.test_sequence_parallel import BATCH, SEQ, SHAPE, _run

ROPE = {"position_embedding": "rope"}


def test_attention_scores_depend_only_on_the_offset():
    """<R_m q, R_n k> = <R_{m+s} q, R_{n+s} k>: the score sees positions only through m - n."""
    torch.manual_seed(0)
    d, t = 8, 20
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    cos, sin = rotary_angles(t, d, theta=100.0)
    rq = apply_rotary(q.expand(t, d), cos.double(), sin.double())  # q placed at every position
    rk = apply_rotary(k.expand(t, d), cos.double(), sin.double())
    scores = rq @ rk.T  # [m, n]
    for offset in (-5, 0, 3):
        diag = torch.diagonal(scores, offset=offset)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-5, atol=1e-12)
    assert not torch.allclose(torch.diagonal(scores, 0)[0], torch.diagonal(scores, 3)[0])
    # position 0 is the identity; norms are kept everywhere
    torch.testing.assert_close(rq[0], q)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(t))


def test_rope_replaces_the_position_table():
    for arch in ("gpt", "bert"):
        names = fresh(arch, **ROPE).state_dict()
        assert "embed.pos.weight" not in names, arch
        assert "embed.pos.weight" in fresh(arch).state_dict()


def test_bert_sees_token_order_through_rope_only():
    """Without any positions a bidirectional encoder is permutation-equivariant; with rope it is not."""
    torch.manual_seed(0)
    model = fresh("bert", **ROPE).eval()
    with torch.no_grad():  # sharp attention (init_std 0.02 leaves it nearly uniform)
        for layer in model.layers:
            layer.attn.qkv.weight.mul_(30)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, model.cfg.seq_len))
    perm = torch.randperm(model.cfg.seq_len)
    with torch.no_grad():
        out = model(tokens).mlm_logits
        out_perm = model(tokens[:, perm]).mlm_logits
    assert rel_err(out[:, perm], out_perm) > 1e-2


@pytest.mark.parametrize("arch", ["gpt", "bert"])
@pytest.mark.parametrize("new", [Shape(32, 64, 6, 2), Shape(56, 100, 5, 3)], ids=["heads", "all"])
@pytest.mark.parametrize("init", ["normal", "copy"])
def test_msg_growth_is_exact_with_rotary_positions(arch, new, init):
    """New heads rotate like old ones and are masked: MSG stays exactly function-preserving."""
    model = fresh(arch, Shape(32, 64, 4, 2), **ROPE).eval()
    batch = make_batch(arch, model.cfg)
    with torch.no_grad():
        before, loss_before = outputs(model, arch, batch)
    big = grown(model, new, init=init).model.eval()
    with torch.no_grad():
        after, loss_after = outputs(big, arch, batch)
    assert big.masked
    assert rel_err(before, after) <= 1e-5, (arch, new, init, rel_err(before, after))
    assert abs(loss_before.item() - loss_after.item()) <= 1e-5 * abs(loss_before.item())


@pytest.mark.parametrize("arch,tp,pp", [("gpt", 2, 2), ("bert", 2, 1)])
def test_sequence_parallel_with_rope_equals_single_process(arch, tp, pp):
    """TP x PP with sequence parallelism: each rank rotates the gathered whole sequence."""
    results = run_distributed(_run, tp * pp, args=(arch, tp, pp, 1, ROPE))
    for res in results:
        assert res["act_shape"] == (BATCH, SEQ // tp, SHAPE.hidden)
        torch.testing.assert_close(res["loss"], res["ref_loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["norm"], res["ref_norm"], rtol=1e-5, atol=1e-6)
        for name, g in res["ref_grads"].items():
            torch.testing.assert_close(res["grads"][name], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model,field", [({"position_embedding": "alibi"}, "model.position_embedding"),
                                         ({"position_embedding": "rope", "head_dim": 7}, "model.head_dim"),
                                         ({"position_embedding": "rope", "rope_theta": 0}, "model.rope_theta")])
def test_bad_rotary_settings_are_named(model, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config_from_dict({"model": model})
