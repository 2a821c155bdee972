"""Tokenizers: exact round trips, special tokens, training (BPE and unigram), bad input."""
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_msg.data.errors import BadInputError, TokenizerMismatchError
from megatron_msg.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, build_tokenizer

spm = pytest.importorskip("sentencepiece")
from megatron_msg.data.tokenizer_training import TokenizerTrainConfig, train_sentencepiece  # noqa: E402

WORDS = ("the model grows its width and depth while the loss stays the same . data pipeline "
         "tokens def return self x = 1 + 2 ( ) [ ] { } : naïve café Übung 東京 😀 ").split()


def synthetic_corpus(path, n_docs=400, seed=0):
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocabulary = WORDS + ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(3000)]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            lines = [" ".join(rng.choice(vocabulary, rng.integers(3, 15))) for _ in range(rng.integers(1, 6))]
            f.write(json.dumps({"id": i, "text": "\n".join(lines) + ("\n\tindented" if i % 7 == 0 else "")}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthetic_corpus(tmp_path_factory.mktemp("corpus") / "c.jsonl")


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def spm_model(request, corpus, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("spm") / request.param)
    return train_sentencepiece(TokenizerTrainConfig(inputs=[corpus], model_prefix=prefix, vocab_size=400,
                                                    model_type=request.param, num_threads=1))


def test_byte_tokenizer_ids_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 261
    assert (tok.eod, tok.cls, tok.sep, tok.mask, tok.pad) == (256, 257, 258, 259, 260)
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    assert tok.decode([97, tok.eod, 98], skip_special=False) == "a<eod>b"
    assert tok.decode([97, tok.eod, 98]) == "ab"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([261])


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trip_any_text(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text
    assert list(tok.encode_array(text)) == tok.encode(text)


def test_trained_model_reserves_special_tokens(spm_model):
    tok = SentencePieceTokenizer(spm_model)
    assert tok.vocab_size == 400
    s = tok.special_tokens
    assert (s.pad, s.eod, s.cls, s.sep, s.mask) == (1, 2, 3, 4, 5)
    # Control symbols: the literal text "[MASK]" is ordinary text, never the mask token.
    assert tok.mask not in tok.encode("a [MASK] b [CLS]")
    assert os.path.isfile(spm_model[:-len(".model")] + ".vocab")


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_sentencepiece_round_trip_any_text(spm_model, text):
    tok = _cached(spm_model)
    assert tok.decode(tok.encode(text)) == text


_TOKENIZERS = {}


def _cached(path):
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = SentencePieceTokenizer(path)
    return _TOKENIZERS[path]


def test_sentencepiece_round_trip_corpus(spm_model, corpus):
    tok = _cached(spm_model)
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    encoded = tok.encode_batch(texts)
    assert all(tok.decode(ids) == t for ids, t in zip(encoded, texts))
    assert all(list(e) == tok.encode(t) for e, t in zip(encoded[:10], texts[:10]))


def test_existing_model_without_bert_tokens(tmp_path, corpus):
    """A user's own sentencepiece model (here: trained with sentencepiece's defaults)."""
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=200, minloglevel=2)
    tok = SentencePieceTokenizer(str(tmp_path / "plain.model"))
    assert tok.eod == 2  # sentencepiece's </s>
    assert tok.special_tokens.mask is None
    with pytest.raises(TokenizerMismatchError, match="no MASK token"):
        tok.mask


def test_training_reports_bad_line_and_writes_nothing(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "hello world"}\n{"text": oops}\n')
    config = TokenizerTrainConfig(inputs=[str(path)], model_prefix=str(tmp_path / "m"), vocab_size=300)
    with pytest.raises(BadInputError, match=r"bad\.jsonl:2:"):
        train_sentencepiece(config)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_training_missing_key(tmp_path):
    path = tmp_path / "k.jsonl"
    path.write_text('{"body": "hello"}\n')
    config = TokenizerTrainConfig(inputs=[str(path)], model_prefix=str(tmp_path / "m"), vocab_size=300)
    with pytest.raises(BadInputError, match=r"k\.jsonl:1: missing key 'text'"):
        train_sentencepiece(config)


def test_training_config_validation(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        TokenizerTrainConfig(inputs=["x"], model_prefix="m", model_type="wordpiece").validate()
    with pytest.raises(ValueError, match="vocab_size"):
        TokenizerTrainConfig(inputs=["x"], model_prefix="m", vocab_size=100).validate()
    with pytest.raises(FileNotFoundError, match="no such file"):
        TokenizerTrainConfig(inputs=[str(tmp_path / "none.jsonl")], model_prefix="m").validate()


def test_cli_train_and_encode(tmp_path, corpus, capsys):
    from megatron_msg.cli.tokenizer import main
    assert main(["train", "--input", corpus, "--model-prefix", str(tmp_path / "cli"), "--vocab-size", "350",
                 "--model-type", "unigram", "--threads", "1"]) == 0
    assert "vocab 350" in capsys.readouterr().out
    assert main(["encode", "--model", str(tmp_path / "cli.model"), "the model"]) == 0
    ids = [int(x) for x in capsys.readouterr().out.split()]
    assert main(["decode", "--model", str(tmp_path / "cli.model")] + [str(i) for i in ids]) == 0
    assert capsys.readouterr().out == "the model\n"


def test_build_tokenizer_errors():
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="model_path"):
        build_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_tokenizer("tiktoken")
    with pytest.raises(FileNotFoundError):
        SentencePieceTokenizer("/nonexistent.model")


def test_sentencepiece_decode_can_show_special_tokens(spm_model):
    tok = _cached(spm_model)
    ids = [tok.cls] + tok.encode("the model") + [tok.sep, tok.mask, tok.eod]
    assert tok.decode(ids, skip_special=False) == "[CLS]the model[SEP][MASK]<eod>"
    assert tok.decode(ids) == "the model"
