"""GPT dataset: fixed-length samples cut from the shuffled token stream of one corpus split.

Three indices, all deterministic functions of (data, split, seq_len, seed, num_samples) and
cached on disk (``IndexCache``):

* document index -- the split's sequences repeated for as many epochs as ``num_samples``
  needs, shuffled (``numpy.random.RandomState(seed)``);
* sample index   -- where each sample starts in that stream (``build_sample_index``, C++ or
  numpy);
* shuffle index  -- a permutation of the samples.

As in Megatron-LM, when the last epoch is needed only for a small part (< 80 % of an epoch)
it is shuffled separately, so the samples actually used are spread over whole epochs instead
of the last epoch's documents being mixed into (and over-represented in) the others.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from .errors import TooLittleDataError
from .index_builders import build_sample_index
from .index_cache import IndexCache
from .indexed_dataset import IndexedDataset

# Below this fraction of an epoch the final epoch is shuffled on its own (Megatron-LM's value).
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


@dataclass(frozen=True)
class GPTDatasetConfig:
    seq_len: int                       # tokens per sample; each sample returns seq_len + 1 tokens
    seed: int = 1234
    num_samples: Optional[int] = None  # None: exactly one epoch of the split
    backend: str = "auto"              # index builder: "auto" | "cpp" | "numpy"

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len: must be >= 1, got {self.seq_len}")
        if self.num_samples is not None and self.num_samples < 0:
            raise ValueError(f"num_samples: must be >= 0, got {self.num_samples}")


class GPTDataset:
    """``ds[i] == {"tokens": np.ndarray[int64, seq_len + 1]}`` (inputs are ``[:-1]``, labels ``[1:]``).

    ``len(ds)`` is ``num_samples`` when given, else the number of full samples in one epoch.
    Samples run across document boundaries; each document ends with the EOD token written by
    ``msg-preprocess``.
    """

    def __init__(self, indexed: IndexedDataset, sequence_ids: np.ndarray, config: GPTDatasetConfig,
                 cache: IndexCache = IndexCache(None), name: str = "train") -> None:
        self.indexed = indexed
        self.config = config
        self.name = name
        sequence_ids = np.asarray(sequence_ids, dtype=np.int64)
        sizes = indexed.sequence_lengths
        tokens_per_epoch = int(sizes[sequence_ids].astype(np.int64).sum()) if len(sequence_ids) else 0
        if tokens_per_epoch < config.seq_len + 1:
            raise TooLittleDataError(
                f"{indexed.prefix} ({name} split): {tokens_per_epoch} tokens in {len(sequence_ids)} sequences, "
                f"fewer than one sample of seq_len + 1 = {config.seq_len + 1} tokens; use more data or a different split")
        self.tokens_per_epoch = tokens_per_epoch
        description = {
            "prefix": os.path.abspath(indexed.prefix), "num_sequences": len(indexed), "num_tokens": indexed.num_tokens,
            "split": name, "first_sequence": int(sequence_ids[0]), "num_split_sequences": len(sequence_ids),
            "seq_len": config.seq_len, "seed": config.seed, "num_samples": config.num_samples,
        }
        arrays = cache.load_or_build("GPTDataset", description, lambda: self._build_indices(sequence_ids))
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        self._length = (config.num_samples if config.num_samples is not None
                        else (tokens_per_epoch - 1) // config.seq_len)

    # Index construction --------------------------------------------------------------
    def _build_indices(self, sequence_ids: np.ndarray) -> Dict[str, np.ndarray]:
        seq_len, tpe = self.config.seq_len, self.tokens_per_epoch
        samples_per_epoch = (tpe - 1) // seq_len
        wanted = self.config.num_samples if self.config.num_samples is not None else samples_per_epoch
        num_epochs = 1
        while num_epochs * tpe < wanted * seq_len + 1:  # + 1: the last sample's extra label token
            num_epochs += 1
        samples_before_final = ((num_epochs - 1) * tpe - 1) // seq_len if num_epochs > 1 else 0
        separate_final = (num_epochs > 1 and
                          wanted - samples_before_final < int(SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch))

        rng = np.random.RandomState(self.config.seed)
        if separate_final:
            head = np.tile(sequence_ids, num_epochs - 1)
            rng.shuffle(head)
            tail = sequence_ids.copy()
            rng.shuffle(tail)
            document_index = np.concatenate([head, tail])
        else:
            document_index = np.tile(sequence_ids, num_epochs)
            rng.shuffle(document_index)

        sample_index = build_sample_index(self.indexed.sequence_lengths, document_index, seq_len,
                                          backend=self.config.backend)
        total_samples = len(sample_index) - 1
        if separate_final:
            head = np.arange(samples_before_final, dtype=np.int64)
            rng.shuffle(head)
            tail = np.arange(samples_before_final, total_samples, dtype=np.int64)
            rng.shuffle(tail)
            shuffle_index = np.concatenate([head, tail])
        else:
            shuffle_index = np.arange(total_samples, dtype=np.int64)
            rng.shuffle(shuffle_index)
        return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    # Access ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._length

    def sample_tokens(self, j: int) -> np.ndarray:
        """Tokens of sample ``j`` in stream order (before shuffling), int64[seq_len + 1]."""
        (k0, off0), (k1, off1) = self.sample_index[j], self.sample_index[j + 1]
        k0, off0, k1, off1 = int(k0), int(off0), int(k1), int(off1)
        docs = self.document_index
        if k0 == k1:
            return self.indexed.get(int(docs[k0]), off0, off1 - off0 + 1).astype(np.int64)
        parts = [self.indexed.get(int(docs[k0]), off0)]
        parts += [self.indexed[int(docs[k])] for k in range(k0 + 1, k1)]
        parts.append(self.indexed.get(int(docs[k1]), 0, off1 + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        if not -self._length <= i < self._length:
            raise IndexError(f"sample {i} out of range for {self.name} dataset of {self._length} samples")
        return {"tokens": self.sample_tokens(int(self.shuffle_index[i % self._length]))}
