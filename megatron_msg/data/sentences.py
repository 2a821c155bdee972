"""A small, dependency-free sentence splitter for BERT preprocessing.

Megatron-LM uses NLTK's punkt, whose model has to be downloaded; we cannot assume that.  This
splitter breaks after sentence-final punctuation followed by whitespace, and at blank lines.
It never drops a character: ``"".join(split_sentences(t)) == t`` (whitespace stays with the
sentence before it), which keeps the text -> tokens -> text round trip exact.
"""
from __future__ import annotations

import re
from typing import List

_BOUNDARY = re.compile(r"""[.!?]+["')\]]*\s+|\n[ \t]*\n\s*""")


def split_sentences(text: str) -> List[str]:
    pieces: List[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        end = match.end()
        if end < len(text):
            pieces.append(text[start:end])
            start = end
    if start < len(text):
        pieces.append(text[start:])
    return pieces
