"""Deterministic batches from a token stream: batch contents are a pure function
of (seed, step, micro-batch), so the data position to checkpoint is the step.

The byte-level tokenizer here is the dependency-free default used by the demo
(vocab: 256 bytes + 5 special tokens).  Real runs use the indexed datasets of
``megatron_msg.data`` through ``IndexedGPTBatches`` / ``IndexedBertBatches``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_msg.data.errors import CorpusError
from megatron_msg.jsonl import iter_jsonl

EOD, CLS, SEP, MASK, PAD = 256, 257, 258, 259, 260
BYTE_VOCAB = 261
IGNORE_INDEX = -100

BUNDLED_CORPUS = Path(__file__).resolve().parent.parent / "assets" / "corpus.jsonl"


def read_jsonl_texts(path: Path, text_key: str) -> list[str]:
    if not path.is_file():
        raise CorpusError(f"data.path: corpus file {str(path)!r} does not exist")
    texts = []
    for lineno, doc in iter_jsonl(path, error=CorpusError):
        if not isinstance(doc, dict) or text_key not in doc:
            raise CorpusError(f"{path}:{lineno}: no {text_key!r} field (set data.text_key)")
        texts.append(str(doc[text_key]))
    if not texts:
        raise CorpusError(f"{path}: no documents")
    return texts


def byte_token_streams(path: str, text_key: str, valid_fraction: float, seed: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents as UTF-8 bytes + EOD; split train/valid by whole documents."""
    texts = read_jsonl_texts(BUNDLED_CORPUS if path == "bundled" else Path(path), text_key)
    order = np.random.default_rng(seed).permutation(len(texts))
    n_valid = max(1, int(round(len(texts) * valid_fraction)))
    if n_valid >= len(texts):
        raise CorpusError(f"data.valid_fraction={valid_fraction} leaves no training documents "
                         f"({len(texts)} documents)")

    def encode(idx) -> np.ndarray:
        parts = []
        for i in idx:
            parts.append(np.frombuffer(texts[i].encode("utf-8"), dtype=np.uint8).astype(np.int32))
            parts.append(np.array([EOD], dtype=np.int32))
        return np.concatenate(parts)

    return encode(order[n_valid:]), encode(order[:n_valid])


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


@dataclass(frozen=True)
class BatchSegment:
    """Steps from ``start`` on train with ``grad_accum`` micro-batches of ``batch_size`` samples."""

    start: int
    batch_size: int
    grad_accum: int
    first_sample: int  # samples the steps before ``start`` consumed

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum


@dataclass(frozen=True)
class BatchSchedule:
    """Micro-batch size and count per step, and where each step's samples start.

    The global batch may change at growth stages (``growth.stages[i].batch_size`` /
    ``grad_accum``, FLM-101B: 4.72M then 4.31M tokens), so sample numbering is cumulative
    (Megatron's consumed samples): the samples of a step follow the previous step's, and the
    batch of ``(step, micro)`` is still a pure function of the config.
    """

    segments: tuple[BatchSegment, ...]

    @classmethod
    def constant(cls, batch_size: int, grad_accum: int = 1) -> "BatchSchedule":
        return cls((BatchSegment(0, batch_size, grad_accum, 0),))

    @classmethod
    def from_config(cls, cfg) -> "BatchSchedule":
        t = cfg.train
        segments = [BatchSegment(0, t.batch_size, t.grad_accum, 0)]
        for st in cfg.resolved_stages():
            if st.auto:  # an auto stage keeps the batch (config.AUTO_FIXED_FIELDS)
                continue
            last = segments[-1]
            if (st.batch_size, st.grad_accum) != (last.batch_size, last.grad_accum):
                consumed = last.first_sample + (st.at_step - last.start) * last.global_batch
                segments.append(BatchSegment(st.at_step, st.batch_size, st.grad_accum, consumed))
        return cls(tuple(segments))

    def at(self, step: int) -> BatchSegment:
        return next(s for s in reversed(self.segments) if s.start <= step)

    def samples_before(self, step: int) -> int:
        """Samples consumed by steps ``0 .. step-1``."""
        seg = self.at(step)
        return seg.first_sample + (step - seg.start) * seg.global_batch

    def first_sample(self, step: int, micro: int) -> int:
        return self.samples_before(step) + micro * self.at(step).batch_size


@dataclass
class GPTBatches:
    """Random windows of ``seq_len + 1`` tokens; inputs are the first seq_len, targets shifted by one."""

    stream: np.ndarray
    seq_len: int
    sizes: BatchSchedule
    seed: int

    def __post_init__(self):
        if len(self.stream) <= self.seq_len + 1:
            raise ValueError(f"corpus has {len(self.stream)} tokens, fewer than model.seq_len+2")

    def get(self, step: int, micro: int = 0) -> dict:
        starts = _rng(self.seed, step, micro).integers(0, len(self.stream) - self.seq_len - 1,
                                                       self.sizes.at(step).batch_size)
        win = np.stack([self.stream[s:s + self.seq_len + 1] for s in starts])
        t = torch.from_numpy(win.astype(np.int64))
        return {"tokens": t[:, :-1], "targets": t[:, 1:]}


@dataclass
class BertBatches:
    """Sentence-pair MLM + NSP samples from a byte stream.

    Segment A is a random span; segment B is the span that follows it (label 0)
    or a random span (label 1), each cut to fit ``[CLS] A [SEP] B [SEP]``; 15% of
    the non-special tokens are chosen for prediction, replaced 80/10/10 by
    [MASK] / a random byte / themselves.
    """

    stream: np.ndarray
    seq_len: int
    sizes: BatchSchedule
    seed: int
    mask_prob: float = 0.15

    def __post_init__(self):
        if self.seq_len < 8:
            raise ValueError("BERT batches need model.seq_len >= 8")
        if len(self.stream) <= 2 * self.seq_len:
            raise ValueError(f"corpus has {len(self.stream)} tokens, too few for seq_len={self.seq_len}")

    def get(self, step: int, micro: int = 0) -> dict:
        rng = _rng(self.seed, step, micro)
        t, n = self.seq_len, len(self.stream)
        la = (t - 3) // 2
        lb = t - 3 - la
        batch_size = self.sizes.at(step).batch_size
        tokens = np.full((batch_size, t), PAD, dtype=np.int64)
        types = np.zeros((batch_size, t), dtype=np.int64)
        nsp = rng.integers(0, 2, batch_size)
        for b in range(batch_size):
            a0 = int(rng.integers(0, n - la - lb))
            b0 = a0 + la if nsp[b] == 0 else int(rng.integers(0, n - lb))
            seq = [CLS, *self.stream[a0:a0 + la], SEP, *self.stream[b0:b0 + lb], SEP]
            tokens[b, :len(seq)] = seq
            types[b, la + 2:len(seq)] = 1
        special = (tokens == CLS) | (tokens == SEP) | (tokens == PAD)
        chosen = (rng.random(tokens.shape) < self.mask_prob) & ~special
        labels = np.where(chosen, tokens, IGNORE_INDEX)
        roll = rng.random(tokens.shape)
        inputs = tokens.copy()
        inputs[chosen & (roll < 0.8)] = MASK
        rand = chosen & (roll >= 0.8) & (roll < 0.9)
        inputs[rand] = rng.integers(0, 256, int(rand.sum()))
        return {"tokens": torch.from_numpy(inputs), "token_types": torch.from_numpy(types),
                "padding_mask": torch.from_numpy(tokens != PAD),
                "mlm_labels": torch.from_numpy(labels), "nsp_labels": torch.from_numpy(nsp.astype(np.int64))}


@dataclass
class IndexedGPTBatches:
    """Batches from a ``megatron_msg.data`` GPT dataset (items of ``seq_len + 1`` tokens).

    Sample ``sizes.first_sample(step, micro) + b`` of the dataset (with one batch size:
    ``(step * grad_accum + micro) * batch_size + b``): the dataset's own shuffle makes that
    random, and the data position is still the step.
    """

    dataset: object
    sizes: BatchSchedule

    def get(self, step: int, micro: int = 0) -> dict:
        first, batch_size = self.sizes.first_sample(step, micro), self.sizes.at(step).batch_size
        win = np.stack([self.dataset[(first + b) % len(self.dataset)]["tokens"] for b in range(batch_size)])
        t = torch.from_numpy(win.astype(np.int64))
        return {"tokens": t[:, :-1], "targets": t[:, 1:]}


@dataclass
class IndexedBertBatches:
    """Batches from a ``megatron_msg.data`` BERT dataset, in the trainer's BERT batch format.

    Same sample numbering as ``IndexedGPTBatches``; a ``BERTDataset`` item is itself a pure
    function of its index (its masking RNG is seeded by ``(seed, index)``), so the batch of
    ``(step, micro)`` is too.  Dataset fields map to the model's: ``labels`` -> ``mlm_labels``
    (-100 = not predicted), ``padding_mask`` -> bool (True = real token), ``is_random`` ->
    ``nsp_labels`` (1 = the segments were swapped).
    """

    dataset: object
    sizes: BatchSchedule

    def get(self, step: int, micro: int = 0) -> dict:
        first, batch_size = self.sizes.first_sample(step, micro), self.sizes.at(step).batch_size
        items = [self.dataset[(first + b) % len(self.dataset)] for b in range(batch_size)]

        def stack(key: str) -> torch.Tensor:
            return torch.from_numpy(np.stack([it[key] for it in items]).astype(np.int64))

        return {"tokens": stack("tokens"), "token_types": stack("token_types"),
                "padding_mask": stack("padding_mask") != 0, "mlm_labels": stack("labels"),
                "nsp_labels": stack("is_random")}
