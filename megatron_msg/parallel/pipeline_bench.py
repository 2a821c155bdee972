"""``msg-bench pipeline``: the pipeline bubble of plain vs interleaved 1F1B, from the schedule and measured.

Two tables:

1. **From the schedule** (parallel/schedule.py, backward = 2 forwards, free communication):
   idle / compute time, Megatron's bubble convention ((p-1)/m for plain 1F1B, (p-1)/(v m)
   interleaved), and the first stage's activation peak relative to plain 1F1B's.
2. **Measured** on this machine: ``--stages`` gloo (or NCCL) ranks run the real executor
   (pipeline.py for one chunk, interleaved.py for several) over a stack of Linear+tanh blocks;
   each rank first times its own share of the work alone (forward and backward of all its
   blocks for every micro-batch, no communication), and the measured bubble is
   ``step time / that time - 1``. The same model and batches for every ``v``, so step-time
   ratios between rows are the speed-up of interleaving, transfers included.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from megatron_msg.parallel.schedule import bubble, virtual_stage

BLOCKS, DIM, BATCH = 8, 1024, 64


def schedule_rows(stages=(2, 4, 8), virtuals=(1, 2, 4), groups=(1, 2, 4)) -> list[dict]:
    rows = []
    for p in stages:
        for g in groups:
            m = g * p
            plain = bubble(p, 1, m)
            for v in virtuals:
                sim = bubble(p, v, m)
                rows.append({"stages": p, "micro_batches": m, "virtual": v, "bubble": sim.bubble_ratio,
                             "idle_fraction": sim.bubble_fraction,
                             "activation_peak_vs_plain": (sim.peak_in_flight(0) / v) / plain.peak_in_flight(0)})
    return rows


def _blocks() -> torch.nn.ModuleList:
    torch.manual_seed(0)
    return torch.nn.ModuleList(torch.nn.Linear(DIM, DIM) for _ in range(BLOCKS))


def _run(blocks, h):
    for b in blocks:
        h = torch.tanh(b(h))
    return h


def _timed(f, repeats: int, sync) -> float:
    """Median seconds of ``f`` over ``repeats`` runs, each ending when the slowest rank ends."""
    f()  # warm-up
    samples = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _worker(rank: int, world: int, tmp: str, cases: list[tuple[int, int]], repeats: int, out: str,
            device_type: str) -> None:
    import torch.distributed as dist
    from megatron_msg.model.placement import Placement
    from megatron_msg.parallel.interleaved import run_chunked_pipeline
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{tmp}/rendezvous",
                            rank=rank, world_size=world)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    blocks = _blocks().to(device)
    results = []
    for v, m in cases:
        placement = Placement(stage=rank, stages=world, virtual=v)
        chunk = {c: [blocks[i] for i in placement.chunk_layer_indices(BLOCKS, c)] for c in range(v)}
        g = torch.Generator().manual_seed(1)
        data = [torch.randn(BATCH, DIM, generator=g).to(device) for _ in range(m)]
        last = world * v - 1

        def fn(i, c, x):
            s = virtual_stage(c, rank, world)
            h = _run(chunk[c], data[i] if s == 0 else x)
            return h.square().mean() / m if s == last else h

        def alone():  # this rank's compute without any transfer: the bubble-free time
            for i in range(m):
                for c in range(v):
                    x = data[i].clone().requires_grad_(True)
                    _run(chunk[c], x).square().mean().backward()

        def step():
            run_chunked_pipeline(fn, m, range(world), rank, v, (BATCH, DIM), torch.float32, device)

        results.append({"virtual": v, "micro_batches": m, "alone_s": _timed(alone, repeats, sync),
                         "step_s": _timed(step, repeats, sync)})
        for b in blocks:
            b.zero_grad(set_to_none=True)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def measure(stages: int, virtuals, micro_batches, repeats: int, device_type: str = "cpu") -> list[dict]:
    import torch.multiprocessing as mp
    cases = [(v, m) for m in micro_batches for v in virtuals]
    with tempfile.TemporaryDirectory(prefix="msg-pipe-") as tmp:
        out = f"{tmp}/rank0.json"
        mp.start_processes(_worker, args=(stages, tmp, cases, repeats, out, device_type), nprocs=stages,
                           start_method="spawn")
        rows = json.loads(Path(out).read_text())
    base = {r["micro_batches"]: r["step_s"] for r in rows if r["virtual"] == 1}
    # Every v does the same compute for a given m (chunking only regroups the blocks): the
    # fastest of its measurements is the best estimate of the bubble-free time.
    alone = {m: min(r["alone_s"] for r in rows if r["micro_batches"] == m) for m in micro_batches}
    for r in rows:
        r["measured_bubble"] = r["step_s"] / alone[r["micro_batches"]] - 1
        r["schedule_bubble"] = bubble(stages, r["virtual"], r["micro_batches"]).bubble_ratio
        r["speedup_vs_plain"] = base[r["micro_batches"]] / r["step_s"] if r["micro_batches"] in base else None
    return rows


def render(schedule: list[dict], measured: list[dict], stages: int, device_type: str = "cpu") -> str:
    lines = ["## Pipeline bubble, from the schedule (backward = 2 forwards, free transfers)", "",
             "| p | m | v | bubble (idle / compute) | (p-1)/(v m) | idle share | first-stage activations vs plain |",
             "|---|---|---|---|---|---|---|"]
    for r in schedule:
        p, m, v = r["stages"], r["micro_batches"], r["virtual"]
        lines.append(f"| {p} | {m} | {v} | {r['bubble']:.3f} | {(p - 1) / (v * m):.3f} | "
                     f"{r['idle_fraction']:.1%} | {r['activation_peak_vs_plain']:.3f}x |")
    if measured:
        where = "gloo, one CPU thread each" if device_type == "cpu" else "NCCL, one GPU each"
        lines += ["", f"## Measured: {stages} ranks ({where}), {BLOCKS} blocks Linear({DIM})+tanh, "
                      f"micro-batch {BATCH}", "",
                  "| m | v | step ms | compute alone ms | measured bubble | schedule bubble | speed-up vs v=1 |",
                  "|---|---|---|---|---|---|---|"]
        for r in measured:
            sp = "" if r["speedup_vs_plain"] is None else f"{r['speedup_vs_plain']:.2f}x"
            lines.append(f"| {r['micro_batches']} | {r['virtual']} | {r['step_s'] * 1e3:.1f} | "
                     f"{min(x['alone_s'] for x in measured if x['micro_batches'] == r['micro_batches']) * 1e3:.1f} | "
                         f"{r['measured_bubble']:.3f} | {r['schedule_bubble']:.3f} | {sp} |")
    return "\n".join(lines) + "\n"


def run_pipeline_bench(out_dir: str, stages: int = 2, virtuals=(1, 2, 4), micro_batches=(2, 4, 8),
                       repeats: int = 7, measure_steps: bool = True, device_type: str = "cpu") -> dict:
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device_type!r}: cpu or cuda")
    if measure_steps and device_type == "cuda" and torch.cuda.device_count() < stages:
        raise ValueError(f"--device cuda with --stages {stages} needs {stages} GPUs (one per pipeline rank; "
                         f"NCCL refuses two ranks on one GPU), this machine has {torch.cuda.device_count()}")
    if stages < 2 or BLOCKS % (stages * max(virtuals)):
        raise ValueError(f"--stages {stages} with virtual {max(virtuals)}: need >= 2 stages and "
                         f"{BLOCKS} blocks divisible by stages x virtual")
    bad = [m for m in micro_batches if m % stages]
    if bad:
        raise ValueError(f"--micro-batches {bad}: interleaved 1F1B needs multiples of --stages {stages}")
    sched = schedule_rows()
    measured = measure(stages, virtuals, micro_batches, repeats, device_type) if measure_steps else []
    report = {"date": date.today().isoformat(), "device": device_type, "torch": torch.__version__,
              "schedule": sched, "measured": measured, "stages": stages}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from megatron_msg.data.fileio import atomic_write_bytes, atomic_write_json
    atomic_write_json(str(out / "pipeline.json"), report)
    text = render(sched, measured, stages, device_type)
    atomic_write_bytes(str(out / "pipeline.md"), text.encode())
    print(text)
    return report
