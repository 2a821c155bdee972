"""Tokenizers used by preprocessing and training.

Two implementations share one small interface (``Tokenizer``):

* ``ByteTokenizer`` -- dependency free: ids 0..255 are the UTF-8 bytes, the special tokens
  follow.  The tiny default demo uses it, so the demo runs without sentencepiece.
* ``SentencePieceTokenizer`` -- wraps a sentencepiece model, either one trained with
  ``msg-tokenizer`` (which reserves every special token) or any existing model a user points
  at (special tokens are then looked up by their usual piece names; a missing one is ``None``
  and only becomes an error when something needs it, e.g. BERT needs [MASK]).
"""
from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import numpy as np

from .errors import TokenizerMismatchError

# Piece names msg-tokenizer gives the special tokens; also the names we look for in a
# user-provided sentencepiece model or Hugging Face tokenizer file, in this order.
EOD_PIECES = ("<eod>", "</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
PAD_PIECES = ("[PAD]", "<pad>", "<|pad|>")
CLS_PIECES = ("[CLS]", "<cls>")
SEP_PIECES = ("[SEP]", "<sep>")
MASK_PIECES = ("[MASK]", "<mask>")
SPECIAL_PIECES = {"eod": EOD_PIECES, "pad": PAD_PIECES, "cls": CLS_PIECES, "sep": SEP_PIECES, "mask": MASK_PIECES}


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens; ``None`` when the vocabulary has no such token."""

    eod: Optional[int]
    pad: Optional[int] = None
    cls: Optional[int] = None
    sep: Optional[int] = None
    mask: Optional[int] = None

    def ids(self) -> List[int]:
        return sorted({i for i in (self.eod, self.pad, self.cls, self.sep, self.mask) if i is not None})


class Tokenizer(ABC):
    """What preprocessing and the datasets need from a tokenizer."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids; every id this tokenizer emits is in ``[0, vocab_size)``."""

    @property
    @abstractmethod
    def special_tokens(self) -> SpecialTokens:
        ...

    @abstractmethod
    def encode(self, text: str) -> List[int]:
        """Text -> ids, without any special token."""

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Ids -> text.  ``decode(encode(t)) == t`` for every string ``t`` where the tokenizer is
        lossless (byte, sentencepiece, byte-level BPE; not a lower-casing WordPiece)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A short string that changes whenever the id <-> text mapping changes.

        Written next to preprocessed data, so a dataset can refuse a tokenizer that does not
        match the one the data was made with.
        """

    @abstractmethod
    def describe(self) -> dict:
        """JSON-serialisable description (kind, model path, vocab size) for metadata files."""

    # Conveniences shared by all implementations --------------------------------------
    def encode_array(self, text: str) -> np.ndarray:
        """Like ``encode`` but returns an int64 array (subclasses override when faster)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    @property
    def eod(self) -> int:
        return self._require("eod")

    @property
    def pad(self) -> int:
        return self._require("pad")

    @property
    def cls(self) -> int:
        return self._require("cls")

    @property
    def sep(self) -> int:
        return self._require("sep")

    @property
    def mask(self) -> int:
        return self._require("mask")

    def _require(self, name: str) -> int:
        value = getattr(self.special_tokens, name)
        if value is None:
            raise TokenizerMismatchError(
                f"tokenizer {self.describe()} has no {name.upper()} token; "
                f"train one with msg-tokenizer (it reserves EOD, [CLS], [SEP], [MASK], [PAD])")
        return value


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0-255 are bytes, then <eod>=256, [CLS]=257, [SEP]=258,
    [MASK]=259, [PAD]=260 (the same ids as megatron_msg.training.batches uses for the demo)."""

    NUM_BYTES = 256
    _SPECIAL_NAMES = ("<eod>", "[CLS]", "[SEP]", "[MASK]", "[PAD]")

    def __init__(self) -> None:
        b = self.NUM_BYTES
        self._special = SpecialTokens(eod=b, cls=b + 1, sep=b + 2, mask=b + 3, pad=b + 4)

    @property
    def vocab_size(self) -> int:
        return self.NUM_BYTES + len(self._SPECIAL_NAMES)

    @property
    def special_tokens(self) -> SpecialTokens:
        return self._special

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < self.NUM_BYTES:
                out.append(i)
            elif self.NUM_BYTES <= i < self.vocab_size:
                if not skip_special:
                    out += self._SPECIAL_NAMES[i - self.NUM_BYTES].encode()
            else:
                raise ValueError(f"id {i} is outside the byte tokenizer's vocabulary [0, {self.vocab_size})")
        # A sample cut out of the token stream may start or end inside a multi-byte character.
        return out.decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return f"byte-v2-{self.vocab_size}"

    def describe(self) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size}


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (``.model`` file)."""

    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"sentencepiece model not found: {model_path}")
        try:
            import sentencepiece as spm
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("SentencePieceTokenizer needs `pip install sentencepiece` "
                              "(or install megatron_msg[data]); ByteTokenizer needs nothing") from exc
        self.model_path = os.path.abspath(model_path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError, UnicodeDecodeError) as exc:  # e.g. a file that is not a sentencepiece model
            raise ValueError(f"{model_path} is not a sentencepiece model ({str(exc).splitlines()[0]})") from None
        try:  # a byte changed inside a piece loads, then fails in the middle of an encode
            self._sp.id_to_piece(list(range(self._sp.get_piece_size())))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{model_path} is a damaged sentencepiece model (a piece is not UTF-8: {exc.reason})"
                             ) from None
        self._special = SpecialTokens(
            eod=self._find(self._sp.eos_id(), EOD_PIECES),
            pad=self._find(self._sp.pad_id(), PAD_PIECES),
            cls=self._find(-1, CLS_PIECES),
            sep=self._find(-1, SEP_PIECES),
            mask=self._find(-1, MASK_PIECES),
        )
        with open(model_path, "rb") as f:
            self._fingerprint = "spm-" + hashlib.sha256(f.read()).hexdigest()[:16]

    def _find(self, builtin_id: int, names: Sequence[str]) -> Optional[int]:
        if builtin_id is not None and builtin_id >= 0:
            return int(builtin_id)
        unk = self._sp.unk_id()
        for name in names:
            i = self._sp.piece_to_id(name)
            if i != unk:
                return int(i)
        return None

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def special_tokens(self) -> SpecialTokens:
        return self._special

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        # One call for the whole batch: sentencepiece's C++ loop is much faster than a Python one.
        # num_threads=1: parallelism is the caller's (msg-preprocess --workers), so one worker
        # really is one core and N workers do not oversubscribe the machine N-fold.
        try:
            batches = self._sp.encode(list(texts), out_type=int, num_threads=1)
        except TypeError:  # sentencepiece < 0.2 has no num_threads (and is single-threaded)
            batches = self._sp.encode(list(texts), out_type=int)
        return [np.asarray(ids, dtype=np.int64) for ids in batches]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"id {bad[0]} is outside the vocabulary [0, {self.vocab_size}) of {self.model_path}")
        special = set(self._special.ids())
        if skip_special:
            return self._sp.decode([i for i in ids if i not in special])
        # sentencepiece renders control symbols as "", so spell them out between the runs.
        out, run = [], []
        for i in ids:
            if i in special:
                out += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict:
        return {"kind": "sentencepiece", "model": self.model_path, "vocab_size": self.vocab_size}


TOKENIZER_KINDS = ("byte", "sentencepiece", "huggingface", "gpt2")


def infer_tokenizer_kind(model_path: Optional[str], merges_file: Optional[str] = None) -> str:
    """The kind a command line means when it names files but no kind: a merges file is GPT-2's
    BPE, a ``.json`` a Hugging Face ``tokenizer.json``, anything else a sentencepiece model."""
    if merges_file:
        return "gpt2"
    if not model_path:
        return "byte"
    return "huggingface" if model_path.endswith(".json") else "sentencepiece"


def build_tokenizer(kind: str = "byte", model_path: Optional[str] = None,
                    merges_file: Optional[str] = None) -> Tokenizer:
    """A tokenizer of ``kind`` (``TOKENIZER_KINDS``) from the user's files.

    ``byte``: no file.  ``sentencepiece``: ``model_path`` is the ``.model`` file.
    ``huggingface``: ``model_path`` is a ``tokenizers`` ``tokenizer.json``.  ``gpt2``:
    ``model_path`` is GPT-2's ``vocab.json`` and ``merges_file`` its ``merges.txt``.
    """
    if kind != "gpt2" and merges_file:
        raise ValueError(f"a merges file is only used by the gpt2 tokenizer, not {kind!r}")
    if kind == "byte":
        if model_path:
            raise ValueError("the byte tokenizer takes no model file; use kind='sentencepiece' or 'huggingface'")
        return ByteTokenizer()
    if kind in ("sentencepiece", "spm"):
        if not model_path:
            raise ValueError("kind='sentencepiece' needs model_path (a .model file)")
        return SentencePieceTokenizer(model_path)
    if kind in ("huggingface", "hf"):
        if not model_path:
            raise ValueError("kind='huggingface' needs model_path (a tokenizer.json file)")
        from .hf_tokenizer import HuggingFaceTokenizer
        return HuggingFaceTokenizer.from_json(model_path)
    if kind == "gpt2":
        if not model_path or not merges_file:
            raise ValueError("kind='gpt2' needs GPT-2's vocab.json (model_path) and merges.txt (merges_file)")
        from .hf_tokenizer import HuggingFaceTokenizer
        return HuggingFaceTokenizer.from_gpt2_files(model_path, merges_file)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(TOKENIZER_KINDS)}")
