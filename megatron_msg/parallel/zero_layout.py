"""Where ZeRO puts each entry: a rank's parameters laid end to end, cut into equal chunks over DP.

Pure arithmetic on (name, numel) lists, shared by the ZeRO optimizer (training/zero.py) and by
the tools that must know another layout's fragments without building it (checkpoint/reshard.py).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fragment:
    """Entries ``[start, end)`` of parameter ``name`` (flattened), owned by DP rank ``owner``.

    ``flat_start`` is the position of ``start`` in the rank's flat buffer.
    """
    name: str
    owner: int
    start: int
    end: int
    flat_start: int

    @property
    def numel(self) -> int:
        return self.end - self.start


def partition(sizes: list[tuple[str, int]], dp: int) -> tuple[int, list[Fragment]]:
    """(chunk size, fragments) of parameters ``sizes`` (name, numel) laid end to end over ``dp`` ranks.

    Every entry of every parameter lies in exactly one fragment; rank r's fragments
    cover flat positions ``[r * chunk, (r + 1) * chunk)``.
    """
    total = sum(n for _, n in sizes)
    chunk = max(1, -(-total // dp))
    fragments, offset = [], 0
    for name, n in sizes:
        pos = offset
        while pos < offset + n:
            owner = pos // chunk
            end = min(offset + n, (owner + 1) * chunk)
            fragments.append(Fragment(name, owner, pos - offset, end - offset, pos))
            pos = end
        offset += n
    return chunk, fragments
