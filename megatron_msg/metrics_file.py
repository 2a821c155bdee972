"""Reading a run's ``metrics.jsonl``: every record a JSON object whose step and loss are numbers.

The trainer (resume), ``msg-grow`` (carrying the source run's records) and ``msg-compare`` all
read it, so a damaged or hand-edited file is one error naming the file and line for all three,
never an exception from inside whichever reader met it first.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from megatron_msg.jsonl import iter_jsonl

# Fields a record of this kind must have, and what they must be.
_NUMBER = (int, float)
_REQUIRED = {"train": ("step", "loss"), "valid": ("step", "loss"), "growth": ("step",)}
_TYPES = {"step": (int,), "loss": _NUMBER, "stage": (int,)}


def iter_metrics(path: Path, error: type[Exception]) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each record of ``path``; a cut last line is left out with a warning
    (what a kill leaves), anything else malformed raises ``error`` naming ``path:line``."""
    for line, record in iter_jsonl(path, error, torn_tail_ok=True):
        if not isinstance(record, dict):
            raise error(f"{path}:{line}: not a metrics record (a JSON object), got {type(record).__name__}")
        for key in _REQUIRED.get(record.get("kind"), ()):
            if key not in record:
                raise error(f"{path}:{line}: a {record['kind']!r} record without {key!r}")
        for key, types in _TYPES.items():
            value = record.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
                raise error(f"{path}:{line}: {key} is {value!r}, not a number")
        yield line, record
