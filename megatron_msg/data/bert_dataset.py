"""BERT dataset: sentence-pair samples with masked-LM targets and a next-sentence label.

Sample mapping (built once, cached): each document of the split is cut greedily into runs of
consecutive sequences (sentences, when preprocessed with sentence splitting) holding about
``max_seq_len - 3`` tokens; with probability ``short_seq_prob`` a run aims for a shorter random
length, as in BERT, so the model also sees short inputs.

Per-sample randomness (segment split, NSP order, truncation, masking) comes from
``numpy.random.default_rng([seed, index])``: sample ``i`` is always the same, whichever worker
or rank reads it and in whatever order, which makes resuming exact.

NSP follows Megatron-LM: the two segments are consecutive text; with probability 0.5 they are
swapped and ``is_random = 1``.  A run with a single sequence (e.g. data preprocessed without
sentence splitting) is split at a random token instead of a sentence boundary.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from .errors import TooLittleDataError
from .index_cache import IndexCache
from .indexed_dataset import IndexedDataset
from .tokenizer import Tokenizer

IGNORE_INDEX = -100  # label of unmasked positions (torch.nn.CrossEntropyLoss's default ignore_index)


@dataclass(frozen=True)
class BERTDatasetConfig:
    max_seq_len: int = 512
    seed: int = 1234
    num_samples: Optional[int] = None   # None: one pass over the sample mapping
    masking_prob: float = 0.15
    mask_token_prob: float = 0.8        # of the masked positions: -> [MASK]
    random_token_prob: float = 0.1      # -> a random token (the rest stay unchanged)
    short_seq_prob: float = 0.1
    nsp_swap_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.max_seq_len < 5:
            raise ValueError(f"max_seq_len: must be >= 5 ([CLS] a [SEP] b [SEP]), got {self.max_seq_len}")
        for name in ("masking_prob", "mask_token_prob", "random_token_prob", "short_seq_prob", "nsp_swap_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {value}")
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ValueError("mask_token_prob + random_token_prob must be <= 1")
        if self.num_samples is not None and self.num_samples < 0:
            raise ValueError(f"num_samples: must be >= 0, got {self.num_samples}")


def build_sample_mapping(sizes: np.ndarray, document_indices: np.ndarray, document_ids: np.ndarray,
                         max_tokens: int, short_seq_prob: float, seed: int) -> np.ndarray:
    """int64 ``[n, 3]`` rows (first sequence, end sequence, target length) of each sample."""
    rng = np.random.RandomState(seed)
    rows = []

    def draw_target() -> int:
        return int(rng.randint(2, max_tokens + 1)) if rng.random_sample() < short_seq_prob else max_tokens

    for doc in document_ids:
        first, end = int(document_indices[doc]), int(document_indices[doc + 1])
        target = draw_target()
        start, count = first, 0
        for s in range(first, end):
            count += int(sizes[s])
            if count >= target or s == end - 1:
                # Two segments need at least two tokens (one per segment).
                if count >= 2:
                    rows.append((start, s + 1, target))
                start, count = s + 1, 0
                target = draw_target()
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def _truncated_lengths(la: int, lb: int, limit: int) -> Tuple[int, int]:
    """Lengths after BERT's truncation (repeatedly drop a token from the longer segment, B on
    ties) -- in closed form, so a 20k-token document costs no loop."""
    if la + lb <= limit:
        return la, lb
    short = min(la, lb)
    if short <= limit - short:
        return (la, limit - la) if la == short else (limit - lb, lb)
    return (limit + 1) // 2, limit // 2


class BERTDataset:
    """``ds[i]`` is a dict of numpy int64 arrays of length ``max_seq_len``:

    ``tokens`` ([CLS] A [SEP] B [SEP] [PAD]...), ``token_types`` (0 for A, 1 for B, 0 padding),
    ``labels`` (original id at masked positions, -100 elsewhere), ``loss_mask`` (1 at masked
    positions), ``padding_mask`` (1 for real tokens, 0 for padding), and the 0-d ``is_random``
    (1 when A and B were swapped).
    """

    def __init__(self, indexed: IndexedDataset, document_ids: np.ndarray, tokenizer: Tokenizer,
                 config: BERTDatasetConfig, cache: IndexCache = IndexCache(None), name: str = "train") -> None:
        self.indexed = indexed
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        # Fail at construction, not mid-training, when the tokenizer lacks a BERT token.
        self.cls, self.sep, self.mask, self.pad = tokenizer.cls, tokenizer.sep, tokenizer.mask, tokenizer.pad
        special = np.asarray(tokenizer.special_tokens.ids(), dtype=np.int64)
        self.eod = tokenizer.special_tokens.eod
        self.regular_ids = np.setdiff1d(np.arange(tokenizer.vocab_size, dtype=np.int64), special)
        document_ids = np.asarray(document_ids, dtype=np.int64)
        max_tokens = config.max_seq_len - 3
        description = {
            "prefix": os.path.abspath(indexed.prefix), "num_sequences": len(indexed), "num_tokens": indexed.num_tokens,
            "split": name, "first_document": int(document_ids[0]) if len(document_ids) else -1,
            "num_split_documents": len(document_ids), "max_seq_len": config.max_seq_len, "seed": config.seed,
            "num_samples": config.num_samples, "short_seq_prob": config.short_seq_prob,
        }

        def build() -> Dict[str, np.ndarray]:
            mapping = build_sample_mapping(indexed.sequence_lengths, indexed.document_indices, document_ids,
                                           max_tokens, config.short_seq_prob, config.seed)
            if len(mapping) == 0:
                raise TooLittleDataError(f"{indexed.prefix} ({name} split): no document has the 2+ tokens a "
                                 "sentence-pair sample needs")
            wanted = config.num_samples if config.num_samples is not None else len(mapping)
            rng = np.random.RandomState(config.seed)
            epochs = -(-wanted // len(mapping))
            shuffle = np.concatenate([rng.permutation(len(mapping)) for _ in range(max(epochs, 1))])[:wanted]
            return {"sample_mapping": mapping, "shuffle_index": shuffle.astype(np.int64)}

        arrays = cache.load_or_build("BERTDataset", description, build)
        self.sample_mapping = arrays["sample_mapping"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {self.name} dataset of {n} samples")
        i %= n
        rng = np.random.default_rng([self.config.seed, i])
        start, end, target = (int(v) for v in self.sample_mapping[int(self.shuffle_index[i])])
        segments = [self._strip_eod(self.indexed[s]) for s in range(start, end)]
        segments = [s for s in segments if len(s)]
        a, b = self._split_pair(segments, rng)
        is_random = bool(rng.random() < self.config.nsp_swap_prob)
        if is_random:
            a, b = b, a
        a, b = self._truncate(a, b, target, rng)
        return self._assemble(a, b, is_random, rng)

    def _strip_eod(self, tokens: np.ndarray) -> np.ndarray:
        tokens = tokens.astype(np.int64)
        return tokens[tokens != self.eod] if self.eod is not None else tokens

    @staticmethod
    def _split_pair(segments, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        if len(segments) >= 2:
            cut = int(rng.integers(1, len(segments)))
            return np.concatenate(segments[:cut]), np.concatenate(segments[cut:])
        tokens = segments[0] if segments else np.zeros(0, dtype=np.int64)
        if len(tokens) < 2:  # only possible when EOD stripping emptied a run
            return tokens, np.zeros(0, dtype=np.int64)
        cut = int(rng.integers(1, len(tokens)))
        return tokens[:cut], tokens[cut:]

    def _truncate(self, a: np.ndarray, b: np.ndarray, target: int, rng: np.random.Generator):
        limit = min(target, self.config.max_seq_len - 3)
        la, lb = _truncated_lengths(len(a), len(b), limit)
        out = []
        for seg, keep in ((a, la), (b, lb)):
            drop = len(seg) - keep
            front = int(rng.binomial(drop, 0.5)) if drop else 0  # each dropped token: front or back
            out.append(seg[front:front + keep])
        return out[0], out[1]

    def _assemble(self, a: np.ndarray, b: np.ndarray, is_random: bool, rng: np.random.Generator):
        cfg = self.config
        n = len(a) + len(b) + 3
        tokens = np.full(cfg.max_seq_len, self.pad, dtype=np.int64)
        tokens[0] = self.cls
        tokens[1:1 + len(a)] = a
        tokens[1 + len(a)] = self.sep
        tokens[2 + len(a):2 + len(a) + len(b)] = b
        tokens[n - 1] = self.sep
        token_types = np.zeros(cfg.max_seq_len, dtype=np.int64)
        token_types[2 + len(a):n] = 1
        padding_mask = np.zeros(cfg.max_seq_len, dtype=np.int64)
        padding_mask[:n] = 1

        candidates = np.concatenate([np.arange(1, 1 + len(a)), np.arange(2 + len(a), 2 + len(a) + len(b))])
        labels = np.full(cfg.max_seq_len, IGNORE_INDEX, dtype=np.int64)
        loss_mask = np.zeros(cfg.max_seq_len, dtype=np.int64)
        num_to_mask = min(len(candidates), max(1, int(round(cfg.masking_prob * len(candidates))))) if cfg.masking_prob > 0 else 0
        if num_to_mask:
            chosen = np.sort(rng.choice(candidates, size=num_to_mask, replace=False))
            labels[chosen] = tokens[chosen]
            loss_mask[chosen] = 1
            r = rng.random(num_to_mask)
            to_mask = r < cfg.mask_token_prob
            to_random = (r >= cfg.mask_token_prob) & (r < cfg.mask_token_prob + cfg.random_token_prob)
            tokens[chosen[to_mask]] = self.mask
            tokens[chosen[to_random]] = rng.choice(self.regular_ids, size=int(to_random.sum()))
        return {"tokens": tokens, "token_types": token_types, "labels": labels, "loss_mask": loss_mask,
                "padding_mask": padding_mask, "is_random": np.array(int(is_random), dtype=np.int64)}
