"""Will the run fit?  The ``msg-plan`` memory model of every stage still to run against the memory
this rank can have, before a model is built (``train.memory_check``).

Without it, a model that cannot fit is built (or a growth stage hours later is applied) until the
allocator fails, with an error that names neither the stage nor what to change.  The estimate is
growth/plan.py's: the fullest rank's weights, gradients and optimizer state (ZeRO-partitioned),
activations kept for backward and the last stage's logits.  Unlike ``msg-plan``'s fit column,
which adds every part as an upper bound, a pipeline run counts activations (first stage) and
logits (last stage) as the separate ranks they sit on, so a run is refused only where the model
itself says it cannot fit.  The device's free memory already excludes the CUDA context and what
other processes hold; on CPU the host's available memory is shared by the ranks started on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_msg.config import ConfigError, RunConfig
from megatron_msg.growth.plan import StagePlan, format_bytes, plan_schedule


class MemoryEstimateError(ConfigError):
    """A stage still to run needs more memory per rank than this rank has (``train.memory_check``)."""


@dataclass(frozen=True)
class MemoryNeed:
    plan: StagePlan
    bytes: int  # estimated peak of this stage's fullest rank

    def describe(self) -> str:
        parts = ", ".join(f"{name} {format_bytes(size)}" for name, size in self.plan.memory_bytes.items() if size)
        return f"{self.plan.name} (step {self.plan.first_step}, {self.plan.shape}) needs ~{format_bytes(self.bytes)} ({parts})"


def rank_memory_bytes(plan: StagePlan) -> int:
    """The estimated peak of a stage's fullest rank: its state plus what it keeps for backward."""
    parts = plan.memory_bytes
    state = parts["weights"] + parts["gradients"] + parts["optimizer"]
    if plan.layout[1] == 1:  # one pipeline stage holds the activations and the logits
        return state + parts["activations"] + parts["logits"]
    return state + max(parts["activations"], parts["logits"])


def stages_to_run(cfg: RunConfig, from_step: int) -> list[MemoryNeed]:
    """The memory each stage of the schedule that still has steps after ``from_step`` needs."""
    return [MemoryNeed(plan, rank_memory_bytes(plan)) for plan in plan_schedule(cfg) if plan.last_step > from_step]


def available_bytes(device: torch.device, ranks_sharing: int = 1) -> int | None:
    """Memory this rank may use: the device's free memory on CUDA; on CPU the host's available
    memory divided among the ``ranks_sharing`` ranks started on it; None where unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024 // max(1, ranks_sharing)
    except (OSError, KeyError, ValueError):
        return None


def check_memory(cfg: RunConfig, from_step: int, available: int | None, where: str) -> None:
    """Raise MemoryEstimateError naming the first stage still to run whose estimate exceeds
    ``available`` bytes (``where`` names the memory: "cuda:0", "host")."""
    if available is None:
        return
    for need in stages_to_run(cfg, from_step):
        if need.bytes > available:
            raise MemoryEstimateError(
                f"train.memory_check: {need.describe()} per rank, but {where} has {format_bytes(available)} "
                f"available; use more GPUs (parallel.tp/pp/dp or the stage's layout), parallel.zero_stage, "
                f"train.recompute or a smaller batch_size (msg-plan shows the estimate), or set "
                f"train.memory_check=false to try anyway")
