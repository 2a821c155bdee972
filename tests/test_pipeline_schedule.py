"""1F1B pipeline schedule (megatron_msg.parallel.pipeline) on gloo ranks vs. plain grad accumulation.

Toy model: NUM_BLOCKS Linear+tanh blocks, built from one seed so every rank has the same
weights; stage s of S owns blocks [s*NUM_BLOCKS/S, (s+1)*NUM_BLOCKS/S). The last stage's loss
is mse / num_micro. The reference is the whole stack in this process with a plain
gradient-accumulation loop over the same micro-batches.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_msg.parallel.pipeline import PipeComm, run_pipeline
from tests.dist_harness import run_distributed

NUM_BLOCKS, DIM, BATCH = 4, 8, 3
TIMEOUT = 120.0
TOL = dict(rtol=1e-6, atol=1e-7)  # same fp32 ops in the same order: should be (near) exact


def make_blocks(num_blocks: int = NUM_BLOCKS) -> torch.nn.ModuleList:
    torch.manual_seed(1234)
    return torch.nn.ModuleList(torch.nn.Linear(DIM, DIM) for _ in range(num_blocks))


def make_data(num_micro: int, replica: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + replica)  # each replica gets its own data
    return [(torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, DIM, generator=g))
            for _ in range(num_micro)]


def run_blocks(blocks, h: torch.Tensor) -> torch.Tensor:
    for blk in blocks:
        h = torch.tanh(blk(h))
    return h


def reference(num_micro: int, replica: int = 0, num_blocks: int = NUM_BLOCKS):
    """Losses and per-parameter grads of a plain grad-accumulation loop over the whole stack."""
    blocks = make_blocks(num_blocks)
    losses = []
    for x, t in make_data(num_micro, replica):
        loss = F.mse_loss(run_blocks(blocks, x), t) / num_micro
        loss.backward()
        losses.append(loss.detach())
    return losses, {name: p.grad.clone() for name, p in blocks.named_parameters()}


def expected_order(stage: int, num_stages: int, num_micro: int) -> list[str]:
    """Megatron's non-interleaved 1F1B order of work on one stage."""
    warm = min(num_stages - stage - 1, num_micro)
    order = [f"F{m}" for m in range(warm)]
    for i in range(num_micro - warm):
        order += [f"F{warm + i}", f"B{i}"]
    return order + [f"B{m}" for m in range(num_micro - warm, num_micro)]


def pipeline_worker(rank: int, world_size: int, num_stages: int, num_micro: int, forward_only: bool):
    """One rank of world_size / num_stages independent pipelines (ranks [r*S, (r+1)*S) form replica r)."""
    replica, stage = divmod(rank, num_stages)
    comm = PipeComm.from_ranks(range(replica * num_stages, (replica + 1) * num_stages), rank)
    assert (comm.stage, comm.num_stages) == (stage, num_stages)

    blocks = make_blocks()
    per_stage = NUM_BLOCKS // num_stages
    mine = list(range(stage * per_stage, (stage + 1) * per_stage))
    data = make_data(num_micro, replica)
    order: list[str] = []

    def stage_fn(micro: int, x):
        order.append(f"F{micro}")
        h = run_blocks([blocks[i] for i in mine], data[micro][0] if comm.is_first else x)
        if comm.is_last:
            out = F.mse_loss(h, data[micro][1]) / num_micro
        else:
            out = h
        if out.requires_grad:  # fires when this micro-batch's backward reaches this stage
            out.register_hook(lambda g: order.append(f"B{micro}"))
        return out

    losses = run_pipeline(stage_fn, num_micro, comm, (BATCH, DIM), torch.float32,
                          torch.device("cpu"), forward_only=forward_only)
    grads = {f"{i}.{n}": p.grad for i in mine for n, p in blocks[i].named_parameters()}
    return {"replica": replica, "stage": stage, "losses": losses, "grads": grads, "order": order}


def check_against_reference(results, num_stages: int, num_micro: int, forward_only: bool = False):
    for replica in range(len(results) // num_stages):
        ref_losses, ref_grads = reference(num_micro, replica)
        ranks = results[replica * num_stages:(replica + 1) * num_stages]
        for r in ranks[:-1]:
            assert r["losses"] == []
        assert len(ranks[-1]["losses"]) == num_micro
        torch.testing.assert_close(torch.stack(ranks[-1]["losses"]), torch.stack(ref_losses), **TOL)

        grads = {k: g for r in ranks for k, g in r["grads"].items()}
        assert sorted(grads) == sorted(ref_grads)  # every parameter lives on exactly one stage
        for name, ref in ref_grads.items():
            if forward_only:
                assert grads[name] is None, name
            else:
                assert grads[name] is not None, name
                torch.testing.assert_close(grads[name], ref, **TOL, msg=lambda m: f"{name}: {m}")

        for r in ranks:
            want = ([f"F{m}" for m in range(num_micro)] if forward_only
                    else expected_order(r["stage"], num_stages, num_micro))
            assert r["order"] == want, (r["stage"], r["order"])


@pytest.mark.parametrize("num_stages", [2, 4])
@pytest.mark.parametrize("num_micro", [1, 2, 4, 7])
def test_1f1b_matches_grad_accumulation(num_stages, num_micro):
    results = run_distributed(pipeline_worker, num_stages, (num_stages, num_micro, False), timeout=TIMEOUT)
    check_against_reference(results, num_stages, num_micro)


def test_two_independent_pipelines():
    # world 4 = 2 replicas x 2 stages: {0, 1} and {2, 3}, each with its own data.
    results = run_distributed(pipeline_worker, 4, (2, 5, False), timeout=TIMEOUT)
    check_against_reference(results, num_stages=2, num_micro=5)
    assert not torch.equal(torch.stack(results[1]["losses"]), torch.stack(results[3]["losses"]))


@pytest.mark.parametrize("num_stages", [2, 4])
def test_forward_only_same_losses_no_grads(num_stages):
    results = run_distributed(pipeline_worker, num_stages, (num_stages, 3, True), timeout=TIMEOUT)
    check_against_reference(results, num_stages, 3, forward_only=True)


def test_single_stage_distributed():
    results = run_distributed(pipeline_worker, 1, (1, 3, False), timeout=TIMEOUT)
    check_against_reference(results, num_stages=1, num_micro=3)


@pytest.mark.parametrize("forward_only", [False, True])
def test_single_stage_needs_no_process_group(forward_only):
    # No neighbours -> no communication at all: works without init_process_group.
    assert not torch.distributed.is_initialized()
    result = pipeline_worker(0, 1, 1, 4, forward_only)
    assert result["order"] == (["F0", "F1", "F2", "F3"] if forward_only
                               else ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"])
    check_against_reference([result], num_stages=1, num_micro=4, forward_only=forward_only)


def test_pipecomm_validation():
    assert PipeComm(None, None).is_first and PipeComm(None, None).is_last
    mid = PipeComm.from_ranks([5, 2, 7], 2)
    assert (mid.prev_rank, mid.next_rank, mid.stage, mid.num_stages) == (5, 7, 1, 3)
    assert not mid.is_first and not mid.is_last
    with pytest.raises(ValueError, match="prev_rank"):
        PipeComm(prev_rank=3, next_rank=1, stage=0, num_stages=2)
    with pytest.raises(ValueError, match="next_rank"):
        PipeComm(prev_rank=0, next_rank=2, stage=1, num_stages=2)


def test_wrong_activation_shape_fails_before_sending():
    # Stage 0 of 2 raises before any p2p call, so this needs no process group.
    comm = PipeComm(prev_rank=None, next_rank=1, stage=0, num_stages=2)
    with pytest.raises(ValueError, match="act_shape"):
        run_pipeline(lambda m, x: torch.zeros(2, 2, requires_grad=True), 2, comm, (3, 3),
                     torch.float32, torch.device("cpu"))
