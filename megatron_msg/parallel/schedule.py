"""Pipeline schedules as data: each rank's order of work, a timing model of it, and its bubble.

A schedule is, per pipeline rank, a list of :class:`Op` -- a forward or a backward of one
micro-batch through one *model chunk* of that rank.  With ``virtual = v`` chunks per rank
(Megatron's interleaved schedule, "virtual pipeline stages") the model is cut into
``p * v`` virtual stages; chunk ``c`` of rank ``r`` is virtual stage ``c * p + r``, so a
micro-batch visits rank 0, 1, ..., p-1, then rank 0 again for its second chunk, and so on.

Orders:

* :func:`one_f_one_b` -- plain (non-interleaved) 1F1B: ``p - r - 1`` warm-up forwards, then
  one forward / one backward, then the backwards still owed. Bubble ``(p - 1) / m`` of the
  ideal time with ``m`` micro-batches.
* :func:`interleaved_1f1b` -- Megatron's interleaved 1F1B. Micro-batches go in groups of
  ``p``; a group runs through chunk 0, then chunk 1, ... (backwards through the chunks in
  reverse). Warm-up ``2 (p - r - 1) + (v - 1) p`` forwards. Each chunk is ``1/v`` of a
  stage, so the fill and drain shrink by ``v``: bubble about ``(p - 1) / (v m)``.
* :func:`forward_only` -- evaluation: every micro-batch through every chunk, in order.

:func:`simulate` times an order with fixed forward/backward costs per op and zero-cost
communication (each op starts when its rank is free and its inputs exist). That gives
the bubble fraction the schedule itself implies (docs/benchmarks.md quotes it), and it
gives the pipeline executor (parallel/interleaved.py) a global clock: every transfer
happens at its producer's finishing tick, which both ends of every link compute alike.
It also checks the order: an order whose ops wait on each other in a cycle (a deadlock
on real ranks) raises here, before any rank runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True, order=True)
class Op:
    """``kind`` 'F' or 'B' of micro-batch ``micro`` (0-based within the step) on chunk ``chunk``."""
    kind: str
    micro: int
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.kind}{self.micro}" + (f".{self.chunk}" if self.chunk else "")


def virtual_stage(chunk: int, rank: int, stages: int) -> int:
    return chunk * stages + rank


def rank_and_chunk(vstage: int, stages: int) -> tuple[int, int]:
    """(rank, chunk) of virtual stage ``vstage``."""
    return vstage % stages, vstage // stages


def _check(stages: int, virtual: int, num_micro: int) -> None:
    if stages < 1 or virtual < 1 or num_micro < 1:
        raise ValueError(f"pipeline schedule: stages={stages}, virtual={virtual}, micro-batches={num_micro} "
                         "must all be >= 1")


def one_f_one_b(rank: int, stages: int, num_micro: int) -> list[Op]:
    """Plain 1F1B on ``rank`` (one chunk per rank)."""
    _check(stages, 1, num_micro)
    warm = min(stages - rank - 1, num_micro)
    order = [Op("F", m) for m in range(warm)]
    for i in range(num_micro - warm):
        order += [Op("F", warm + i), Op("B", i)]
    return order + [Op("B", m) for m in range(num_micro - warm, num_micro)]


def _chunk_sequence(stages: int, virtual: int, num_micro: int, backward: bool) -> list[tuple[int, int]]:
    """(micro, chunk) in the order a rank meets them: groups of ``stages`` micro-batches, each
    through every chunk (reversed for backwards): Megatron's ``k -> (micro, chunk)`` map."""
    seq = []
    for start in range(0, num_micro, stages):
        group = range(start, min(start + stages, num_micro))
        for chunk in (reversed(range(virtual)) if backward else range(virtual)):
            seq += [(m, chunk) for m in group]
    return seq


def interleaved_1f1b(rank: int, stages: int, virtual: int, num_micro: int) -> list[Op]:
    """Megatron's interleaved 1F1B on ``rank`` with ``virtual`` chunks per rank."""
    _check(stages, virtual, num_micro)
    if virtual == 1:
        return one_f_one_b(rank, stages, num_micro)
    if num_micro % stages:
        # A last, shorter group would leave ranks idle while others fill it: a bubble larger than
        # plain 1F1B's (e.g. p=4, m=6). Megatron refuses it too.
        raise ValueError(f"interleaved 1F1B needs the micro-batches per pipeline ({num_micro}) to be a "
                         f"multiple of the pipeline stages ({stages})")
    forwards = [Op("F", m, c) for m, c in _chunk_sequence(stages, virtual, num_micro, backward=False)]
    backwards = [Op("B", m, c) for m, c in _chunk_sequence(stages, virtual, num_micro, backward=True)]
    total = len(forwards)
    # Megatron: with exactly `stages` micro-batches every forward is a warm-up forward.
    warm = total if num_micro == stages else min(2 * (stages - rank - 1) + (virtual - 1) * stages, total)
    order = forwards[:warm]
    for i in range(total - warm):
        order += [forwards[warm + i], backwards[i]]
    return order + backwards[total - warm:]


def forward_only(stages: int, virtual: int, num_micro: int) -> list[Op]:
    """Evaluation order (the same on every rank): each micro-batch through every chunk."""
    _check(stages, virtual, num_micro)
    return [Op("F", m, c) for m in range(num_micro) for c in range(virtual)]


def orders(stages: int, virtual: int, num_micro: int, train: bool = True) -> list[list[Op]]:
    """Every rank's order: index ``r`` is rank ``r``'s."""
    if not train:
        return [forward_only(stages, virtual, num_micro)] * stages
    return [interleaved_1f1b(r, stages, virtual, num_micro) for r in range(stages)]


@dataclass(frozen=True)
class Timed:
    """An op of rank ``rank`` running over ``[start, end)`` of the simulated clock."""
    op: Op
    rank: int
    start: int
    end: int


@dataclass(frozen=True)
class Simulation:
    stages: int
    virtual: int
    num_micro: int
    timed: tuple[tuple[Timed, ...], ...]  # per rank, in its order
    makespan: int

    @property
    def busy(self) -> int:
        """Time a rank spends computing (the same on every rank)."""
        return sum(t.end - t.start for t in self.timed[0])

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the pipeline's time: 1 - busy / makespan."""
        return 1.0 - self.busy / self.makespan

    @property
    def bubble_ratio(self) -> float:
        """Idle time over compute time, Megatron's convention: (p - 1) / m for plain 1F1B."""
        return (self.makespan - self.busy) / self.busy

    def peak_in_flight(self, rank: int = 0) -> int:
        """Most chunk-forwards whose backward has not yet run, held at once on ``rank`` (their
        activations are alive): ``min(p, m)`` stages' worth for plain 1F1B on rank 0."""
        live = peak = 0
        for t in self.timed[rank]:
            live += 1 if t.op.kind == "F" else -1
            peak = max(peak, live)
        return peak

    def end_of(self, rank: int, op: Op) -> int:
        return self._ends[(rank, op)]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ends", {(t.rank, t.op): t.end for ts in self.timed for t in ts})


def _dependencies(op: Op, rank: int, stages: int, virtual: int) -> list[tuple[int, Op]]:
    """The (rank, op) whose results ``op`` on ``rank`` needs: the previous virtual stage's forward
    of the same micro-batch (a forward); its own forward and the next virtual stage's backward
    (a backward)."""
    v = virtual_stage(op.chunk, rank, stages)
    if op.kind == "F":
        if v == 0:
            return []
        r, c = rank_and_chunk(v - 1, stages)
        return [(r, Op("F", op.micro, c))]
    deps = [(rank, Op("F", op.micro, op.chunk))]
    if v < stages * virtual - 1:
        r, c = rank_and_chunk(v + 1, stages)
        deps.append((r, Op("B", op.micro, c)))
    return deps


def simulate(order_per_rank: list[list[Op]], virtual: int, forward_cost: int = 1,
             backward_cost: int = 2) -> Simulation:
    """Time ``order_per_rank`` (costs per op, in ticks); ValueError if the order can deadlock."""
    stages = len(order_per_rank)
    num_micro = 1 + max(op.micro for ops in order_per_rank for op in ops)
    ends: dict[tuple[int, Op], int] = {}
    timed: list[list[Timed]] = [[] for _ in range(stages)]
    position = [0] * stages
    free = [0] * stages
    remaining = sum(len(o) for o in order_per_rank)
    while remaining:
        progressed = False
        for r in range(stages):
            while position[r] < len(order_per_rank[r]):
                op = order_per_rank[r][position[r]]
                deps = _dependencies(op, r, stages, virtual)
                if any(d not in ends for d in deps):
                    break
                start = max([free[r]] + [ends[d] for d in deps])
                end = start + (forward_cost if op.kind == "F" else backward_cost)
                ends[(r, op)] = end
                timed[r].append(Timed(op, r, start, end))
                free[r], position[r] = end, position[r] + 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(order_per_rank[r][position[r]]) for r in range(stages)
                     if position[r] < len(order_per_rank[r])}
            raise ValueError(f"pipeline schedule deadlocks: ranks wait on each other at {stuck}")
    return Simulation(stages, virtual, num_micro, tuple(tuple(t) for t in timed), max(free))


@lru_cache(maxsize=64)
def simulated(stages: int, virtual: int, num_micro: int, train: bool = True) -> Simulation:
    """The simulation of the standard order (cached: the trainer asks for it every step)."""
    return simulate(orders(stages, virtual, num_micro, train), virtual)


def bubble(stages: int, virtual: int, num_micro: int) -> Simulation:
    """The timed training order, backward costing twice a forward.

    Costs are per op, whatever the chunk size: an interleaved chunk is 1/v of a plain stage, but
    the bubble is a ratio of times, so scaling every op alike leaves it unchanged.
    """
    return simulated(stages, virtual, num_micro, True)
