"""jsonl -> Megatron mmap indexed dataset (.bin/.idx), optionally with several worker processes.

Output names follow Megatron-LM's ``preprocess_data.py``: ``<output_prefix>_<json_key>_document``
(or ``_sentence`` with sentence splitting), so scripts written for Megatron find the files.
Token ids and the file bytes are those ``preprocess_data.py --append-eod`` writes for the same
tokenizer: one sequence per document (one per sentence when split), EOD appended to the last
sequence of every document, uint16 tokens when the vocabulary has fewer than 65500 ids.

Nothing partial is ever written: a bad line aborts the run (with file and line number) and the
temp files are deleted, unless ``skip_bad_lines`` is set, in which case bad lines are counted
and reported at the end.
"""
from __future__ import annotations

import collections
import functools
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Deque, Iterator, List, Optional, Tuple

import numpy as np

from .errors import BadInputError, DataError, TokenizerMismatchError
from .indexed_dataset import IndexedDatasetWriter, token_dtype_for_vocab
from .sentences import split_sentences
from .tokenizer import EOD_PIECES, Tokenizer, build_tokenizer


@dataclass
class PreprocessConfig:
    inputs: List[str]                       # jsonl files, concatenated in this order
    output_prefix: str
    tokenizer: str = "byte"                 # byte | sentencepiece | huggingface | gpt2
    tokenizer_model: Optional[str] = None   # .model / tokenizer.json / GPT-2 vocab.json
    merges_file: Optional[str] = None       # GPT-2 merges.txt (tokenizer "gpt2")
    json_key: str = "text"
    workers: int = 1                        # 1: encode in this process; N > 1: a pool of N
    append_eod: bool = True
    split_sentences: bool = False           # one sequence per sentence (for BERT)
    skip_bad_lines: bool = False            # skip (and count) bad lines instead of failing
    chunk_bytes: int = 1 << 20              # input bytes per task sent to a worker
    progress: bool = True                   # tqdm bar on stderr with MB/s

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: at least one input file is needed")
        for path in self.inputs:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"inputs: no such file {path}")
        if self.workers < 1:
            raise ValueError(f"workers: must be >= 1, got {self.workers}")
        if not self.json_key:
            raise ValueError("json_key: must be a non-empty string")

    @property
    def dataset_prefix(self) -> str:
        level = "sentence" if self.split_sentences else "document"
        return f"{self.output_prefix}_{self.json_key}_{level}"


@dataclass
class PreprocessStats:
    prefix: str
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    input_bytes: int = 0
    blank_lines: int = 0
    skipped_lines: List[Tuple[str, int, str]] = field(default_factory=list)  # (file, line, reason)
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 2**20 / max(self.seconds, 1e-9)


@dataclass
class _Chunk:
    """Work unit: consecutive raw lines of one input file."""
    path: str
    first_line: int
    lines: List[bytes]


@dataclass
class _Encoded:
    """A chunk's result: good documents' tokens (concatenated) and the bad lines."""
    path: str
    tokens: np.ndarray
    documents: List[Tuple[int, List[int]]]        # (line number, sequence lengths) per document
    errors: List[Tuple[int, str]]                 # (line number, reason)
    blank_lines: int
    nbytes: int


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(kind: str, model: Optional[str], merges: Optional[str] = None) -> Tokenizer:
    # One tokenizer per worker process, built on its first task (no module-level global).
    if kind in ("huggingface", "gpt2"):
        # Parallelism is the caller's (workers): one Rust thread pool per worker would
        # oversubscribe the machine, and the library warns about pools across fork.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return build_tokenizer(kind, model, merges_file=merges)


def _encode_chunk(chunk: _Chunk, config: PreprocessConfig) -> _Encoded:
    tokenizer = _cached_tokenizer(config.tokenizer, config.tokenizer_model, config.merges_file)
    errors: List[Tuple[int, str]] = []
    blank = 0
    texts: List[str] = []
    owners: List[Tuple[int, int]] = []           # (line number, number of texts) per document
    for offset, raw in enumerate(chunk.lines):
        line_number = chunk.first_line + offset
        if not raw.strip():
            blank += 1
            continue
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            errors.append((line_number, f"malformed JSON ({exc})"))
            continue
        if not isinstance(record, dict):
            errors.append((line_number, f"expected a JSON object, got {type(record).__name__}"))
            continue
        if config.json_key not in record:
            errors.append((line_number, f"missing key {config.json_key!r} (keys: {sorted(record)[:8]})"))
            continue
        text = record[config.json_key]
        if not isinstance(text, str):
            errors.append((line_number, f"field {config.json_key!r} is {type(text).__name__}, not a string"))
            continue
        if not text:
            errors.append((line_number, f"empty document (field {config.json_key!r} is '')"))
            continue
        pieces = split_sentences(text) if config.split_sentences else [text]
        texts.extend(pieces)
        owners.append((line_number, len(pieces)))

    encoded = tokenizer.encode_batch(texts) if texts else []
    eod = tokenizer.eod if config.append_eod else None
    parts: List[np.ndarray] = []
    documents: List[Tuple[int, List[int]]] = []
    position = 0
    for line_number, count in owners:
        sequences = [e for e in encoded[position:position + count] if len(e)]
        position += count
        lengths = [len(e) for e in sequences]
        if not lengths:
            errors.append((line_number, "empty document (no tokens after tokenization)"))
            continue
        parts.extend(sequences)
        if eod is not None:
            parts.append(np.array([eod], dtype=np.int64))
            lengths[-1] += 1
        documents.append((line_number, lengths))
    # Cast in the worker: uint16 halves what travels back to the writer process.
    dtype = token_dtype_for_vocab(tokenizer.vocab_size)
    tokens = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)
    errors.sort()
    return _Encoded(chunk.path, tokens, documents, errors, blank, sum(len(l) for l in chunk.lines))


def _read_chunks(config: PreprocessConfig) -> Iterator[_Chunk]:
    for path in config.inputs:
        with open(path, "rb") as f:
            lines: List[bytes] = []
            size = 0
            first = 1
            for line_number, line in enumerate(f, start=1):
                if not lines:
                    first = line_number
                lines.append(line)
                size += len(line)
                if size >= config.chunk_bytes:
                    yield _Chunk(path, first, lines)
                    lines, size = [], 0
            if lines:
                yield _Chunk(path, first, lines)


def preprocess_jsonl(config: PreprocessConfig) -> PreprocessStats:
    """Tokenize ``config.inputs`` into ``config.dataset_prefix``.bin/.idx (+ .meta.json)."""
    config.validate()
    tokenizer = _cached_tokenizer(config.tokenizer, config.tokenizer_model, config.merges_file)
    if config.append_eod and tokenizer.special_tokens.eod is None:
        # Now, not later in a worker.  BERT vocabularies (WordPiece) have no such token, and
        # BERT data needs none: the index keeps documents apart.
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer.describe()} has no end-of-document token (looked for "
            f"{', '.join(EOD_PIECES)}); pass --no-append-eod (BERT data), or use a tokenizer that has one")
    prefix = config.dataset_prefix
    stats = PreprocessStats(prefix=prefix)
    metadata = {
        "created_by": "megatron_msg msg-preprocess",
        "tokenizer": tokenizer.describe(),
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "special_tokens": asdict(tokenizer.special_tokens),
        "inputs": [os.path.abspath(p) for p in config.inputs],
        "json_key": config.json_key,
        "append_eod": config.append_eod,
        "split_sentences": config.split_sentences,
    }
    total_bytes = sum(os.path.getsize(p) for p in config.inputs)
    progress = _progress_bar(total_bytes, config.progress)
    start = time.perf_counter()
    pool = None
    try:
        encode = functools.partial(_encode_chunk, config=config)
        if config.workers == 1:
            results = map(encode, _read_chunks(config))
        else:
            pool = multiprocessing.get_context().Pool(config.workers)
            results = _ordered_bounded(pool, encode, _read_chunks(config), window=4 * config.workers)
        with IndexedDatasetWriter(prefix, token_dtype_for_vocab(tokenizer.vocab_size), metadata) as writer:
            for chunk_result in results:
                _consume(chunk_result, writer, stats, config)
                progress.update(chunk_result.nbytes)
            if writer.num_documents == 0:
                raise DataError(f"{', '.join(config.inputs)}: no documents found (every line was blank or "
                                "skipped); nothing written")
            stats.documents, stats.tokens = writer.num_documents, writer.num_tokens
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    stats.seconds = time.perf_counter() - start
    return stats


def _ordered_bounded(pool, fn, items: Iterator, window: int) -> Iterator:
    """Like ``pool.imap(fn, items)`` but with at most ``window`` chunks in flight.

    ``Pool.imap`` reads its input as fast as it can, so on a corpus larger than memory it
    would buffer the whole file; this keeps memory at ``window`` chunks while staying ordered.
    """
    pending: Deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _consume(result: _Encoded, writer: IndexedDatasetWriter, stats: PreprocessStats,
             config: PreprocessConfig) -> None:
    # Results arrive in input order, so the first error raised is the first bad line.
    bad = dict(result.errors)
    events = sorted([(n, "doc", i) for i, (n, _) in enumerate(result.documents)] +
                    [(n, "bad", 0) for n in bad])
    position = 0
    for line_number, kind, i in events:
        if kind == "bad":
            if not config.skip_bad_lines:
                raise BadInputError(result.path, line_number,
                                    bad[line_number] + " (use --skip-bad-lines to skip such lines)")
            stats.skipped_lines.append((result.path, line_number, bad[line_number]))
            continue
        lengths = result.documents[i][1]
        n = sum(lengths)
        writer.add_document(result.tokens[position:position + n], lengths)
        position += n
        stats.sequences += len(lengths)
    stats.blank_lines += result.blank_lines
    stats.input_bytes += result.nbytes


def _progress_bar(total_bytes: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        return _NoProgress()
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                desc="tokenizing", file=sys.stderr, smoothing=0.1)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
