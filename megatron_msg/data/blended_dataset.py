"""Weighted blending of several datasets into one.

The blending index (which dataset, which of its samples, for every blended sample) comes from
``build_blending_index`` (C++ or numpy) and is cached.  Each component is then built with
exactly as many samples as the blend draws from it, so nothing is over- or under-allocated.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from .errors import TooLittleDataError
from .index_builders import build_blending_index, normalize_weights
from .index_cache import IndexCache


def blending_indices(weights: Sequence[float], size: int, cache: IndexCache, description: dict,
                     backend: str = "auto") -> Tuple[np.ndarray, np.ndarray]:
    w = normalize_weights(weights)

    def build() -> Dict[str, np.ndarray]:
        which, within = build_blending_index(w, size, backend=backend)
        return {"dataset_index": which, "dataset_sample_index": within}

    arrays = cache.load_or_build("BlendedDataset", dict(description, weights=w.tolist(), size=size), build)
    return arrays["dataset_index"], arrays["dataset_sample_index"]


class BlendedDataset:
    """``ds[i] == datasets[dataset_index[i]][dataset_sample_index[i]]``; ``len(ds) == size``."""

    def __init__(self, datasets: List, dataset_index: np.ndarray, dataset_sample_index: np.ndarray) -> None:
        counts = np.bincount(np.asarray(dataset_index, dtype=np.int64), minlength=len(datasets))
        for d, (dataset, needed) in enumerate(zip(datasets, counts)):
            if needed and (dataset is None or len(dataset) < needed):
                raise TooLittleDataError(f"blended dataset {d} has {0 if dataset is None else len(dataset)} samples, "
                                 f"the blend needs {int(needed)}")
        self.datasets = datasets
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int):
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for blended dataset of {n} samples")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
