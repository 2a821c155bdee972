"""Does a tokenizer match the data it is about to read?

``msg-preprocess`` writes ``<prefix>.meta.json`` with the tokenizer's fingerprint; when it is
there the check is exact and free.  Data made elsewhere (e.g. by Megatron-LM) has no sidecar,
and then the best available check is that no token id in ``.bin`` is outside the vocabulary.
That check runs on all data (one vectorised scan per version of a ``.bin``, cached).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from .errors import IndexedFormatError, TokenizerMismatchError
from .index_cache import IndexCache
from .indexed_dataset import IndexedDataset, metadata_path
from .tokenizer import Tokenizer


def read_metadata(prefix: str) -> Optional[dict]:
    path = metadata_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as exc:
        raise IndexedFormatError(f"{path}: not valid JSON ({exc}); delete it or re-run msg-preprocess") from exc
    if not isinstance(meta, dict):
        raise IndexedFormatError(f"{path}: expected a JSON object, got {type(meta).__name__}; delete it or re-run "
                                 "msg-preprocess")
    return meta


def check_tokenizer_matches(indexed: IndexedDataset, tokenizer: Tokenizer, cache: IndexCache | None = None) -> None:
    """Raise ``TokenizerMismatchError`` when ``tokenizer`` cannot be the data's tokenizer.

    The sidecar's fingerprint names the tokenizer the data was made with; the ids themselves are
    checked too, always (a sidecar can be copied beside other data, a ``.bin`` damaged), so an id
    outside the vocabulary is an error naming the file here and not a crash inside the
    embedding (a device-side assert on a GPU).  The scan is one vectorised max over the
    memory-mapped ``.bin``, cached per file version (size and mtime) in ``cache``.
    """
    meta = read_metadata(indexed.prefix)
    if meta is not None:
        theirs = meta.get("tokenizer_fingerprint")
        if theirs != tokenizer.fingerprint():
            raise TokenizerMismatchError(
                f"{indexed.prefix}: the data was tokenized with {meta.get('tokenizer')} "
                f"(fingerprint {theirs}, vocab {meta.get('vocab_size')}), but the tokenizer given is "
                f"{tokenizer.describe()} (fingerprint {tokenizer.fingerprint()}); re-run msg-preprocess "
                f"with this tokenizer or pass the original one")
    largest = largest_token_id(indexed, cache)
    if largest >= tokenizer.vocab_size:
        made = ("the data was made with a different tokenizer" if meta is None else
                "its sidecar names this tokenizer, so the .bin is damaged or not the one it was made with")
        raise TokenizerMismatchError(
            f"{indexed.prefix}.bin: contains token id {largest}, outside the vocabulary of {tokenizer.describe()} "
            f"(vocab_size {tokenizer.vocab_size}); {made}")


def largest_token_id(indexed: IndexedDataset, cache: IndexCache | None = None) -> int:
    """The largest token id in ``indexed`` (-1 when empty), scanned once per version of its ``.bin``."""
    if cache is None:
        return indexed.max_token_id()
    path = os.path.abspath(indexed.prefix + ".bin")
    st = os.stat(path)
    description = {"bin": path, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    arrays = cache.load_or_build("max-token-id", description,
                                 lambda: {"max": np.array([indexed.max_token_id()], dtype=np.int64)})
    return int(arrays["max"][0])
