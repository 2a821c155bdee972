"""TP communication functions, vocab-parallel embedding / cross entropy and the RNG tracker.

Every rank builds the full tensors (and every other rank's rank-dependent tensors)
from shared seeds, so it can compute the single-process answer itself and compare
its own result with it: forward values and, with a rank-dependent upstream gradient,
the backward (which must be the conjugate collective of the forward).

One gloo launch per world size computes everything (launches dominate the time);
the tests then check the per-rank results.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_msg.parallel import mappings as M
from megatron_msg.parallel.layers import (TensorParallel, VocabParallelEmbedding, gather_vocab_logits,
                                          vocab_parallel_cross_entropy)
from megatron_msg.parallel.random import TP_REGION, RNGTracker
from tests.dist_harness import run_distributed

B, S, H = 2, 8, 8  # S and H divisible by 2 and 4
VOCAB = 61  # not divisible by 2 or 4: the last vocab block is padded
MAPPINGS = ["copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp", "scatter_to_sequence",
            "gather_from_sequence", "reduce_scatter_to_sequence", "gather_sequence_for_replicated"]


def _rand(seed: int, *shape, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _chunk(x: torch.Tensor, dim: int, r: int, n: int) -> torch.Tensor:
    return x.chunk(n, dim=dim)[r]


def _check_mapping(name: str, rank: int, n: int, group) -> dict:
    """(actual, expected) of the forward output and of the input gradient of one mapping."""
    full = _rand(0, B, S, H)
    per_rank = [_rand(10 + r, B, S, H) for r in range(n)]  # rank-dependent full-size tensors
    seq, last = M.SEQ_DIM, -1
    # name: (this rank's input, expected output, upstream-gradient shape, expected input gradient
    #        as a function of every rank's upstream gradient)
    cases = {
        "copy_to_tp": (full, full, full.shape, lambda gs: sum(gs)),
        "reduce_from_tp": (per_rank[rank], sum(per_rank), full.shape, lambda gs: gs[rank]),
        "scatter_to_tp": (full, _chunk(full, last, rank, n), _chunk(full, last, 0, n).shape,
                          lambda gs: torch.cat(gs, dim=last)),
        "gather_from_tp": (_chunk(full, last, rank, n), full, full.shape,
                           lambda gs: _chunk(gs[rank], last, rank, n)),
        "scatter_to_sequence": (full, _chunk(full, seq, rank, n), _chunk(full, seq, 0, n).shape,
                                lambda gs: torch.cat(gs, dim=seq)),
        # Feeds a column-parallel layer: the gradient is a partial sum per rank -> reduce-scatter.
        "gather_from_sequence": (_chunk(full, seq, rank, n), full, full.shape,
                                 lambda gs: _chunk(sum(gs), seq, rank, n)),
        "reduce_scatter_to_sequence": (per_rank[rank], _chunk(sum(per_rank), seq, rank, n),
                                       _chunk(full, seq, 0, n).shape, lambda gs: torch.cat(gs, dim=seq)),
        # Feeds a replicated computation: every rank's gradient is whole -> keep own slice.
        "gather_sequence_for_replicated": (_chunk(full, seq, rank, n), full, full.shape,
                                           lambda gs: _chunk(gs[rank], seq, rank, n)),
    }
    x, want_out, gshape, want_grad = cases[name]
    x = x.clone().requires_grad_(True)
    out = getattr(M, name)(x, group)
    upstream = [_rand(100 + r, *gshape) for r in range(n)]
    out.backward(upstream[rank])
    return {"out": (out.detach(), want_out), "grad": (x.grad, want_grad(upstream))}


def _gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """All ranks' vocab blocks concatenated along the last dim (padding included)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _check_cross_entropy(tp: TensorParallel) -> dict:
    full = _rand(1, B, S, VOCAB, dtype=torch.float32).mul_(3.0).requires_grad_(True)
    targets = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(2))
    targets[0, :4] = torch.tensor([0, VOCAB - 1, tp.vocab_range(VOCAB)[1], -100])  # ends, a block edge, ignored
    targets[1, ::3] = -100
    start, rows, real = tp.vocab_range(VOCAB)
    block = full.detach()[..., start:start + real]
    # Padding rows hold large garbage: they must neither win the max nor enter the softmax.
    pad = torch.full((B, S, rows - real), 50.0)
    local = torch.cat([block, pad], dim=-1).requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, targets, tp, VOCAB)
    (2.5 * loss).backward()  # a non-unit upstream gradient
    ref = F.cross_entropy(full.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
    (2.5 * ref).backward()
    grads = _gather_rows(local.grad, tp.group)
    return {"loss": (loss.detach(), ref.detach()),
            "grad": (grads[..., :VOCAB], full.grad),  # blocks are contiguous: padding is at the end
            "pad_grad": local.grad[..., real:],
            "gathered_logits": (gather_vocab_logits(local.detach(), tp, VOCAB), full.detach())}


def _check_embedding(tp: TensorParallel) -> dict:
    table = _rand(3, VOCAB, H, dtype=torch.float32).requires_grad_(True)
    ids = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(4))
    ids[0, :3] = torch.tensor([0, VOCAB - 1, tp.vocab_range(VOCAB)[1]])
    emb = VocabParallelEmbedding(VOCAB, H, tp)
    start, rows, real = tp.vocab_range(VOCAB)
    with torch.no_grad():
        emb.weight.fill_(7.0)  # padding rows: never selected
        emb.weight[:real] = table[start:start + real]
    out = emb(ids)
    n, rank = tp.size, tp.rank
    if tp.sequence_parallel:  # output is this rank's sequence slice; upstream differs per rank
        upstream = [_rand(200 + r, B, S // n, H, dtype=torch.float32) for r in range(n)]
        out.backward(upstream[rank])
        want_out, full_upstream = _chunk(F.embedding(ids, table), M.SEQ_DIM, rank, n), torch.cat(upstream, 1)
    else:  # output replicated, so is its upstream gradient
        full_upstream = _rand(200, B, S, H, dtype=torch.float32)
        out.backward(full_upstream)
        want_out = F.embedding(ids, table)
    F.embedding(ids, table).backward(full_upstream)
    grads = _gather_rows(emb.weight.grad.t(), tp.group).t()  # blocks are rows here
    return {"out": (out.detach(), want_out.detach()),
            "grad": (grads[:VOCAB], table.grad), "pad_grad": emb.weight.grad[real:]}


def _dropout_mask(n: int = 256) -> torch.Tensor:
    return F.dropout(torch.ones(n), 0.5, training=True) != 0


def _check_rng(rank: int, n: int, group) -> dict:
    tracker = RNGTracker("cpu")
    tracker.seed_micro_batch(7, step=3, micro=1, pp_rank=0, tp_rank=rank)
    default1 = _dropout_mask()
    with tracker.fork():
        forked1 = _dropout_mask()
    with tracker.fork():  # the region generator advances between forks
        forked2 = _dropout_mask()
    default2 = _dropout_mask()

    # Same arguments again: the same masks, in the same order.
    tracker.seed_micro_batch(7, step=3, micro=1, pp_rank=0, tp_rank=rank)
    replay = [_dropout_mask()]
    with tracker.fork():
        replay.append(_dropout_mask())
    with tracker.fork():
        replay.append(_dropout_mask())
    replay.append(_dropout_mask())

    # The outer generator is untouched by a fork: its stream is the one drawn with no fork.
    tracker.seed_micro_batch(7, step=3, micro=1, pp_rank=0, tp_rank=rank)
    before = torch.get_rng_state()
    with tracker.fork():
        _dropout_mask()
    restored = torch.equal(torch.get_rng_state(), before)
    no_fork = [_dropout_mask(), _dropout_mask()]

    tracker.seed_micro_batch(7, step=3, micro=2, pp_rank=0, tp_rank=rank)
    other_micro = _dropout_mask()
    with tracker.fork():
        other_micro_forked = _dropout_mask()

    gathered = {}
    for key, mask in (("default", default1), ("forked", forked1)):
        parts = [torch.empty_like(mask, dtype=torch.uint8) for _ in range(n)]
        dist.all_gather(parts, mask.to(torch.uint8), group=group)
        gathered[key] = [p.bool() for p in parts]
    return {"gathered": gathered, "first": [default1, forked1, forked2, default2], "replay": replay,
            "restored": restored, "no_fork": no_fork, "other_micro": (other_micro, other_micro_forked)}


def _worker(rank: int, world: int) -> dict:
    group = dist.new_group(list(range(world)))
    tp = TensorParallel(world, rank, group)
    return {"mappings": {name: _check_mapping(name, rank, world, group) for name in MAPPINGS},
            "ce": _check_cross_entropy(tp),
            "embedding": _check_embedding(tp),
            "embedding_sp": _check_embedding(TensorParallel(world, rank, group, sequence_parallel=True)),
            "rng": _check_rng(rank, world, group),
            "split_error": _split_error(group)}


def _split_error(group) -> str | None:
    try:
        M.scatter_to_sequence(torch.zeros(B, 7, H), group)
    except ValueError as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=None)
def _results(world: int) -> list[dict]:
    return run_distributed(_worker, world)


WORLDS = [2, 4]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", MAPPINGS)
def test_mapping_forward_and_conjugate_backward(name, world):
    for rank, res in enumerate(_results(world)):
        for what in ("out", "grad"):
            got, want = res["mappings"][name][what]
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"{name} {what} on rank {rank}/{world}: {m}")


@pytest.mark.parametrize("name", MAPPINGS)
def test_mapping_is_identity_without_group(name):
    x = _rand(0, B, S, H).requires_grad_(True)
    out = getattr(M, name)(x, None)
    assert out is x  # not even a copy: the single-device model pays nothing
    g = _rand(1, B, S, H)
    out.backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("world", WORLDS)
def test_split_of_indivisible_dimension_is_a_value_error(world):
    for res in _results(world):
        assert res["split_error"] == f"cannot split dimension 1 of size 7 into {world} equal parts"


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_cross_entropy_equals_full_softmax(world):
    for rank, res in enumerate(_results(world)):
        ce = res["ce"]
        torch.testing.assert_close(*ce["loss"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(*ce["grad"], rtol=1e-5, atol=1e-7)
        assert torch.count_nonzero(ce["pad_grad"]) == 0, f"rank {rank}: padding columns got gradient"
        torch.testing.assert_close(*ce["gathered_logits"], rtol=0, atol=0)  # padding dropped
    # The padded block really is padded (otherwise the test would not exercise padding).
    assert res["ce"]["pad_grad"].shape[-1] > 0


@pytest.mark.parametrize("sp", [False, True], ids=["replicated", "sequence_parallel"])
@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_embedding_equals_full_table(world, sp):
    for rank, res in enumerate(_results(world)):
        emb = res["embedding_sp" if sp else "embedding"]
        torch.testing.assert_close(*emb["out"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(*emb["grad"], rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(emb["pad_grad"]) == 0


def test_rng_tracker_default_masks_agree_and_forked_masks_differ_across_tp_ranks():
    results = _results(2)
    for res in results:
        default, forked = res["rng"]["gathered"]["default"], res["rng"]["gathered"]["forked"]
        assert torch.equal(default[0], default[1]), "replicated-region dropout must match across TP ranks"
        assert not torch.equal(forked[0], forked[1]), "TP-region dropout must differ across TP ranks"
    assert not torch.equal(results[0]["rng"]["first"][1], results[0]["rng"]["first"][0])


def test_rng_tracker_is_reproducible_and_fork_restores_the_outer_generator():
    for res in _results(2):
        rng = res["rng"]
        default1, forked1, forked2, default2 = rng["first"]
        for got, want in zip(rng["replay"], rng["first"]):
            assert torch.equal(got, want), "reseeding with the same arguments must replay the masks"
        assert not torch.equal(forked1, forked2), "the region generator advances across forks"
        assert rng["restored"], "fork must restore the default generator's state"
        assert torch.equal(rng["no_fork"][0], default1) and torch.equal(rng["no_fork"][1], default2)
        other, other_forked = rng["other_micro"]
        assert not torch.equal(other, default1) and not torch.equal(other_forked, forked1)


def test_rng_tracker_fork_without_seed_raises_and_cpu_fallback_runs_in_process():
    tracker = RNGTracker("cpu")
    with pytest.raises(KeyError, match="never seeded"):
        with tracker.fork():
            pass
    tracker.seed(TP_REGION, 5)
    before = torch.get_rng_state()
    with tracker.fork():
        a = _dropout_mask()
    assert torch.equal(torch.get_rng_state(), before)
    tracker.seed(TP_REGION, 5)
    with tracker.fork():
        assert torch.equal(_dropout_mask(), a)
