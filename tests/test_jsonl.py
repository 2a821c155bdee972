"""JSON Lines reading: blank lines skipped, bad lines named by file and line."""
from __future__ import annotations

import pytest

from megatron_msg.jsonl import iter_jsonl
from megatron_msg.training.batches import read_jsonl_texts


def test_iter_jsonl_numbers_lines_and_skips_blank_ones(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "x"}\n\n  \n[1, 2]\n')
    assert list(iter_jsonl(p)) == [(1, {"text": "x"}), (4, [1, 2])]


def test_iter_jsonl_raises_the_callers_error(tmp_path):
    class Bad(ValueError):
        pass
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "x"}\n{"text": \n')
    with pytest.raises(Bad, match=r"a\.jsonl:2: malformed JSON"):
        list(iter_jsonl(p, Bad))


@pytest.mark.parametrize("content,message", [('{"text": "a"}\n{"body": "b"}\n', r"c\.jsonl:2: no 'text' field"),
                                             ('"just a string"\n', r"c\.jsonl:1: no 'text' field"),
                                             ("\n\n", "no documents"),
                                             ('{"text": "a"\n', r"c\.jsonl:1: malformed JSON")])
def test_corpus_reader_names_the_bad_line(tmp_path, content, message):
    p = tmp_path / "c.jsonl"
    p.write_text(content)
    from megatron_msg.data.errors import CorpusError  # msg-train: "data error: ...", exit 2
    with pytest.raises(CorpusError, match=message):
        read_jsonl_texts(p, "text")
