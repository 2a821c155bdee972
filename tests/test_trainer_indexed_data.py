"""The trainer on msg-preprocess output with a configured tokenizer: BERT through
build_bert_datasets (growth preserves the loss, resume is bit-exact), GPT with sentencepiece,
and clear config errors for tokenizer / data mistakes."""
import json

import numpy as np
import pytest
import torch

from megatron_msg.config import ConfigError, config_from_dict
from megatron_msg.training.batches import BUNDLED_CORPUS, IndexedBertBatches
from megatron_msg.training.trainer import Trainer, build_batches

pytest.importorskip("sentencepiece")

SPM_VOCAB = 400

RAW = {
    "model": {"arch": "bert", "hidden": 16, "ffn": 32, "heads": 2, "layers": 1, "head_dim": 8, "seq_len": 32,
              "vocab_size": SPM_VOCAB},
    "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
    "lr": {"warmup_steps": 3},
    "train": {"steps": 24, "batch_size": 4, "log_interval": 1, "eval_interval": 8, "eval_iters": 1,
              "save_interval": 5, "tensorboard": False, "plot": False},
    "growth": {"defaults": {"phi": 4}, "stages": [{"at_step": 8, "ffn": 48, "hidden": 24}]},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A ~100 KB slice of the bundled corpus, a sentencepiece model trained on it (msg-tokenizer),
    and msg-preprocess outputs: sentences for BERT (spm and byte), documents for GPT (spm)."""
    from megatron_msg.cli.preprocess import main as preprocess
    from megatron_msg.cli.tokenizer import main as tokenizer
    root = tmp_path_factory.mktemp("indexed")
    corpus = root / "tiny.jsonl"
    with open(BUNDLED_CORPUS, encoding="utf-8") as src, open(corpus, "w", encoding="utf-8") as dst:
        for line in list(src)[:30]:
            doc = json.loads(line)
            dst.write(json.dumps({"text": doc["text"][:3500]}) + "\n")
    assert tokenizer(["train", "--input", str(corpus), "--model-prefix", str(root / "spm"),
                      "--vocab-size", str(SPM_VOCAB), "--threads", "1"]) == 0
    spm = str(root / "spm.model")
    common = ["--input", str(corpus), "--workers", "1", "--no-progress"]
    assert preprocess(common + ["--output-prefix", str(root / "bert"), "--tokenizer-model", spm,
                                "--split-sentences"]) == 0
    assert preprocess(common + ["--output-prefix", str(root / "bert_byte"), "--tokenizer", "byte",
                                "--split-sentences"]) == 0
    assert preprocess(common + ["--output-prefix", str(root / "gpt"), "--tokenizer-model", spm]) == 0
    return {"spm": spm, "bert": str(root / "bert_text_sentence"), "bert_byte": str(root / "bert_byte_text_sentence"),
            "gpt": str(root / "gpt_text_document"), "root": root}


def _raw(data, **data_section):
    raw = json.loads(json.dumps(RAW))
    raw["data"] = {"format": "indexed", "path": data["bert"], "splits": "90,10,0", "tokenizer": "sentencepiece",
                   "tokenizer_model": data["spm"], **data_section}
    return raw


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bert_ref")
    return Trainer(config_from_dict(_raw(data)), out_dir=out, progress=False).run()


def test_bert_batches_from_the_indexed_dataset(data):
    from megatron_msg.data.tokenizer import SentencePieceTokenizer
    tok = SentencePieceTokenizer(data["spm"])
    train, valid = build_batches(config_from_dict(_raw(data)))
    assert isinstance(train, IndexedBertBatches) and isinstance(valid, IndexedBertBatches)
    assert len(train.dataset) == 24 * 1 * 4 and len(valid.dataset) == 1 * 4  # steps*grad_accum*batch_size
    b = train.get(3, 0)
    assert set(b) == {"tokens", "token_types", "padding_mask", "mlm_labels", "nsp_labels"}
    assert b["tokens"].shape == b["token_types"].shape == b["mlm_labels"].shape == (4, 32)
    assert b["padding_mask"].dtype == torch.bool and b["nsp_labels"].shape == (4,)
    assert all(v.dtype == torch.int64 for k, v in b.items() if k != "padding_mask")
    assert (b["tokens"][:, 0] == tok.cls).all()
    assert (b["tokens"][~b["padding_mask"]] == tok.pad).all() and not (b["tokens"][b["padding_mask"]] == tok.pad).any()
    assert ((b["tokens"] == tok.sep) & b["padding_mask"]).sum(1).eq(2).all()
    predicted = b["mlm_labels"] != -100
    assert predicted.any(1).all() and (predicted <= b["padding_mask"]).all()
    assert ((b["token_types"] == 1) <= b["padding_mask"]).all() and set(b["nsp_labels"].tolist()) <= {0, 1}
    assert (b["mlm_labels"][predicted] < tok.vocab_size).all()
    # Pure function of (step, micro): same call, same batch; other calls, other samples.
    again = train.get(3, 0)
    assert all(torch.equal(b[k], again[k]) for k in b)
    assert not torch.equal(train.get(4, 0)["tokens"], b["tokens"])


def test_bert_indexed_run_learns_and_growth_preserves_the_loss(reference):
    assert reference.final_step == 24 and reference.shape.hidden == 24 and reference.shape.ffn == 48
    growth = [r for r in _records(reference.out_dir) if r["kind"] == "growth"]
    assert [g["step"] for g in growth] == [8]
    g = growth[0]
    assert abs(g["loss_after"] - g["loss_before"]) <= 1e-5 * abs(g["loss_before"]), g
    losses = [reference.losses[s] for s in range(24)]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1, losses


@pytest.mark.parametrize("stop_after", [10])  # inside the mask ramp of the growth at step 8
def test_bert_indexed_resume_is_bit_exact(data, reference, tmp_path, stop_after):
    cfg = config_from_dict(_raw(data))
    assert Trainer(cfg, out_dir=tmp_path, progress=False).run(max_steps=stop_after).final_step == stop_after
    second = Trainer(cfg, out_dir=tmp_path, progress=False).run()
    assert second.final_step == 24
    for step in range(stop_after, 24):
        assert second.losses[step] == reference.losses[step], step
    assert second.valid_losses == {s: v for s, v in reference.valid_losses.items() if s >= stop_after}


def test_bert_indexed_with_the_byte_tokenizer(data, tmp_path):
    raw = _raw(data, path=data["bert_byte"], tokenizer="byte", tokenizer_model=None)
    raw["model"]["vocab_size"] = 261
    raw["train"]["steps"], raw["lr"]["warmup_steps"] = 3, 1
    raw["growth"]["stages"] = []
    cfg = config_from_dict(raw)
    b = build_batches(cfg)[0].get(0)
    assert (b["tokens"][:, 0] == 257).all() and (b["tokens"][~b["padding_mask"]] == 260).all()
    res = Trainer(cfg, out_dir=tmp_path, progress=False).run()
    assert res.final_step == 3 and all(np.isfinite(v) for v in res.losses.values())


def test_gpt_indexed_uses_the_configured_tokenizer(data, tmp_path):
    raw = _raw(data, path=data["gpt"])
    raw["model"]["arch"] = "gpt"
    raw["train"]["steps"], raw["lr"]["warmup_steps"] = 3, 1
    raw["growth"]["stages"] = []
    cfg = config_from_dict(raw)
    res = Trainer(cfg, out_dir=tmp_path, progress=False).run()
    assert res.final_step == 3
    tokens = build_batches(cfg)[0].get(0)["tokens"]
    assert tokens.max() < SPM_VOCAB and tokens.max() > 260  # sentencepiece ids, beyond any byte id


# ----------------------------------------------------------------------------- config errors

def _error(raw) -> str:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    return str(exc.value)


def test_sentencepiece_without_a_model_path(data):
    msg = _error(_raw(data, tokenizer_model=None))
    assert msg.startswith("data.tokenizer_model") and "sentencepiece needs" in msg


def test_sentencepiece_model_file_missing(data):
    msg = _error(_raw(data, tokenizer_model=str(data["root"] / "nope.model")))
    assert msg.startswith("data.tokenizer_model") and "no such file" in msg and "nope.model" in msg


def test_a_file_that_is_not_a_sentencepiece_model(data):
    bogus = data["root"] / "bogus.model"
    bogus.write_bytes(b"not a model")
    msg = _error(_raw(data, tokenizer_model=str(bogus)))
    assert msg.startswith("data.tokenizer_model") and "cannot load" in msg


def test_vocab_size_too_small_for_the_tokenizer(data):
    raw = _raw(data)
    raw["model"]["vocab_size"] = 300
    msg = _error(raw)
    assert msg.startswith("model.vocab_size") and f"{SPM_VOCAB} tokens" in msg


def test_byte_tokenizer_takes_no_model_file(data):
    raw = _raw(data, tokenizer="byte")
    assert _error(raw).startswith("data.tokenizer_model")


def test_jsonl_is_byte_only(data):
    raw = json.loads(json.dumps(RAW))
    raw["data"] = {"tokenizer": "sentencepiece", "tokenizer_model": data["spm"]}
    msg = _error(raw)
    assert msg.startswith("data.tokenizer") and "data.format: indexed" in msg


def test_missing_indexed_dataset(data):
    msg = _error(_raw(data, path=str(data["root"] / "absent_text_sentence")))
    assert msg.startswith("data.path") and "absent_text_sentence" in msg


def test_sentencepiece_model_without_bert_tokens(data, tmp_path):
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(input=str(data["root"] / "tiny.jsonl"), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=200, character_coverage=0.98, num_threads=1, minloglevel=2)
    msg = _error(_raw(data, tokenizer_model=str(tmp_path / "plain.model")))
    assert msg.startswith("data.tokenizer_model") and "no CLS, SEP, MASK, PAD" in msg and "BERT needs" in msg


def test_tokenizer_that_does_not_match_the_data(data, tmp_path, capsys):
    """Data preprocessed with the byte tokenizer, config naming the sentencepiece one."""
    raw = _raw(data, path=data["bert_byte"])
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: .*tokenized with"):
        Trainer(config_from_dict(raw), out_dir=tmp_path, progress=False)
    import yaml

    from megatron_msg.cli.train import main
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert main([str(p), "--out-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "config error: data.tokenizer:" in capsys.readouterr().err
