"""Exceptions of the data pipeline.

Every error names the file (and line or field) it is about, so a user looking at a failed
preprocessing job or a failed dataset build knows what to fix without a traceback dive.
"""


class DataError(Exception):
    """Base class of every error the data pipeline raises on purpose."""


class BadInputError(DataError):
    """A jsonl/text input line cannot be turned into a document (bad JSON, missing key, empty text)."""

    def __init__(self, path: str, line_number: int, reason: str) -> None:
        self.path = path
        self.line_number = line_number
        self.reason = reason
        super().__init__(f"{path}:{line_number}: {reason}")


class CorpusError(DataError):
    """A jsonl training corpus read directly (``data.format: jsonl``) holds no usable documents."""


class TooLittleDataError(DataError, ValueError):
    """A corpus, or one of its splits, holds less than what is asked of it (one sample, a split, a blend)."""


class IndexedFormatError(DataError):
    """A .bin/.idx pair is not a valid (or not a consistent) Megatron mmap indexed dataset."""


class TokenizerMismatchError(DataError):
    """The tokenizer given to a dataset is not the one the data was tokenized with."""
