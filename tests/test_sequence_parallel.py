"""Sequence parallelism (Megatron-style): loss, gradients and grad norm equal the single-process model.

Same method as tests/test_parallel_model.py (whole reference model from the same
seed, masks at fractional values so every MSG mask is exercised), but with
``sequence_parallel=True``: the residual stream between TP regions is
``[batch, seq / tp, hidden]``, the pipeline sends that shape, and replicated
parameters used on the slice get their gradients summed over the TP group.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_msg.checkpoint.logical import gather_tensors, load_model
from megatron_msg.model import build_model
from megatron_msg.model.placement import Placement, placement_for
from megatron_msg.parallel.grads import clip_grad_norm, sync_gradients
from megatron_msg.parallel.layers import TensorParallel
from megatron_msg.parallel.random import RNGTracker
from megatron_msg.parallel.step import forward_backward, my_micro_batches
from megatron_msg.parallel.topology import ParallelState, Topology
from megatron_msg.training.trainer import model_loss
from tests.dist_harness import run_distributed
from tests.helpers import make_batch, tiny_cfg
from tests.test_parallel_model import BATCH, MICRO, SEQ, SHAPE, VOCAB, _mid_ramp


def _run(rank, world, arch, tp, pp, dp, model_kw=None):
    ps = ParallelState.create(Topology(tp, pp, dp), "cpu")
    cfg = tiny_cfg(arch, SHAPE, vocab_size=VOCAB, seq_len=SEQ, dropout=0.0, **(model_kw or {}))
    batches = [make_batch(arch, cfg, batch=BATCH, seed=100 + m) for m in range(MICRO)]
    ref = build_model(cfg, seed=3)
    rng = RNGTracker()
    model = build_model(cfg, placement_for(ps, rng, sequence_parallel=True), seed=3)
    logical = _mid_ramp(ref.state_dict(), seed=5)
    ref.load_state_dict(logical)
    load_model(model, logical)
    for m in (ref, model):
        m.set_masked(True)
        m.train()

    ref_loss = torch.zeros(())
    for batch in batches:
        loss = model_loss(ref, batch) / MICRO
        loss.backward()
        ref_loss += loss.detach()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"))

    act_shape = model.activation_shape(BATCH, SEQ)
    loss = forward_backward(model.stage_forward, ps, lambda m: batches[m], my_micro_batches(MICRO, ps), 1.0 / MICRO,
                            act_shape, before_micro=lambda m, stage: rng.seed_micro_batch(11, 0, m, stage, ps.tp_rank))
    if dp > 1:
        dist.all_reduce(loss, group=ps.dp_group)
    partial = model.sequence_parallel_grad_names()
    sync_gradients(model, ps)
    norm = clip_grad_norm(model, 0.0, ps)
    grads = gather_tensors({n: p.grad for n, p in model.named_parameters()}, cfg, ps, params_only=True)
    return {"loss": loss, "ref_loss": ref_loss, "norm": norm, "ref_norm": ref_norm, "grads": grads,
            "ref_grads": {n: p.grad for n, p in ref.named_parameters()}, "act_shape": act_shape,
            "partial": partial}


@pytest.mark.parametrize("arch", ["gpt", "bert"])
@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (2, 2, 1), (4, 1, 1)], ids=lambda v: str(v))
def test_sequence_parallel_step_equals_single_process(arch, tp, pp, dp):
    results = run_distributed(_run, tp * pp * dp, args=(arch, tp, pp, dp))
    for r, res in enumerate(results):
        assert res["act_shape"] == (BATCH, SEQ // tp, SHAPE.hidden)
        assert res["partial"], "SP must sum some replicated gradients over the TP group"
        assert not any(n.startswith(("pooler.", "nsp.")) or n == "embed.tok.weight" for n in res["partial"])
        torch.testing.assert_close(res["loss"], res["ref_loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["norm"], res["ref_norm"], rtol=1e-5, atol=1e-6)
        assert set(res["grads"]) == set(res["ref_grads"])
        for name, g in res["ref_grads"].items():
            torch.testing.assert_close(res["grads"][name], g, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"rank {r} {name}: {m}")


def _sp_placement(tp: int) -> Placement:
    # Building a model and slicing positions needs no communication, so one process can
    # stand in for rank 0 of a TP group (group=None).
    return Placement(tp=TensorParallel(tp, 0, None, sequence_parallel=True), rng=RNGTracker())


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_activation_shape(arch):
    cfg = tiny_cfg(arch, SHAPE, vocab_size=VOCAB, seq_len=SEQ)
    assert build_model(cfg).activation_shape(3, SEQ) == (3, SEQ, SHAPE.hidden)
    plain_tp = Placement(tp=TensorParallel(2, 0, None))
    assert build_model(cfg, plain_tp).activation_shape(3, SEQ) == (3, SEQ, SHAPE.hidden)
    assert build_model(cfg, _sp_placement(2)).activation_shape(3, SEQ) == (3, SEQ // 2, SHAPE.hidden)
    assert build_model(cfg).sequence_parallel_grad_names() == []


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_sequence_not_divisible_by_tp_is_a_clear_error(arch):
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size 4"):
        build_model(tiny_cfg(arch, SHAPE, vocab_size=VOCAB, seq_len=10), _sp_placement(4))
    model = build_model(tiny_cfg(arch, SHAPE, vocab_size=VOCAB, seq_len=SEQ), _sp_placement(4))
    with pytest.raises(ValueError, match="sequence length 10 is not divisible"):
        model.activation_shape(2, 10)
    tokens = torch.zeros(2, 10, dtype=torch.long)  # shorter than seq_len, but not a multiple of 4
    with pytest.raises(ValueError, match="sequence length 10 is not divisible"):
        model.stage_forward(None, {"tokens": tokens, "targets": tokens, "mlm_labels": tokens})


def test_sequence_parallel_dropout_needs_the_rng_tracker():
    cfg = tiny_cfg("gpt", SHAPE, vocab_size=VOCAB, seq_len=SEQ, dropout=0.1)
    with pytest.raises(ValueError, match="RNGTracker"):
        build_model(cfg, Placement(tp=TensorParallel(2, 0, None, sequence_parallel=True)))
