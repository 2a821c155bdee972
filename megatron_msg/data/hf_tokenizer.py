"""Hugging Face ``tokenizers`` files as a megatron_msg ``Tokenizer``.

Two ways in, both from files the user gives (nothing is downloaded):

* ``HuggingFaceTokenizer.from_json(path)``: any serialised ``tokenizers`` model, the
  ``tokenizer.json`` of a Hub model or one trained with ``msg-tokenizer train --library hf``:
  BPE (byte-level or not), WordPiece, Unigram.
* ``HuggingFaceTokenizer.from_gpt2_files(vocab.json, merges.txt)``: GPT-2's original files,
  read into a byte-level BPE exactly as GPT-2 (and Megatron-LM's ``GPT2BPETokenizer``) splits
  text; ``<|endoftext|>`` is the end-of-document id, and the same string inside a document is
  ordinary text, as in Megatron-LM.

Encoding never adds special tokens (a ``tokenizer.json`` may carry a BERT post-processor that
would wrap every text in [CLS] ... [SEP], and truncation/padding settings), and the text of a
special token inside a document ("[MASK]") is encoded as text: the datasets place [CLS], [SEP],
[MASK] and EOD themselves.  Special tokens are looked up by their usual names
(``SPECIAL_PIECES``); one a vocabulary lacks is ``None`` and only an error where it is needed.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable, List, Sequence

import numpy as np

from .tokenizer import SPECIAL_PIECES, SpecialTokens, Tokenizer


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Hugging Face tokenizer files need `pip install tokenizers` "
                          "(or install megatron_msg[data])") from exc
    return tokenizers


def _digest(*paths: str) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


class HuggingFaceTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` behind megatron_msg's tokenizer interface."""

    def __init__(self, backend, files: Sequence[str], kind: str) -> None:
        self._tok = backend
        self._tok.no_truncation()
        self._tok.no_padding()
        # "[MASK]" or "<|endoftext|>" written inside a document is text, as with sentencepiece's
        # control symbols and GPT-2 in Megatron-LM: only the datasets place special ids.
        self._tok.encode_special_tokens = True
        self.files = [os.path.abspath(f) for f in files]
        self.kind = kind
        self._fingerprint = f"{kind}-{_digest(*self.files)}"
        self._special = SpecialTokens(**{name: self._find(pieces) for name, pieces in SPECIAL_PIECES.items()})

    @classmethod
    def from_json(cls, path: str) -> "HuggingFaceTokenizer":
        """A ``tokenizer.json`` (any model type the ``tokenizers`` library serialises)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        tokenizers = _require_tokenizers()
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as exc:  # noqa: BLE001 - the library raises plain Exception for bad files
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({str(exc).splitlines()[0]})") from None
        return cls(backend, [path], "huggingface")

    @classmethod
    def from_gpt2_files(cls, vocab_file: str, merges_file: str) -> "HuggingFaceTokenizer":
        """GPT-2's ``vocab.json`` + ``merges.txt``: byte-level BPE, no prefix space, no normaliser."""
        for path in (vocab_file, merges_file):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"GPT-2 tokenizer file not found: {path}")
        tokenizers = _require_tokenizers()
        from tokenizers import decoders, models, pre_tokenizers
        try:
            model = models.BPE.from_file(vocab_file, merges_file)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{vocab_file} + {merges_file} are not GPT-2 vocab.json/merges.txt files "
                             f"({str(exc).splitlines()[0]})") from None
        backend = tokenizers.Tokenizer(model)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        return cls(backend, [vocab_file, merges_file], "gpt2")

    def _find(self, names: Sequence[str]) -> int | None:
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return int(i)
        return None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def special_tokens(self) -> SpecialTokens:
        return self._special

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"id {bad[0]} is outside the vocabulary [0, {self.vocab_size}) of {self.files[0]}")
        if skip_special:
            special = set(self._special.ids())
            ids = [i for i in ids if i not in special]
        return self._tok.decode(ids, skip_special_tokens=False)

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict:
        return {"kind": self.kind, "files": self.files, "vocab_size": self.vocab_size}
