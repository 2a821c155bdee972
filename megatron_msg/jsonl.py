"""Reading JSON Lines files with errors that name the file and line."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def iter_jsonl(path: Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of ``path``; a line that is not JSON
    raises ``error`` with ``path:line`` and the parser's reason."""
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            yield lineno, value
