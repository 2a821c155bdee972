"""Reading JSON Lines files with errors that name the file and line."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def iter_jsonl(path: Path, error: type[Exception] = ValueError, torn_tail_ok: bool = False,
               warn: Callable[[str], None] = _warn) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of ``path``; a line that is not JSON
    raises ``error`` with ``path:line`` and the parser's reason.

    ``torn_tail_ok``: a malformed *last* line (what a write cut by a kill or a full disk leaves)
    is skipped with a warning naming the file instead; a malformed line before it is still an
    error, since nothing but damage puts one there.
    """
    with Path(path).open(encoding="utf-8", errors="replace") as fh:
        lines = fh.read().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            if torn_tail_ok and i == last:
                warn(f"{path}:{i + 1}: the last line is cut off ({exc.msg}); it is left out")
                return
            raise error(f"{path}:{i + 1}: malformed JSON ({exc.msg})") from None
        yield i + 1, value
