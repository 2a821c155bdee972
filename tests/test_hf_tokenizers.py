"""Hugging Face tokenizer files (tokenizer.json; GPT-2's vocab.json + merges.txt) in msg-tokenizer,
msg-preprocess and training, with tokenizers trained here by the tokenizers library."""
from __future__ import annotations

import numpy as np
import pytest

from megatron_msg.cli.preprocess import main as msg_preprocess
from megatron_msg.cli.tokenizer import main as msg_tokenizer
from megatron_msg.config import ConfigError, load_config
from megatron_msg.data import IndexedDataset
from megatron_msg.data.hf_tokenizer import HuggingFaceTokenizer
from megatron_msg.data.tokenizer import build_tokenizer
from megatron_msg.data.tokenizer_training import TokenizerTrainConfig, train_hf_tokenizer
from megatron_msg.training.batches import BUNDLED_CORPUS

TEXTS = ["Hello, World!", "def f(x):\n\treturn x ** 2  # squared\n", "naïve café – 東京 🙂", "", "  two  spaces  ",
         "<|endoftext|> is text here", "[MASK]"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return {kind: train_hf_tokenizer(TokenizerTrainConfig(inputs=[str(BUNDLED_CORPUS)], model_prefix=str(out / kind),
                                                          vocab_size=400, model_type=kind))
            for kind in ("bpe", "wordpiece", "unigram")}, out


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_trained_tokenizers_have_every_special_token_and_never_add_them(trained, kind):
    paths, _ = trained
    tok = build_tokenizer("huggingface", paths[kind])
    st = tok.special_tokens
    assert None not in (st.eod, st.pad, st.cls, st.sep, st.mask) and tok.vocab_size == 400
    ids = tok.encode("plain words")
    assert ids and not set(ids) & set(st.ids())


def test_byte_level_bpe_round_trips_any_text(trained):
    tok = build_tokenizer("huggingface", trained[0]["bpe"])
    for text in TEXTS[:5]:
        assert tok.decode(tok.encode(text)) == text


def test_gpt2_files_tokenize_as_the_same_bpe_and_keep_endoftext_literal(trained):
    _, out = trained
    gpt2 = build_tokenizer("gpt2", str(out / "bpe-vocab.json"), merges_file=str(out / "bpe-merges.txt"))
    same = build_tokenizer("huggingface", str(out / "bpe.json"))
    for text in TEXTS:
        assert gpt2.encode(text) == same.encode(text)
    assert gpt2.special_tokens.eod == same.special_tokens.eod == gpt2._tok.token_to_id("<|endoftext|>")
    # "<|endoftext|>" or "[MASK]" inside a document is text (GPT-2 in Megatron-LM; sentencepiece's
    # control symbols), never the special id.
    for tok in (gpt2, same):
        assert tok.special_tokens.eod not in tok.encode(TEXTS[5]) and tok.special_tokens.mask not in tok.encode(TEXTS[6])
    assert gpt2.fingerprint() != same.fingerprint()


def test_a_tokenizer_json_with_a_post_processor_and_truncation_adds_nothing(tmp_path, trained):
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    backend = Tokenizer.from_file(trained[0]["wordpiece"])
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    backend.enable_truncation(3)
    backend.save(str(tmp_path / "bert.json"))
    tok = build_tokenizer("huggingface", str(tmp_path / "bert.json"))
    plain = build_tokenizer("huggingface", trained[0]["wordpiece"])
    long_text = "the quick brown fox jumps over the lazy dog"
    assert tok.encode(long_text) == plain.encode(long_text) and len(tok.encode(long_text)) > 3
    assert tok.encode(long_text)[0] != cls


def test_msg_preprocess_writes_the_tokenizers_ids(tmp_path, trained):
    _, out = trained
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(f'{{"text": {__import__("json").dumps(t)}}}\n' for t in TEXTS if t))
    for args, kind in ((["--tokenizer-model", str(out / "bpe.json")], "huggingface"),
                       (["--vocab-file", str(out / "bpe-vocab.json"), "--merge-file", str(out / "bpe-merges.txt")],
                        "gpt2")):
        prefix = tmp_path / kind
        assert msg_preprocess(["--input", str(jsonl), "--output-prefix", str(prefix), "--no-progress", *args]) == 0
        ds = IndexedDataset(f"{prefix}_text_document")
        tok = build_tokenizer("huggingface", str(out / "bpe.json"))
        expected = [np.array(tok.encode(t) + [tok.special_tokens.eod]) for t in TEXTS if t]
        assert all(np.array_equal(ds[i], e) for i, e in enumerate(expected))


def test_a_vocabulary_without_eod_needs_no_append_eod(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train([str(BUNDLED_CORPUS)], trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    backend.save(str(tmp_path / "wp.json"))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "One sentence. Another one."}\n')
    base = ["--input", str(jsonl), "--tokenizer-model", str(tmp_path / "wp.json"), "--no-progress"]
    assert msg_preprocess([*base, "--output-prefix", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "no end-of-document token" in err and "--no-append-eod" in err and err.count("\n") == 1
    assert not list(tmp_path.glob("a*"))
    assert msg_preprocess([*base, "--output-prefix", str(tmp_path / "b"), "--no-append-eod", "--split-sentences"]) == 0
    # BERT needs no EOD; GPT does, and says so before training.
    bert = ["model.arch=bert", "model.vocab_size=300", "data.format=indexed", f"data.path={tmp_path}/b_text_sentence",
            "data.tokenizer=huggingface", f"data.tokenizer_model={tmp_path}/wp.json"]
    load_config(None, bert)
    with pytest.raises(ConfigError, match=r"^data.tokenizer_model: .* has no EOD token\(s\), which GPT needs"):
        load_config(None, [b.replace("arch=bert", "arch=gpt") for b in bert])


@pytest.mark.parametrize("overrides,field,words", [
    (["data.tokenizer=huggingface"], "data.tokenizer_model", "needs a tokenizers tokenizer.json"),
    (["data.tokenizer=gpt2", "data.tokenizer_model=v.json"], "data.merges_file", "needs GPT-2's merges.txt"),
    (["data.merges_file=m.txt"], "data.merges_file", "only used with data.tokenizer: gpt2"),
    (["data.tokenizer=huggingface", "data.tokenizer_model=GARBAGE"], "data.tokenizer_model",
     "cannot load"),
    (["data.tokenizer=huggingface", "data.tokenizer_model=BPE", "model.vocab_size=300"], "model.vocab_size",
     "smaller than the huggingface tokenizer's 400 tokens"),
])
def test_tokenizer_settings_are_checked_against_the_model(tmp_path, trained, overrides, field, words):
    (tmp_path / "garbage.json").write_text("{not a tokenizer")
    subs = {"GARBAGE": str(tmp_path / "garbage.json"), "BPE": trained[0]["bpe"]}
    overrides = ["data.format=indexed", f"data.path={_dataset(tmp_path, trained)}"] + \
        [o.replace("GARBAGE", subs["GARBAGE"]).replace("BPE", subs["BPE"]) for o in overrides]
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    message = str(exc.value)
    assert message.startswith(field) and words in message and "\n" not in message, message


def _dataset(tmp_path, trained) -> str:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a b c"}\n')
    msg_preprocess(["--input", str(jsonl), "--output-prefix", str(tmp_path / "d"), "--no-progress",
                    "--tokenizer-model", trained[0]["bpe"]])
    return str(tmp_path / "d_text_document")


def test_msg_tokenizer_trains_encodes_and_decodes_with_the_library(tmp_path, capsys):
    prefix = tmp_path / "wp"
    assert msg_tokenizer(["train", "--library", "hf", "--model-type", "wordpiece", "--input", str(BUNDLED_CORPUS),
                          "--model-prefix", str(prefix), "--vocab-size", "350"]) == 0
    assert "vocab 350" in capsys.readouterr().out
    assert msg_tokenizer(["encode", "--model", f"{prefix}.json", "Hello world"]) == 0
    ids = capsys.readouterr().out.split()
    assert msg_tokenizer(["decode", "--model", f"{prefix}.json", *ids]) == 0
    assert capsys.readouterr().out.strip() == "hello world"  # WordPiece lower-cases (BERT uncased)
    assert isinstance(build_tokenizer("huggingface", f"{prefix}.json"), HuggingFaceTokenizer)


@pytest.mark.parametrize("argv,words", [
    (["encode", "--model", "GARBAGE", "x"], "is not a Hugging Face tokenizer.json"),
    (["encode", "--model", "MISSING.json", "x"], "tokenizer file not found"),
    (["encode", "--tokenizer", "gpt2", "--model", "v.json", "x"], "needs GPT-2's vocab.json"),
    (["train", "--model-type", "wordpiece", "--input", "CORPUS", "--model-prefix", "p"], "needs --library hf"),
    (["decode", "five"], "decode takes integer ids"),
])
def test_msg_tokenizer_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, words):
    (tmp_path / "garbage.json").write_text("{not a tokenizer")
    argv = [a.replace("GARBAGE", str(tmp_path / "garbage.json")).replace("MISSING", str(tmp_path / "missing"))
            .replace("CORPUS", str(BUNDLED_CORPUS)) for a in argv]
    assert msg_tokenizer(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err, err
