"""msg-preprocess: exact round trips, worker-count independence, and bad input that fails
loudly (file:line) without leaving anything partial behind."""
import json
import os

import numpy as np
import pytest

from megatron_msg.data import build_gpt_datasets
from megatron_msg.data.errors import BadInputError, DataError, TokenizerMismatchError
from megatron_msg.data.indexed_dataset import IndexedDataset, metadata_path
from megatron_msg.data.preprocessing import PreprocessConfig, preprocess_jsonl
from megatron_msg.data.sentences import split_sentences
from megatron_msg.data.tokenizer import ByteTokenizer, SentencePieceTokenizer

PIECES = ["Growth is function preserving.", "Masks ramp from 0 to 1!", "Does it work? Yes.",
          "naïve café — 東京 😀", "def f(x):\n    return x + 1", "\n\n", "  spaces  ", "tab\tsep"]


def make_texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(PIECES, rng.integers(1, 12))) + f" #{i}" for i in range(n)]


def write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, key: t}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def texts():
    return make_texts(120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, texts):
    return write_jsonl(tmp_path_factory.mktemp("in") / "corpus.jsonl", texts)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory, texts):
    pytest.importorskip("sentencepiece")
    from megatron_msg.data.tokenizer_training import TokenizerTrainConfig, train_sentencepiece
    path = write_jsonl(tmp_path_factory.mktemp("spmin") / "t.jsonl", texts * 3)
    return train_sentencepiece(TokenizerTrainConfig(inputs=[path], model_prefix=str(path)[:-6], vocab_size=400,
                                                    num_threads=1))


def run(corpus, out, **kw):
    kw.setdefault("progress", False)
    return preprocess_jsonl(PreprocessConfig(inputs=[corpus], output_prefix=str(out), **kw))


def tokenizer_for(kind, spm_model):
    return ByteTokenizer() if kind == "byte" else SentencePieceTokenizer(spm_model)


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_round_trip_documents(kind, corpus, texts, spm_model, tmp_path):
    tok = tokenizer_for(kind, spm_model)
    stats = run(corpus, tmp_path / "o", tokenizer=kind, tokenizer_model=None if kind == "byte" else spm_model)
    assert stats.prefix == str(tmp_path / "o") + "_text_document"  # Megatron's naming
    ds = IndexedDataset(stats.prefix)
    assert ds.num_documents == len(ds) == len(texts) == stats.documents
    assert ds.dtype is np.uint16
    for k, text in enumerate(texts):
        doc = ds.document(k)
        assert doc[-1] == tok.eod  # EOD appended per document
        assert tok.decode(doc[:-1]) == text
    meta = json.load(open(metadata_path(stats.prefix)))
    assert meta["tokenizer_fingerprint"] == tok.fingerprint() and meta["num_documents"] == len(texts)


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_round_trip_through_gpt_dataset(kind, corpus, texts, spm_model, tmp_path):
    """text -> tokens -> .bin/.idx -> GPT samples -> tokens -> text, exactly."""
    tok = tokenizer_for(kind, spm_model)
    stats = run(corpus, tmp_path / "o", tokenizer=kind, tokenizer_model=None if kind == "byte" else spm_model)
    seq_len = 16
    train, valid, test = build_gpt_datasets(stats.prefix, seq_len=seq_len, seed=3, splits="1", tokenizer=tok,
                                            cache_dir=str(tmp_path / "cache"))
    assert valid is None and test is None
    ds = IndexedDataset(stats.prefix)
    stream = np.concatenate([ds[int(d)] for d in train.document_index]).astype(np.int64)
    # Un-shuffled, consecutive samples overlap by one token and tile the stream.
    n = len(train.sample_index) - 1
    pieces = [train.sample_tokens(j) for j in range(n)]
    assert all(len(p) == seq_len + 1 for p in pieces)
    rebuilt = np.concatenate([pieces[0]] + [p[1:] for p in pieces[1:]])
    np.testing.assert_array_equal(rebuilt, stream[:len(rebuilt)])
    # Shuffled access returns exactly those samples.
    assert sorted(tuple(train[i]["tokens"]) for i in range(len(train))) == sorted(tuple(p) for p in pieces)
    # Back to text: split at EOD; every document fully covered by the samples is exact.
    ends = np.flatnonzero(rebuilt == tok.eod)
    starts = np.concatenate([[0], ends[:-1] + 1])
    decoded = [tok.decode(rebuilt[a:b]) for a, b in zip(starts, ends)]
    order = [int(d) for d in train.document_index]
    assert decoded == [texts[d] for d in order[:len(decoded)]]
    assert len(decoded) >= len(texts) - 2


def test_workers_do_not_change_the_bytes(corpus, tmp_path):
    a = run(corpus, tmp_path / "one", workers=1, chunk_bytes=500)
    b = run(corpus, tmp_path / "two", workers=2, chunk_bytes=500)
    for ext in (".bin", ".idx"):
        assert open(a.prefix + ext, "rb").read() == open(b.prefix + ext, "rb").read()


def test_sentence_splitting(corpus, texts, tmp_path):
    stats = run(corpus, tmp_path / "s", split_sentences=True)
    assert stats.prefix.endswith("_text_sentence")
    ds = IndexedDataset(stats.prefix)
    tok = ByteTokenizer()
    assert len(ds) > ds.num_documents == len(texts)
    for k, text in enumerate(texts):
        first, last = ds.document_indices[k], ds.document_indices[k + 1]
        sentences = [tok.decode(ds[int(s)]) for s in range(first, last)]
        assert sentences == split_sentences(text)[:-1] + [split_sentences(text)[-1]]
        assert ds[int(last) - 1][-1] == tok.eod  # EOD on the document's last sentence only
        assert tok.decode(ds.document(k)) == text


def test_split_sentences_never_drops_text():
    for text in ["One. Two! Three? Four", "a.b. c", "x\n\n\ny", "Quote.\" Next", "", "no end."]:
        assert "".join(split_sentences(text)) == text
    assert split_sentences("One. Two! Three?") == ["One. ", "Two! ", "Three?"]


def test_no_eod(corpus, texts, tmp_path):
    ds = IndexedDataset(run(corpus, tmp_path / "n", append_eod=False).prefix)
    assert ByteTokenizer().decode(ds[0], skip_special=False) == texts[0]


def test_blank_lines_are_not_documents(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    stats = run(str(path), tmp_path / "o")
    assert stats.documents == 2 and stats.blank_lines == 2


BAD_LINES = [
    ('{"text": "ok"', "malformed JSON"),
    ('{"body": "no text key"}', "missing key 'text'"),
    ('{"text": ""}', "empty document"),
    ('{"text": 42}', "is int, not a string"),
    ('["text"]', "expected a JSON object"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_line_fails_with_line_number_and_writes_nothing(tmp_path, line, message, workers):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n' + line + '\n{"text": "after"}\n')
    with pytest.raises(BadInputError, match=rf"in\.jsonl:3: .*{message}.*--skip-bad-lines"):
        run(str(path), tmp_path / "out", workers=workers, chunk_bytes=20)
    assert os.listdir(tmp_path) == ["in.jsonl"]  # no .bin/.idx, no temp files


def test_invalid_utf8_is_a_bad_line(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(BadInputError, match=r"u\.jsonl:2: malformed JSON"):
        run(str(path), tmp_path / "out")


def test_skip_bad_lines_reports_them(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = ['{"text": "a"}'] + [b for b, _ in BAD_LINES] + ['{"text": "z"}']
    path.write_text("\n".join(lines) + "\n")
    stats = run(str(path), tmp_path / "out", skip_bad_lines=True)
    assert stats.documents == 2
    assert [(line, reason.split(" ")[0]) for _, line, reason in stats.skipped_lines] == \
        [(2, "malformed"), (3, "missing"), (4, "empty"), (5, "field"), (6, "expected")]
    ds = IndexedDataset(stats.prefix)
    assert [ByteTokenizer().decode(ds[i]) for i in range(2)] == ["a", "z"]


def test_nothing_usable_is_an_error(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": ""}\n')
    with pytest.raises(DataError, match=r"in\.jsonl: no documents found"):
        run(str(path), tmp_path / "out", skip_bad_lines=True)
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_failed_rerun_keeps_previous_output(corpus, tmp_path):
    good = run(corpus, tmp_path / "o")
    before = open(good.prefix + ".bin", "rb").read()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n{oops\n')
    with pytest.raises(BadInputError):
        preprocess_jsonl(PreprocessConfig(inputs=[str(bad)], output_prefix=str(tmp_path / "o"), progress=False))
    assert open(good.prefix + ".bin", "rb").read() == before
    IndexedDataset(good.prefix)  # still a consistent pair


def test_tokenizer_mismatch_is_detected(corpus, spm_model, tmp_path):
    prefix = run(corpus, tmp_path / "o").prefix  # byte tokenizer
    spm_tok = SentencePieceTokenizer(spm_model)
    with pytest.raises(TokenizerMismatchError, match="tokenized with .*byte"):
        build_gpt_datasets(prefix, seq_len=8, splits="1", tokenizer=spm_tok, cache_dir=None)
    # Data made elsewhere (no sidecar): the ids themselves give it away.
    os.unlink(metadata_path(prefix))
    with pytest.raises(TokenizerMismatchError, match="token id 2[0-9]{2}, outside the vocabulary"):
        build_gpt_datasets(prefix, seq_len=8, splits="1", tokenizer=_SmallVocab(), cache_dir=None)
    build_gpt_datasets(prefix, seq_len=8, splits="1", tokenizer=ByteTokenizer(), cache_dir=None)


def test_ids_outside_the_vocabulary_are_found_at_open_even_with_a_matching_sidecar(corpus, tmp_path):
    """Before: a sidecar naming the right tokenizer skipped the id scan, and a damaged .bin crashed
    inside the embedding.  The scan is cached per .bin version."""
    from megatron_msg.data import compat
    prefix = run(corpus, tmp_path / "o").prefix  # byte tokenizer, sidecar written
    build_gpt_datasets(prefix, seq_len=8, splits="1", tokenizer=ByteTokenizer(), cache_dir=str(tmp_path / "c"))
    with open(prefix + ".bin", "r+b") as f:  # one id past the byte vocabulary (261), same size
        dtype = IndexedDataset(prefix).dtype
        f.seek(5 * np.dtype(dtype).itemsize)
        f.write(np.array([300], dtype=dtype).tobytes())
    with pytest.raises(TokenizerMismatchError, match=r"o_text_document\.bin: contains token id 300, .*damaged"):
        build_gpt_datasets(prefix, seq_len=8, splits="1", tokenizer=ByteTokenizer(), cache_dir=str(tmp_path / "c"))
    calls = []
    real = IndexedDataset.max_token_id
    IndexedDataset.max_token_id = lambda self: calls.append(1) or real(self)
    try:
        for _ in range(2):
            with pytest.raises(TokenizerMismatchError):
                compat.check_tokenizer_matches(IndexedDataset(prefix), ByteTokenizer(),
                                               compat.IndexCache(str(tmp_path / "c")))
    finally:
        IndexedDataset.max_token_id = real
    assert calls == []  # this version of the .bin was scanned by the open above: cached


class _SmallVocab(ByteTokenizer):
    @property
    def vocab_size(self):
        return 200


def test_cli(corpus, tmp_path, capsys):
    from megatron_msg.cli.preprocess import main
    assert main(["--input", corpus, "--output-prefix", str(tmp_path / "c"), "--workers", "2", "--no-progress"]) == 0
    assert "MB/s" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n{"txt": "y"}\n')
    assert main(["--input", str(bad), "--output-prefix", str(tmp_path / "b"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: missing key 'text'" in err and "nothing was written" in err
    assert main(["--input", str(bad), "--output-prefix", str(tmp_path / "b"), "--no-progress",
                 "--skip-bad-lines"]) == 0
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_bundled_demo_corpus(tmp_path):
    """The corpus shipped for the demo preprocesses cleanly and round-trips exactly."""
    from pathlib import Path
    corpus = Path(__file__).resolve().parent.parent / "megatron_msg" / "assets" / "corpus.jsonl"
    if not corpus.is_file():
        pytest.skip("megatron_msg/assets/corpus.jsonl not present")
    stats = run(str(corpus), tmp_path / "demo")
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8") if line.strip()]
    ds = IndexedDataset(stats.prefix)
    assert ds.num_documents == len(texts) and not stats.skipped_lines
    assert all(ByteTokenizer().decode(ds.document(k)[:-1]) == t for k, t in enumerate(texts))
    train, valid, _ = build_gpt_datasets(stats.prefix, seq_len=128, splits="95,5,0", tokenizer=ByteTokenizer(),
                                         cache_dir=None)
    assert len(train) > 1000 and valid[0]["tokens"].shape == (129,)
