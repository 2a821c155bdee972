"""Does a planned stage fit a GPU, and how long and how much does it take (``msg-plan``)?

Memory: the fullest rank's weights, gradients, optimizer state (ZeRO-partitioned),
activations (first pipeline stage at its 1F1B peak) and logits (last stage), from
growth/plan.py, plus a fixed reserve for what the plan does not model (CUDA context,
NCCL buffers, the caching allocator's slack), against the device's memory.  The parts
sit on different ranks when pp > 1 (activations peak on the first stage, logits on the
last), so adding them all is an upper bound.

Time: ``FLOPs / (GPUs x peak x MFU)``, with the peak the device's dense 16-bit tensor
throughput and MFU (model FLOPs utilisation, Megatron's definition: the plan's model
FLOPs, recomputation not counted) a stated assumption; FLM-101B reported about 52% on
A800s.  Cost: GPU-hours times a stated price per GPU-hour.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_msg.growth.plan import StagePlan, format_bytes

GIB = 2**30


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bytes: int   # what the device reports as total memory
    peak_flops: float   # dense bf16/fp16 tensor-core FLOP/s (vendor datasheet, no sparsity)


ACCELERATORS = {
    "a100": Accelerator("A100/A800 80GB", 80 * GIB, 312e12),
    "h100": Accelerator("H100 SXM 80GB", 80 * GIB, 989e12),
    "h200": Accelerator("H200 141GB", 140 * GIB, 989e12),
}
# The two memory sizes every plan is checked against (issue: A800/H100 and H200).
FIT_CHECKS = ("a100", "h200")
# Memory the plan does not model: CUDA context, NCCL buffers, allocator slack.
RESERVE_BYTES = 4 * GIB


@dataclass(frozen=True)
class Fit:
    accelerator: Accelerator
    total_bytes: int        # the plan's components plus RESERVE_BYTES
    fits: bool
    largest: str            # the largest component (what to shrink first when it does not fit)

    def describe(self) -> str:
        if self.fits:
            return f"yes ({self.total_bytes / GIB:.1f} of {self.accelerator.memory_bytes / GIB:.0f} GiB)"
        over = (self.total_bytes - self.accelerator.memory_bytes) / GIB
        return f"NO: {over:.1f} GiB over; largest part: {self.largest}"


def fit(plan: StagePlan, accelerator: Accelerator, reserve: int = RESERVE_BYTES) -> Fit:
    parts = plan.memory_bytes
    total = sum(parts.values()) + reserve
    name, size = max(parts.items(), key=lambda kv: kv[1])
    return Fit(accelerator, total, total <= accelerator.memory_bytes, f"{name} {size / GIB:.1f} GiB")


@dataclass(frozen=True)
class Timing:
    seconds: float
    gpu_hours: float
    cost: float


def timing(plan: StagePlan, accelerator: Accelerator, mfu: float, usd_per_gpu_hour: float) -> Timing:
    """Wall time of the stage on its layout's GPUs at ``mfu`` of the device's peak."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    seconds = plan.flops / (plan.gpus * accelerator.peak_flops * mfu)
    gpu_hours = seconds / 3600 * plan.gpus
    return Timing(seconds, gpu_hours, gpu_hours * usd_per_gpu_hour)


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.2f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def format_hardware(plans: list[StagePlan], accelerator: Accelerator, mfu: float, usd_per_gpu_hour: float) -> str:
    """Per stage: the fullest rank's memory by component, fit on 80 GB and 141 GB, time and cost."""
    checks = [ACCELERATORS[k] for k in FIT_CHECKS]
    head = ("| stage | GPUs | weights | gradients | optimizer | activations | logits | "
            + " | ".join(f"fits {a.name}" for a in checks)
            + f" | time on {accelerator.name} at {mfu:.0%} MFU | GPU-hours | cost |")
    rows = [head, "|" + "---|" * (10 + len(checks))]
    total_s = total_h = total_cost = 0.0
    for p in plans:
        parts = p.memory_bytes
        t = timing(p, accelerator, mfu, usd_per_gpu_hour)
        total_s, total_h, total_cost = total_s + t.seconds, total_h + t.gpu_hours, total_cost + t.cost
        rows.append(f"| {p.name} | {p.gpus} | " + " | ".join(format_bytes(parts[k]) for k in
                                                             ("weights", "gradients", "optimizer", "activations",
                                                              "logits"))
                    + " | " + " | ".join(fit(p, a).describe() for a in checks)
                    + f" | {_duration(t.seconds)} | {t.gpu_hours:,.0f} | ${t.cost:,.0f} |")
    rows.append("")
    rows.append(f"whole schedule: {_duration(total_s)} on {plans[0].gpus} GPU(s), {total_h:,.0f} GPU-hours, "
                f"${total_cost:,.0f} at ${usd_per_gpu_hour:.2f} per GPU-hour (peak {accelerator.peak_flops / 1e12:.0f} "
                f"TFLOP/s, MFU {mfu:.0%}: both assumptions, --gpu / --mfu / --usd-per-gpu-hour).")
    rows.append(f"Fit: the components above plus {RESERVE_BYTES // GIB} GiB for CUDA context, NCCL buffers and "
                "allocator slack; with pp > 1 activations (first stage) and logits (last stage) sit on different "
                "ranks, so the sum is an upper bound.")
    return "\n".join(rows)
