"""TP / PP / TP x PP / TP x DP: loss, gradients and grad norm equal the single-process model's.

Every rank also builds the whole model from the same seed as the reference, so
each test checks the sharded initialisation too.  Masks are set to fractional
values (as mid-ramp) so the masked LayerNorm, FFN, head and depth masks are all
exercised under sharding.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_msg.checkpoint.logical import gather_model, gather_tensors, load_model
from megatron_msg.config import Shape
from megatron_msg.model import build_model
from megatron_msg.model.placement import placement_for
from megatron_msg.parallel.grads import clip_grad_norm, sync_gradients
from megatron_msg.parallel.random import RNGTracker
from megatron_msg.parallel.step import forward_backward, my_micro_batches
from megatron_msg.parallel.topology import ParallelState, Topology
from megatron_msg.training.trainer import model_loss
from tests.dist_harness import run_distributed
from tests.helpers import make_batch, tiny_cfg

SHAPE = Shape(32, 64, 4, 4)
MICRO, BATCH, SEQ, VOCAB = 4, 2, 12, 61  # vocab 61 is not divisible by tp: exercises padding


def _mid_ramp(state: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = dict(state)
    for name, t in state.items():
        if name.endswith("_mask"):
            out[name] = torch.where(torch.rand(t.shape, generator=g) < 0.3, torch.rand(t.shape, generator=g), 1.0)
    return out


def _run(rank, world, arch, tp, pp, dp, dropout):
    ps = ParallelState.create(Topology(tp, pp, dp), "cpu")
    cfg = tiny_cfg(arch, SHAPE, vocab_size=VOCAB, seq_len=SEQ, dropout=dropout)
    batches = [make_batch(arch, cfg, batch=BATCH, seed=100 + m) for m in range(MICRO)]
    ref = build_model(cfg, seed=3)
    rng = RNGTracker()
    model = build_model(cfg, placement_for(ps, rng), seed=3)
    init_matches = all(torch.equal(a, b) for a, b in
                       zip(gather_model(model, ps).values(), ref.state_dict().values()))
    logical = _mid_ramp(ref.state_dict(), seed=5)
    ref.load_state_dict(logical)
    load_model(model, logical)
    for m in (ref, model):
        m.set_masked(True)
        m.train()

    # Reference: one process, plain gradient accumulation, same per-micro RNG seeding.
    ref_rng = RNGTracker()
    ref_loss = torch.zeros(())
    for m, batch in enumerate(batches):
        ref_rng.seed_micro_batch(11, 0, m)
        loss = model_loss(ref, batch) / MICRO
        loss.backward()
        ref_loss += loss.detach()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"))

    loss = forward_backward(model.stage_forward, ps, lambda m: batches[m], my_micro_batches(MICRO, ps), 1.0 / MICRO,
                            (BATCH, SEQ, SHAPE.hidden),
                            before_micro=lambda m, stage: rng.seed_micro_batch(11, 0, m, stage, ps.tp_rank))
    if dp > 1:
        dist.all_reduce(loss, group=ps.dp_group)
    sync_gradients(model, ps)
    norm = clip_grad_norm(model, 0.0, ps)
    grads = gather_tensors({n: p.grad for n, p in model.named_parameters()}, cfg, ps, params_only=True)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    return {"init_matches": init_matches, "loss": loss, "ref_loss": ref_loss, "norm": norm,
            "ref_norm": ref_norm, "grads": grads, "ref_grads": ref_grads}


TOPOLOGIES = [(2, 1, 1), (1, 2, 1), (2, 2, 1), (2, 1, 2)]


@pytest.mark.parametrize("arch", ["gpt", "bert"])
@pytest.mark.parametrize("tp,pp,dp", TOPOLOGIES, ids=lambda v: str(v))
def test_parallel_step_equals_single_process(arch, tp, pp, dp):
    results = run_distributed(_run, tp * pp * dp, args=(arch, tp, pp, dp, 0.0))
    for r, res in enumerate(results):
        assert res["init_matches"], f"rank {r}: sharded init differs from the whole model's"
        torch.testing.assert_close(res["loss"], res["ref_loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["norm"], res["ref_norm"], rtol=1e-5, atol=1e-6)
        assert set(res["grads"]) == set(res["ref_grads"])
        for name, g in res["ref_grads"].items():
            torch.testing.assert_close(res["grads"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_replicated_dropout_equals_single_process_under_tp():
    # Hidden dropout (residual stream) must draw the single-process masks at any TP size.
    results = run_distributed(_run, 2, args=("gpt", 2, 1, 1, 0.3))
    for res in results:
        torch.testing.assert_close(res["loss"], res["ref_loss"], rtol=1e-5, atol=1e-6)
        for name, g in res["ref_grads"].items():
            torch.testing.assert_close(res["grads"][name], g, rtol=1e-4, atol=1e-6)
