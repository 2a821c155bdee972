"""Tensor x pipeline x data parallel topology and its process groups.

Rank order is Megatron's: tensor-parallel rank varies fastest, then data, then
pipeline, so a TP group is a block of consecutive ranks (one node's GPUs):

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

:class:`ParallelState` is the one object the model, pipeline and trainer get
passed; there are no module-level globals.  ``ParallelState.single()`` is the
one-process state (every group ``None``, every collective a no-op), so the same
code runs on one CPU and on a cluster.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist



class TopologyError(ValueError):
    """A parallel layout that cannot run this model; raised before training starts."""


@dataclass(frozen=True)
class Coords:
    tp: int
    pp: int
    dp: int


@dataclass(frozen=True)
class Topology:
    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> Coords:
        return Coords(tp=rank % self.tp, dp=(rank // self.tp) % self.dp, pp=rank // (self.tp * self.dp))

    def rank_of(self, tp: int, pp: int, dp: int) -> int:
        return tp + self.tp * (dp + self.dp * pp)

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank_of(t, p, d) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank_of(t, p, d) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank_of(t, p, d) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def mp_groups(self) -> list[list[int]]:
        """Model-parallel groups (TP x PP): the ranks that together hold one model replica."""
        return [[self.rank_of(t, p, d) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)]


def _new_groups(all_groups: list[list[int]], rank: int, timeout_s: float):
    """Create every group (collective: all ranks must call it in the same order); return ours.

    ``timeout_s`` is passed explicitly: a new group does not inherit the default group's timeout
    (torch gives it its own 30-minute default), and it is what bounds the wait for a hung rank.
    """
    mine = None
    for ranks in all_groups:
        g = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))
        if rank in ranks:
            mine = g
    return mine


@dataclass
class ParallelState:
    """Everything a rank knows about the parallel layout; passed, never global."""

    topology: Topology = field(default_factory=Topology)
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None
    mp_group: object = None
    embed_group: object = None  # first + last pipeline stage (tied embedding), pp > 1 only
    timeout_s: float = 1800.0   # every group's collective timeout (parallel.timeout_s)
    # Model chunks per pipeline stage (parallel.virtual_stages, interleaved 1F1B); in effect
    # only with pp > 1 (see vpp_size).
    virtual: int = 1

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "ParallelState":
        return cls(device=torch.device(device))

    @classmethod
    def create(cls, topology: Topology, device: torch.device | str, timeout_s: float = 1800.0,
               virtual: int = 1) -> "ParallelState":
        """Build every process group of ``topology`` (torch.distributed must be initialised), each
        with collectives that fail after ``timeout_s`` seconds."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world != topology.world_size:
            raise TopologyError(f"world size {world} != parallel.tp * pp * dp = {topology.tp} * "
                                f"{topology.pp} * {topology.dp} = {topology.world_size}")
        if world == 1:
            return cls(topology=topology, device=torch.device(device), timeout_s=timeout_s, virtual=virtual)
        rank = dist.get_rank()
        t = topology
        state = cls(topology=t, rank=rank, device=torch.device(device), timeout_s=timeout_s, virtual=virtual)
        state.tp_group = _new_groups(t.tp_groups(), rank, timeout_s)
        state.pp_group = _new_groups(t.pp_groups(), rank, timeout_s)
        state.dp_group = _new_groups(t.dp_groups(), rank, timeout_s)
        state.mp_group = _new_groups(t.mp_groups(), rank, timeout_s)
        if t.pp > 1:
            embed = [[g[0], g[-1]] for g in t.pp_groups()]
            state.embed_group = _new_groups(embed, rank, timeout_s)
        return state

    @property
    def coords(self) -> Coords:
        return self.topology.coords(self.rank)

    @property
    def tp_size(self) -> int:
        return self.topology.tp

    @property
    def tp_rank(self) -> int:
        return self.coords.tp

    @property
    def pp_size(self) -> int:
        return self.topology.pp

    @property
    def pp_rank(self) -> int:
        return self.coords.pp

    @property
    def vpp_size(self) -> int:
        """Model chunks per pipeline stage: ``virtual`` under pipeline parallelism, else 1."""
        return self.virtual if self.topology.pp > 1 else 1

    def pipeline_ranks(self) -> list[int]:
        """Global ranks of this rank's pipeline, stage 0 first."""
        c, t = self.coords, self.topology
        return [t.rank_of(c.tp, s, c.dp) for s in range(t.pp)]

    @property
    def dp_size(self) -> int:
        return self.topology.dp

    @property
    def dp_rank(self) -> int:
        return self.coords.dp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.topology.pp - 1
