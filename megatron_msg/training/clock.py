"""Wall time a run has spent, by kind, carried across resumes (``time_s`` in metrics.jsonl).

The paper's claim is wall time, so every record says how long the run has trained so far, with
evaluation apart (evaluation costs the same whatever the schedule, and a benchmark that evaluates
often would otherwise flatter the slower run).  Checkpoint saves are counted apart too: they depend
on the file system, not on the schedule.  A resumed run continues the checkpoint's clock; the
time between that checkpoint and a kill is lost, as the steps are.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass


@dataclass
class RunClock:
    train_s: float = 0.0  # steps, growth events included
    eval_s: float = 0.0   # validation evaluations
    save_s: float = 0.0   # checkpoint saves

    def __post_init__(self):
        self._running: dict[str, float] = {}  # kind -> start of the interval being timed (not state)

    @contextmanager
    def timing(self, kind: str, within: str | None = None):
        """Add the time the block takes to ``kind``; ``within``: a kind being timed around this block,
        which then does not count it (an evaluation inside a training step's lookahead)."""
        start = time.perf_counter()
        self._running[kind] = start
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            del self._running[kind]
            setattr(self, f"{kind}_s", getattr(self, f"{kind}_s") + spent)
            if within is not None:
                setattr(self, f"{within}_s", getattr(self, f"{within}_s") - spent)

    def so_far(self, kind: str) -> float:
        """``kind``'s time including the interval being timed now."""
        start = self._running.get(kind)
        return getattr(self, f"{kind}_s") + (0.0 if start is None else time.perf_counter() - start)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict | None) -> "RunClock":
        """The clock a checkpoint recorded (none before this field existed: from zero)."""
        return cls(**{k: float(v) for k, v in (state or {}).items() if k in cls.__dataclass_fields__})
