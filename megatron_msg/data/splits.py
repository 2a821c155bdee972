"""Train/valid/test splits: contiguous ranges of documents, as Megatron-LM does it."""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")
SplitSpec = Union[str, Sequence[float]]


def parse_splits(splits: SplitSpec) -> Tuple[float, float, float]:
    """``"969,30,1"``, ``(0.9, 0.1)`` or ``[98, 1, 1]`` -> normalised (train, valid, test)."""
    if isinstance(splits, str):
        try:
            values = [float(x) for x in splits.replace("/", ",").split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"splits: expected comma-separated numbers like '969,30,1', got {splits!r}") from None
    else:
        values = [float(x) for x in splits]
    if not 1 <= len(values) <= 3:
        raise ValueError(f"splits: expected 1 to 3 weights (train, valid, test), got {values}")
    values += [0.0] * (3 - len(values))
    if any(v < 0 or not np.isfinite(v) for v in values) or sum(values) <= 0:
        raise ValueError(f"splits: weights must be finite, non-negative and not all zero, got {values}")
    total = sum(values)
    return tuple(v / total for v in values)  # type: ignore[return-value]


def split_ranges(num_elements: int, fractions: Sequence[float]) -> Tuple[Tuple[int, int], ...]:
    """Contiguous [start, end) ranges over ``num_elements`` in the given proportions.

    Rounded boundaries of the cumulative fractions, so the ranges tile ``[0, num_elements)``
    exactly and a split with weight 0 is empty.
    """
    cumulative = np.cumsum(np.asarray(fractions, dtype=np.float64))
    bounds = [0] + [int(round(c * num_elements)) for c in cumulative]
    bounds[-1] = num_elements
    return tuple((bounds[i], max(bounds[i], bounds[i + 1])) for i in range(len(fractions)))
