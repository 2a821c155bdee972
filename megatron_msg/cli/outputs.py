"""A command that fails leaves no partial output.

Checkpoint writers already write to a temporary directory and rename it at the end, so a *kill*
leaves at most a ``.tmp-*`` directory that the next run removes.  An *error* is different: the
command is still alive and knows its output is unusable, so it removes what it added (a new output
directory whole; in a directory that was there before, the entries it created) before it reports.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def removed_on_failure(path: str | Path) -> Iterator[None]:
    """On an exception, remove what the block added at ``path`` (all of it if it did not exist)."""
    path = Path(path)
    existed = path.exists()
    before = set(path.iterdir()) if path.is_dir() else set()
    try:
        yield
    except BaseException:
        if not existed:
            _remove(path)
        elif path.is_dir():
            for added in set(path.iterdir()) - before:
                _remove(added)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
