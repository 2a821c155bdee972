"""Train a sentencepiece model (BPE or unigram) with every special token reserved.

The trained model round-trips any text exactly (``decode(encode(t)) == t``): no Unicode
normalisation, whitespace kept as is, no dummy prefix, and byte fallback for characters the
vocabulary lacks.  Special tokens are *control* symbols, so the literal text "[MASK]" in a
document stays text and never turns into the mask token.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

from .errors import BadInputError
from .fileio import atomic_write_bytes

# Fixed ids of the special tokens in models trained here (documented in docs/data.md).
UNK_ID, PAD_ID, EOD_ID = 0, 1, 2
CONTROL_SYMBOLS = ["[CLS]", "[SEP]", "[MASK]"]  # ids 3, 4, 5
# Newline and tab get their own pieces so code-like text does not fall back to bytes.
USER_SYMBOLS = ["\n", "\t"]
# ids 0-7 above plus 256 byte-fallback pieces must fit.
MIN_VOCAB_SIZE = 8 + 256 + 8


@dataclass
class TokenizerTrainConfig:
    inputs: List[str]                  # .jsonl files (text under json_key) or plain text files
    model_prefix: str                  # writes <model_prefix>.model and <model_prefix>.vocab
    vocab_size: int = 8000
    model_type: str = "bpe"            # "bpe" or "unigram"
    json_key: str = "text"
    character_coverage: float = 1.0
    max_sentences: int = 1_000_000     # sentencepiece samples at most this many lines
    num_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 1234
    skip_bad_lines: bool = False

    def validate(self) -> None:
        if self.model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type: expected 'bpe' or 'unigram', got {self.model_type!r}")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size: must be >= {MIN_VOCAB_SIZE} (special tokens + 256 byte "
                             f"fallback pieces), got {self.vocab_size}")
        self.check_inputs()

    def check_inputs(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: at least one input file is needed")
        for path in self.inputs:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"inputs: no such file {path}")


def iter_training_lines(config: TokenizerTrainConfig) -> Iterator[str]:
    """Lines sentencepiece trains on: each document split at newlines, blank lines dropped."""
    for path in config.inputs:
        is_jsonl = path.endswith((".jsonl", ".json"))
        with open(path, "rb") as f:  # decoded line by line, so an error can name the line
            for line_number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
                except UnicodeDecodeError as exc:
                    if config.skip_bad_lines:
                        continue
                    raise BadInputError(path, line_number, f"not UTF-8 text ({exc.reason} at byte {exc.start} of "
                                        "the line; use --skip-bad-lines to skip such lines)") from None
                if is_jsonl:
                    text = _jsonl_text(path, line_number, line, config)
                    if text is None:
                        continue
                else:
                    text = line
                for piece in text.split("\n"):
                    if piece.strip():
                        yield piece


def _jsonl_text(path: str, line_number: int, line: str, config: TokenizerTrainConfig) -> Optional[str]:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
        text = record[config.json_key]
        if not isinstance(text, str):
            raise TypeError(f"field {config.json_key!r} is {type(text).__name__}, not a string")
        return text
    except (ValueError, KeyError, TypeError) as exc:
        if config.skip_bad_lines:
            return None
        reason = f"missing key {config.json_key!r}" if isinstance(exc, KeyError) else str(exc)
        raise BadInputError(path, line_number, reason + " (use --skip-bad-lines to skip such lines)") from exc


def train_sentencepiece(config: TokenizerTrainConfig) -> str:
    """Train and write ``<model_prefix>.model`` / ``.vocab``; returns the .model path.

    Both files appear only once training succeeded (written to temp files, then renamed).
    """
    config.validate()
    try:
        import sentencepiece as spm
    except ImportError as exc:  # pragma: no cover
        raise ImportError("training a tokenizer needs `pip install sentencepiece`") from exc

    # The trainer samples and shuffles lines; this makes the sampling repeatable.
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(config.seed)
    # An exception raised inside the iterator would come back from sentencepiece's C++ side as
    # an opaque RuntimeError; instead stop the iteration, remember why, and re-raise it as is.
    failures: List[BaseException] = []

    def lines() -> Iterator[str]:
        try:
            yield from iter_training_lines(config)
        except (BadInputError, UnicodeDecodeError) as exc:
            failures.append(exc)

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_writer=model,
            vocab_size=config.vocab_size,
            model_type=config.model_type,
            unk_id=UNK_ID, pad_id=PAD_ID, pad_piece="[PAD]", bos_id=-1, eos_id=EOD_ID, eos_piece="<eod>",
            control_symbols=CONTROL_SYMBOLS,
            user_defined_symbols=USER_SYMBOLS,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=config.character_coverage,
            input_sentence_size=config.max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=16384,
            num_threads=config.num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:  # sentencepiece reports bad settings (e.g. vocab too large) this way
        if failures:
            raise failures[0] from None
        raise ValueError(f"sentencepiece training failed for {config.inputs}: {exc}") from exc
    if failures:
        raise failures[0]
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab_lines = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i)}\n"
                          for i in range(processor.get_piece_size()))

    model_path = config.model_prefix + ".model"
    atomic_write_bytes(model_path, model.getvalue())
    atomic_write_bytes(config.model_prefix + ".vocab", vocab_lines.encode("utf-8"))
    return model_path



# --------------------------------------------------------------------------- Hugging Face tokenizers

HF_MODEL_TYPES = ("bpe", "wordpiece", "unigram")
# Reserved by every model trained with the tokenizers library, at these ids: BERT's four
# (with WordPiece's [UNK]) and GPT-2's end-of-document token.
HF_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>"]


def train_hf_tokenizer(config: TokenizerTrainConfig) -> str:
    """Train a Hugging Face ``tokenizers`` model and write ``<model_prefix>.json``; returns its path.

    ``bpe``: GPT-2's byte-level BPE (lossless; its ``<model_prefix>-vocab.json`` and
    ``-merges.txt`` are written too, the files ``data.tokenizer: gpt2`` reads);
    ``wordpiece``: BERT's (lower-cased, accents stripped, as bert-base-uncased);
    ``unigram``: SentencePiece-style unigram over whitespace-marked words.
    Files appear only once training succeeded (temp files, then renamed).
    """
    if config.model_type not in HF_MODEL_TYPES:
        raise ValueError(f"model_type: expected one of {', '.join(HF_MODEL_TYPES)} with the tokenizers "
                         f"library, got {config.model_type!r}")
    if config.vocab_size < 300:
        raise ValueError(f"vocab_size: must be >= 300 (special tokens and the base alphabet), got {config.vocab_size}")
    config.check_inputs()
    try:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    except ImportError as exc:  # pragma: no cover
        raise ImportError("training a Hugging Face tokenizer needs `pip install tokenizers`") from exc

    kind = config.model_type
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, special_tokens=HF_SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=config.vocab_size, special_tokens=HF_SPECIAL_TOKENS,
                                            show_progress=False)
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=config.vocab_size, special_tokens=HF_SPECIAL_TOKENS,
                                          unk_token="[UNK]", show_progress=False)
    lines = iter_training_lines(config)
    if config.max_sentences:
        lines = (line for i, line in enumerate(lines) if i < config.max_sentences)
    tok.train_from_iterator(lines, trainer=trainer)

    json_path = config.model_prefix + ".json"
    atomic_write_bytes(json_path, tok.to_str().encode("utf-8"))
    if kind == "bpe":  # GPT-2's two files, written by the library's own BPE.save, then moved into place
        out_dir, name = os.path.split(os.path.abspath(config.model_prefix))
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            for written in tok.model.save(tmp, name):
                os.replace(written, os.path.join(out_dir, os.path.basename(written)))
    return json_path
