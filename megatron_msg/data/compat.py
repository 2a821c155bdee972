"""Does a tokenizer match the data it is about to read?

``msg-preprocess`` writes ``<prefix>.meta.json`` with the tokenizer's fingerprint; when it is
there the check is exact and free.  Data made elsewhere (e.g. by Megatron-LM) has no sidecar,
and then the best available check is that no token id in ``.bin`` is outside the vocabulary
(a full scan of the file, done once when the datasets are built).
"""
from __future__ import annotations

import json
import os
from typing import Optional

from .errors import IndexedFormatError, TokenizerMismatchError
from .indexed_dataset import IndexedDataset, metadata_path
from .tokenizer import Tokenizer


def read_metadata(prefix: str) -> Optional[dict]:
    path = metadata_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except ValueError as exc:
        raise IndexedFormatError(f"{path}: not valid JSON ({exc}); delete it or re-run msg-preprocess") from exc


def check_tokenizer_matches(indexed: IndexedDataset, tokenizer: Tokenizer) -> None:
    """Raise ``TokenizerMismatchError`` when ``tokenizer`` cannot be the data's tokenizer."""
    meta = read_metadata(indexed.prefix)
    if meta is not None:
        theirs = meta.get("tokenizer_fingerprint")
        if theirs != tokenizer.fingerprint():
            raise TokenizerMismatchError(
                f"{indexed.prefix}: the data was tokenized with {meta.get('tokenizer')} "
                f"(fingerprint {theirs}, vocab {meta.get('vocab_size')}), but the tokenizer given is "
                f"{tokenizer.describe()} (fingerprint {tokenizer.fingerprint()}); re-run msg-preprocess "
                f"with this tokenizer or pass the original one")
        return
    largest = indexed.max_token_id()
    if largest >= tokenizer.vocab_size:
        raise TokenizerMismatchError(
            f"{indexed.prefix}: contains token id {largest}, outside the vocabulary of {tokenizer.describe()} "
            f"(vocab_size {tokenizer.vocab_size}); the data was made with a different tokenizer")
