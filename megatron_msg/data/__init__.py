"""Data pipeline: tokenizers, Megatron-format indexed datasets, GPT/BERT datasets, blending.

Kept light on purpose: importing ``megatron_msg.data`` loads nothing heavy (no torch, no
sentencepiece, no numpy).  The public names below are resolved lazily on first access.

Public API (see docs/data.md):

* ``build_gpt_datasets(prefixes_and_weights, seq_len, seed, splits, num_samples, ...)``
* ``build_bert_datasets(prefixes_and_weights, tokenizer, max_seq_len, seed, splits, num_samples, ...)``
* ``ByteTokenizer``, ``SentencePieceTokenizer``, ``build_tokenizer``
* ``IndexedDataset``, ``IndexedDatasetWriter``
* ``GPTDataset``, ``BERTDataset``, ``BlendedDataset``
"""
from importlib import import_module
from typing import Any

# name -> submodule that defines it; a static table, never mutated.
_LAZY = {
    "build_gpt_datasets": "builders",
    "build_bert_datasets": "builders",
    "DataError": "errors",
    "BadInputError": "errors",
    "IndexedFormatError": "errors",
    "TokenizerMismatchError": "errors",
    "Tokenizer": "tokenizer",
    "ByteTokenizer": "tokenizer",
    "SentencePieceTokenizer": "tokenizer",
    "build_tokenizer": "tokenizer",
    "IndexedDataset": "indexed_dataset",
    "IndexedDatasetWriter": "indexed_dataset",
    "GPTDataset": "gpt_dataset",
    "GPTDatasetConfig": "gpt_dataset",
    "BERTDataset": "bert_dataset",
    "BERTDatasetConfig": "bert_dataset",
    "BlendedDataset": "blended_dataset",
    "PreprocessConfig": "preprocessing",
    "preprocess_jsonl": "preprocessing",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'megatron_msg.data' has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
