"""Interleaved 1F1B: the schedule as data (parallel/schedule.py) and its executor on gloo ranks
(parallel/interleaved.py) against a plain gradient-accumulation loop.

Toy model as in test_pipeline_schedule.py: NUM_BLOCKS Linear+tanh blocks from one seed. With
p stages and v chunks, virtual stage s = c * p + r owns blocks [s*B/(p v), (s+1)*B/(p v)).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_msg.model.placement import Placement
from megatron_msg.parallel.interleaved import run_scheduled_pipeline
from megatron_msg.parallel.schedule import (Op, bubble, interleaved_1f1b, one_f_one_b, orders, simulate,
                                            virtual_stage)
from tests.dist_harness import run_distributed
from tests.test_pipeline_schedule import BATCH, DIM, expected_order, make_blocks, make_data, reference, run_blocks

NUM_BLOCKS = 8  # divisible by every stages x chunks below
TIMEOUT = 120.0


# ------------------------------------------------------------------ the schedule as data

def megatron_order(rank: int, p: int, v: int, m: int) -> list[str]:
    """Megatron's interleaved order, written from its k -> (micro, chunk) formulas."""
    total = m * v
    def fwd(k):
        return Op("F", (k // (p * v)) * p + k % p, (k // p) % v)
    def bwd(k):
        return Op("B", (k // (p * v)) * p + k % p, v - 1 - (k // p) % v)
    warm = total if m == p else min((p - rank - 1) * 2 + (v - 1) * p, total)
    out = [fwd(k) for k in range(warm)]
    for i in range(total - warm):
        out += [fwd(warm + i), bwd(i)]
    return [str(o) for o in out + [bwd(k) for k in range(total - warm, total)]]


@pytest.mark.parametrize("p,v,m", [(2, 2, 2), (2, 2, 4), (2, 3, 6), (4, 2, 4), (4, 2, 8), (4, 4, 12), (3, 2, 9)])
def test_interleaved_order_is_megatrons(p, v, m):
    for r in range(p):
        assert [str(o) for o in interleaved_1f1b(r, p, v, m)] == megatron_order(r, p, v, m)


@pytest.mark.parametrize("p,m", [(1, 3), (2, 1), (2, 5), (4, 8)])
def test_one_chunk_is_plain_1f1b(p, m):
    for r in range(p):
        assert [str(o) for o in interleaved_1f1b(r, p, 1, m)] == expected_order(r, p, m)
        assert one_f_one_b(r, p, m) == interleaved_1f1b(r, p, 1, m)


@pytest.mark.parametrize("p,v,m", [(2, 1, 4), (4, 1, 8), (4, 1, 3), (2, 2, 4), (4, 2, 8), (4, 4, 8), (8, 2, 16)])
def test_bubble_is_p_minus_1_over_v_m(p, v, m):
    # With backward = 2 forwards and m a multiple of p, idle time / compute time = (p - 1) / (v m).
    sim = bubble(p, v, m)
    assert sim.bubble_ratio == pytest.approx((p - 1) / (v * m))
    assert sim.busy == 3 * m * v
    # Each rank runs every (micro, chunk) forward and backward exactly once.
    for r, timed in enumerate(sim.timed):
        assert sorted(t.op for t in timed) == sorted(Op(k, mi, c) for k in "FB" for mi in range(m) for c in range(v))
        assert all(a.end <= b.start for a, b in zip(timed, timed[1:]))


def test_simulated_order_respects_every_dependency():
    sim = bubble(4, 2, 8)
    for r, timed in enumerate(sim.timed):
        for t in timed:
            s = virtual_stage(t.op.chunk, r, 4)
            if t.op.kind == "F" and s > 0:
                assert sim.end_of((s - 1) % 4, Op("F", t.op.micro, (s - 1) // 4)) <= t.start
            if t.op.kind == "B":
                assert sim.end_of(r, Op("F", t.op.micro, t.op.chunk)) <= t.start
                if s < 7:
                    assert sim.end_of((s + 1) % 4, Op("B", t.op.micro, (s + 1) // 4)) <= t.start


def test_an_order_that_deadlocks_is_refused():
    good = orders(2, 1, 2)
    bad = [list(good[0]), [Op("B", 0), Op("F", 0), Op("F", 1), Op("B", 1)]]  # backward before its forward
    with pytest.raises(ValueError, match="deadlocks"):
        simulate(bad, virtual=1)


def test_interleaving_needs_micro_batches_in_groups_of_p():
    with pytest.raises(ValueError, match=r"micro-batches per pipeline \(6\) to be a multiple of the pipeline stages \(4\)"):
        interleaved_1f1b(0, 4, 2, 6)


# ------------------------------------------------------------------ the executor on gloo ranks

def interleaved_worker(rank: int, world_size: int, p: int, v: int, num_micro: int, forward_only: bool):
    replica, stage = divmod(rank, p)
    blocks, data = make_blocks(NUM_BLOCKS), make_data(num_micro, replica)
    placement = Placement(stage=stage, stages=p, virtual=v)
    chunk_blocks = {c: list(placement.chunk_layer_indices(NUM_BLOCKS, c)) for c in range(v)}
    order: list[str] = []

    def stage_fn(micro: int, chunk: int, x):
        order.append(str(Op("F", micro, chunk)))
        s = virtual_stage(chunk, stage, p)
        h = run_blocks([blocks[i] for i in chunk_blocks[chunk]], data[micro][0] if s == 0 else x)
        out = F.mse_loss(h, data[micro][1]) / num_micro if s == p * v - 1 else h
        if out.requires_grad:
            out.register_hook(lambda g: order.append(str(Op("B", micro, chunk))))
        return out

    losses = run_scheduled_pipeline(stage_fn, num_micro, range(replica * p, (replica + 1) * p), stage, v,
                                    (BATCH, DIM), torch.float32, torch.device("cpu"), forward_only=forward_only)
    mine = [i for c in range(v) for i in chunk_blocks[c]]
    grads = {f"{i}.{n}": q.grad for i in mine for n, q in blocks[i].named_parameters()}
    return {"replica": replica, "stage": stage, "losses": losses, "grads": grads, "order": order}


def check(results, p: int, v: int, num_micro: int, forward_only: bool = False):
    for replica in range(len(results) // p):
        ref_losses, ref_grads = reference(num_micro, replica, NUM_BLOCKS)
        ranks = results[replica * p:(replica + 1) * p]
        assert all(r["losses"] == [] for r in ranks[:-1])
        # Same fp32 ops in the same order as the plain loop: bit for bit.
        assert torch.equal(torch.stack(ranks[-1]["losses"]), torch.stack(ref_losses))
        grads = {k: g for r in ranks for k, g in r["grads"].items()}
        assert sorted(grads) == sorted(ref_grads)
        for name, ref in ref_grads.items():
            if forward_only:
                assert grads[name] is None, name
            else:
                assert torch.equal(grads[name], ref), name
        for r in ranks:
            want = ([str(Op("F", m, c)) for m in range(num_micro) for c in range(v)] if forward_only
                    else [str(o) for o in interleaved_1f1b(r["stage"], p, v, num_micro)])
            assert r["order"] == want, (r["stage"], r["order"])


@pytest.mark.parametrize("p,v,m", [(2, 2, 2), (2, 2, 6), (2, 4, 4), (4, 2, 4), (4, 2, 8), (2, 1, 3)])
def test_interleaved_1f1b_matches_grad_accumulation_bit_for_bit(p, v, m):
    check(run_distributed(interleaved_worker, p, (p, v, m, False), timeout=TIMEOUT), p, v, m)


def test_two_interleaved_pipelines_side_by_side():
    results = run_distributed(interleaved_worker, 4, (2, 2, 4, False), timeout=TIMEOUT)
    check(results, 2, 2, 4)
    assert not torch.equal(torch.stack(results[1]["losses"]), torch.stack(results[3]["losses"]))


@pytest.mark.parametrize("p,v,m", [(2, 2, 3), (4, 2, 1)])
def test_forward_only_any_number_of_micro_batches(p, v, m):
    check(run_distributed(interleaved_worker, p, (p, v, m, True), timeout=TIMEOUT), p, v, m, forward_only=True)


# ------------------------------------------------------------------ msg-bench pipeline

def test_msg_bench_pipeline_report(tmp_path):
    import json
    from megatron_msg.parallel.pipeline_bench import run_pipeline_bench
    report = run_pipeline_bench(str(tmp_path), stages=2, virtuals=(1, 2), micro_batches=(2,), repeats=1)
    saved = json.loads((tmp_path / "pipeline.json").read_text())
    assert saved["schedule"] == report["schedule"] and len(saved["measured"]) == 2
    plain = {(r["stages"], r["micro_batches"]): r["bubble"] for r in saved["schedule"] if r["virtual"] == 1}
    for r in saved["schedule"]:
        assert r["bubble"] == pytest.approx((r["stages"] - 1) / (r["virtual"] * r["micro_batches"]))
        assert r["bubble"] <= plain[(r["stages"], r["micro_batches"])]
    for r in saved["measured"]:
        assert r["step_s"] > 0 and r["alone_s"] > 0 and r["schedule_bubble"] == pytest.approx(0.5 / r["virtual"])
    md = (tmp_path / "pipeline.md").read_text()
    assert "## Pipeline bubble, from the schedule" in md and "## Measured: 2 ranks" in md


@pytest.mark.parametrize("args,message", [
    (["--micro-batches", "3"], "interleaved 1F1B needs multiples of --stages 2"),
    (["--device", "cuda", "--stages", "64"], "needs 64 GPUs"),
])
def test_msg_bench_pipeline_bad_arguments_exit_2(args, message, capsys, tmp_path):
    from megatron_msg.cli.bench import main
    with pytest.raises(SystemExit) as exc:
        main(["pipeline", "--out", str(tmp_path), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "pipeline.json").exists()
