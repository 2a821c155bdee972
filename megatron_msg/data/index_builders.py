"""Index builders with two interchangeable backends.

``backend="cpp"`` uses the pybind11 extension ``megatron_msg.data._helpers`` (csrc/helpers.cpp);
``backend="numpy"`` is the pure-Python/numpy fallback that *defines* the semantics; ``"auto"``
(the default) picks C++ when it was built.  Both return identical arrays -- tests pin that.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

BACKENDS = ("auto", "cpp", "numpy")


def load_cpp_helpers():
    """The compiled extension module, or ``None`` when it was not built."""
    try:
        from . import _helpers  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _helpers


def _select(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "numpy":
        return None
    helpers = load_cpp_helpers()
    if helpers is None and backend == "cpp":
        raise ImportError("megatron_msg.data._helpers is not built; reinstall with a C++ compiler "
                          "and pybind11 (`pip install -e .`) or use backend='numpy'")
    return helpers


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int,
                       backend: str = "auto") -> np.ndarray:
    """int64 array ``[n + 1, 2]`` of (position in document_index, token offset) per sample start.

    The token stream is the concatenation of ``sizes[document_index[k]]``-long sequences;
    sample ``i`` is stream positions ``[i*seq_length, (i+1)*seq_length]`` inclusive, i.e.
    ``seq_length + 1`` tokens, and ``n = (total_tokens - 1) // seq_length``.  Row ``i`` locates
    position ``i*seq_length``: the first ``k`` whose sequence ends after it, and the offset.
    """
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    document_index = np.ascontiguousarray(document_index, dtype=np.int64)
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    helpers = _select(backend)
    if helpers is not None:
        return helpers.build_sample_index(sizes, document_index, int(seq_length))
    return _sample_index_numpy(sizes, document_index, int(seq_length))


def _sample_index_numpy(sizes: np.ndarray, document_index: np.ndarray, seq_length: int) -> np.ndarray:
    if len(document_index) and (document_index.min() < 0 or document_index.max() >= len(sizes)):
        bad = int(np.flatnonzero((document_index < 0) | (document_index >= len(sizes)))[0])
        raise IndexError(f"document_index[{bad}] = {int(document_index[bad])} is outside sizes (length {len(sizes)})")
    lengths = sizes[document_index].astype(np.int64)
    if len(lengths) and lengths.min() < 0:
        raise ValueError("negative size")
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    if total == 0:
        return np.zeros((1, 2), dtype=np.int64)
    num_samples = (total - 1) // seq_length
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # First k with ends[k] > position: skips empty sequences, boundaries go to the next one.
    k = np.searchsorted(ends, positions, side="right")
    result = np.empty((num_samples + 1, 2), dtype=np.int64)
    result[:, 0] = k
    result[:, 1] = positions - (ends[k] - lengths[k])
    return result


def build_blending_index(weights: np.ndarray, size: int,
                         backend: str = "auto") -> Tuple[np.ndarray, np.ndarray]:
    """(int16 dataset id, int64 sample id within that dataset) for each of ``size`` samples.

    Greedy: sample ``s`` goes to the dataset ``d`` maximising ``w_d * (s + 1) - count_d``
    (lowest ``d`` on ties), so every prefix follows the weights to within one sample.
    ``weights`` must already be normalised (they are used as given).
    """
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0:
        raise ValueError("weights must be a non-empty 1-D array")
    if len(weights) > np.iinfo(np.int16).max:
        raise ValueError("at most 32767 datasets can be blended")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    helpers = _select(backend)
    if helpers is not None:
        return helpers.build_blending_index(weights, int(size))
    return _blending_index_python(weights, int(size))


def _blending_index_python(weights: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
    # Inherently sequential (each choice depends on all earlier ones).  Python floats are IEEE
    # doubles and the expression is the same as in C++, so the choices are bit-identical.
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    which = np.empty(size, dtype=np.int16)
    within = np.empty(size, dtype=np.int64)
    datasets = range(1, len(w))
    for s in range(size):
        step = float(s + 1)
        best, best_error = 0, w[0] * step - float(counts[0])
        for d in datasets:
            error = w[d] * step - float(counts[d])
            if error > best_error:
                best, best_error = d, error
        which[s] = best
        within[s] = counts[best]
        counts[best] += 1
    return which, within


def normalize_weights(weights, what: Optional[str] = "weights") -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"{what}: need a non-empty list of finite, non-negative numbers with a positive sum; got {list(weights)}")
    return w / w.sum()
