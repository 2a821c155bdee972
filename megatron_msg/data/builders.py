"""One-call construction of train/valid/test datasets -- the API the trainer uses.

``build_gpt_datasets`` / ``build_bert_datasets`` open every corpus, split it into contiguous
train/valid/test ranges (GPT: of sequences, BERT: of documents, as Megatron-LM does), build each
split's dataset with its indices cached on disk and, when several corpora are given, blend
them by weight.  A split with weight 0 or 0 requested samples is ``None``.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .bert_dataset import BERTDataset, BERTDatasetConfig
from .blended_dataset import BlendedDataset, blending_indices
from .compat import check_tokenizer_matches
from .errors import TooLittleDataError
from .gpt_dataset import GPTDataset, GPTDatasetConfig
from .index_cache import IndexCache
from .indexed_dataset import IndexedDataset
from .splits import SPLIT_NAMES, SplitSpec, parse_splits, split_ranges
from .tokenizer import Tokenizer

PrefixesAndWeights = Union[str, Sequence[str], Sequence[Tuple[str, float]], Sequence[Union[str, float]], dict]
NumSamples = Union[None, int, Sequence[Optional[int]]]
AUTO = "auto"


def parse_prefixes_and_weights(spec: PrefixesAndWeights) -> List[Tuple[str, float]]:
    """Accepts ``"path/prefix"``, ``["a", "b"]`` (equal weights), ``[("a", 0.3), ("b", 0.7)]``,
    ``{"a": 0.3, "b": 0.7}`` or Megatron's flat ``[0.3, "a", 0.7, "b"]``."""
    if isinstance(spec, (str, os.PathLike)):
        pairs = [(os.fspath(spec), 1.0)]
    elif isinstance(spec, dict):
        pairs = [(os.fspath(p), float(w)) for p, w in spec.items()]
    else:
        items = list(spec)
        if items and all(isinstance(x, (tuple, list)) and len(x) == 2 for x in items):
            pairs = [(os.fspath(p), float(w)) for p, w in items]
        elif items and all(isinstance(x, (str, os.PathLike)) and not _is_number(x) for x in items):
            pairs = [(os.fspath(x), 1.0) for x in items]
        elif items and len(items) % 2 == 0 and all(_is_number(w) for w in items[0::2]):
            pairs = [(str(p), float(w)) for w, p in zip(items[0::2], items[1::2])]
        else:
            raise ValueError(f"prefixes_and_weights: cannot parse {spec!r}; expected a prefix, a list of prefixes, "
                             "(prefix, weight) pairs, a dict, or a flat [weight, prefix, ...] list")
    if not pairs:
        raise ValueError("prefixes_and_weights: no corpus given")
    return [(_strip_suffix(p), w) for p, w in pairs]


def _is_number(x) -> bool:
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


def _strip_suffix(prefix: str) -> str:
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def _parse_num_samples(num_samples: NumSamples) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    if num_samples is None or isinstance(num_samples, (int, np.integer)):
        return (None if num_samples is None else int(num_samples), None, None)
    values = list(num_samples) + [None] * (3 - len(num_samples))
    if len(values) != 3:
        raise ValueError(f"num_samples: expected up to 3 values (train, valid, test), got {num_samples!r}")
    return tuple(None if v is None else int(v) for v in values)  # type: ignore[return-value]


def _cache_for(cache_dir: Optional[str], first_prefix: str) -> IndexCache:
    if cache_dir == AUTO:
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(first_prefix)), "cache")
    return IndexCache(cache_dir)


def _build_split_datasets(corpora, splits, num_samples, cache, make_one, element_count, backend):
    """Shared by GPT and BERT: per split, one dataset per corpus, blended when several."""
    fractions = parse_splits(splits)
    wanted = _parse_num_samples(num_samples)
    results = []
    for s, name in enumerate(SPLIT_NAMES):
        if fractions[s] == 0 or wanted[s] == 0:
            results.append(None)
            continue
        ranges = [split_ranges(element_count(ds), fractions)[s] for ds, _ in corpora]
        if all(hi == lo for lo, hi in ranges):
            # Tiny corpora: a small split fraction can round to nothing.  Fine unless asked for.
            if wanted[s]:
                raise TooLittleDataError(f"splits: the {name} split has no documents in {[ds.prefix for ds, _ in corpora]} "
                                 f"(split fractions {fractions}) but num_samples asks for {wanted[s]}")
            results.append(None)
            continue
        if len(corpora) == 1:
            (ds, _), (lo, hi) = corpora[0], ranges[0]
            results.append(make_one(ds, np.arange(lo, hi), wanted[s], name))
            continue
        if wanted[s] is None:
            raise ValueError(f"num_samples: the {name} split blends {len(corpora)} corpora, so it needs an "
                             "explicit number of samples (weights are proportions of that number)")
        description = {"prefixes": [os.path.abspath(ds.prefix) for ds, _ in corpora], "split": name,
                       "ranges": [list(r) for r in ranges]}
        which, within = blending_indices([w for _, w in corpora], wanted[s], cache, description, backend)
        counts = np.bincount(which.astype(np.int64), minlength=len(corpora))
        parts = [make_one(ds, np.arange(lo, hi), int(c), name) if c else None
                 for (ds, _), (lo, hi), c in zip(corpora, ranges, counts)]
        results.append(BlendedDataset(parts, which, within))
    return tuple(results)


def build_gpt_datasets(prefixes_and_weights: PrefixesAndWeights, seq_len: int, seed: int = 1234,
                       splits: SplitSpec = "969,30,1", num_samples: NumSamples = None, *,
                       cache_dir: Optional[str] = AUTO, tokenizer: Optional[Tokenizer] = None,
                       backend: str = "auto"):
    """(train, valid, test) GPT datasets; each item is ``{"tokens": int64 ndarray [seq_len + 1]}``.

    ``num_samples``: ``(train, valid, test)`` counts (``None`` = one epoch of that split; an int
    means train only).  ``cache_dir``: where indices are cached (``"auto"`` = ``<data dir>/cache``,
    ``None`` = no cache).  ``tokenizer``: when given, checked against the data.
    """
    corpora = [(IndexedDataset(p), w) for p, w in parse_prefixes_and_weights(prefixes_and_weights)]
    cache = _cache_for(cache_dir, corpora[0][0].prefix)
    if tokenizer is not None:
        for ds, _ in corpora:
            check_tokenizer_matches(ds, tokenizer, cache)

    def make_one(ds, sequence_ids, n, name):
        config = GPTDatasetConfig(seq_len=seq_len, seed=seed, num_samples=n, backend=backend)
        return GPTDataset(ds, sequence_ids, config, cache, name)

    return _build_split_datasets(corpora, splits, num_samples, cache, make_one, len, backend)


def build_bert_datasets(prefixes_and_weights: PrefixesAndWeights, tokenizer: Tokenizer, max_seq_len: int = 512,
                        seed: int = 1234, splits: SplitSpec = "969,30,1", num_samples: NumSamples = None, *,
                        cache_dir: Optional[str] = AUTO, backend: str = "auto",
                        config: Optional[BERTDatasetConfig] = None):
    """(train, valid, test) BERT datasets; items are dicts of int64 ndarrays (see ``BERTDataset``).

    ``config`` overrides the masking/NSP settings (its max_seq_len, seed and num_samples are
    replaced by the arguments).  The tokenizer must have [CLS], [SEP], [MASK] and [PAD].
    """
    corpora = [(IndexedDataset(p), w) for p, w in parse_prefixes_and_weights(prefixes_and_weights)]
    cache = _cache_for(cache_dir, corpora[0][0].prefix)
    for ds, _ in corpora:
        check_tokenizer_matches(ds, tokenizer, cache)
    base = config or BERTDatasetConfig()

    def make_one(ds, document_ids, n, name):
        cfg = BERTDatasetConfig(**{**base.__dict__, "max_seq_len": max_seq_len, "seed": seed, "num_samples": n})
        return BERTDataset(ds, document_ids, tokenizer, cfg, cache, name)

    return _build_split_datasets(corpora, splits, num_samples, cache, make_one,
                                 lambda ds: ds.num_documents, backend)
