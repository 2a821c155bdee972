"""Run logging: JSONL records (the source of truth), TensorBoard, console progress bar."""
from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_msg.metrics_file import iter_metrics


class MetricsError(ValueError):
    """A metrics.jsonl that cannot be read (the message names the file and line)."""


class MetricsLog:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    ``enabled=False`` (every rank but 0 of a parallel run) makes it read-only: writes are dropped.
    """

    def __init__(self, out_dir: Path, tensorboard: bool, enabled: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(Path(out_dir) / "tb"))
            except ImportError:  # tensorboard is an optional extra
                self.writer = None

    def truncate_from(self, step: int, stages_applied: int = 0) -> None:
        """Drop records at or after ``step`` (a resumed run rewrites them); atomic.

        Growth records of the first ``stages_applied`` stages stay: a checkpoint grown
        offline (msg-grow) is at the growth's own step, and the resumed run will not
        grow (or log) that stage again.
        """
        if not self.enabled or not self.path.exists():
            return

        def kept(record: dict) -> bool:
            if record.get("kind") == "growth" and record.get("stage", stages_applied) < stages_applied:
                return True
            return record.get("step", -1) < step

        # A last line cut by a kill is dropped (with a warning): the step it logged is rerun.
        keep = [json.dumps(rec) for _, rec in iter_metrics(self.path, MetricsError) if kept(rec)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [rec for _, rec in iter_metrics(self.path, MetricsError)]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
