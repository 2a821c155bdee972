"""Joining a multi-process run started by ``torchrun`` or the ``deepspeed`` launcher.

Both launchers start one process per rank and export ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (the deepspeed launcher
also appends ``--local_rank=N`` to the command line, which msg-train accepts).
Without ``WORLD_SIZE`` (or with 1) the run is a single process and no process
group is created.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_msg.config import ParallelConfig
from megatron_msg.parallel.topology import ParallelState, Topology, TopologyError


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environ(cls, local_rank_arg: int | None = None) -> "LaunchEnv":
        def env_int(name: str, default: int) -> int:
            raw = os.environ.get(name)
            if raw is None:
                return default
            try:
                return int(raw)
            except ValueError:
                raise TopologyError(f"environment variable {name}={raw!r} is not an integer") from None
        world = env_int("WORLD_SIZE", 1)
        rank = env_int("RANK", 0)
        local = env_int("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0)
        if not 0 <= rank < world:
            raise TopologyError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank, world, local)


def pick_device(requested: str, local_rank: int) -> torch.device:
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise RuntimeError("train.device: 'cuda' requested but CUDA is not available")
    if requested == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_parallel(cfg: ParallelConfig, device_name: str, env: LaunchEnv) -> ParallelState:
    """Check the layout against the launch, join the process group, build every group; every
    collective fails after ``cfg.timeout_s`` seconds (a hung or dead rank, parallel/failures.py)."""
    topo = Topology(cfg.tp, cfg.pp, cfg.dp)
    if env.world_size != topo.world_size:
        raise TopologyError(f"the launcher started {env.world_size} process(es) but parallel.tp * pp * dp = "
                            f"{cfg.tp} * {cfg.pp} * {cfg.dp} = {topo.world_size}; start "
                            f"{topo.world_size} (torchrun --nproc-per-node {topo.world_size}) or change parallel.*")
    device = pick_device(device_name, env.local_rank)
    if env.world_size == 1:
        return ParallelState(topology=topo, device=device, timeout_s=cfg.timeout_s, virtual=cfg.virtual_stages)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=cfg.timeout_s))
    return ParallelState.create(topo, device, cfg.timeout_s, virtual=cfg.virtual_stages)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
