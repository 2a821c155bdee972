"""msg-export: a checkpoint loaded by Hugging Face transformers computes what our model computes."""
from __future__ import annotations

import pytest
import torch

from megatron_msg.checkpoint.io import latest_checkpoint, open_checkpoint
from megatron_msg.checkpoint.logical import load_model
from megatron_msg.cli.export import main as msg_export
from megatron_msg.config import ModelConfig, config_from_dict
from megatron_msg.model import build_model
from megatron_msg.training.trainer import Trainer
from tests.helpers import make_batch
from tests.test_zero import _raw

transformers = pytest.importorskip("transformers")  # in the test extra; skip only outside it


def _trained(arch: str, out_dir, max_steps: int | None = None, **model):
    """A short run through two growth events, past their ramps (phi 6: last ramp ends at 22)."""
    raw = _raw(arch)
    raw["model"].update(model)
    raw["growth"]["stages"] = raw["growth"]["stages"][:2]
    raw["train"]["steps"] = 24
    Trainer(config_from_dict(raw), out_dir=out_dir, progress=False).run(max_steps=max_steps)
    ckpt = open_checkpoint(latest_checkpoint(out_dir))
    model = build_model(ModelConfig(**ckpt.state["model_config"]), initialize=False)
    load_model(model, ckpt.model)
    return model.eval()


def _export_and_compare_gpt(tmp_path, hf_class: str, **model):
    ours = _trained("gpt", tmp_path / "run", **model)
    assert ours.cfg.layers == 4  # grown
    assert msg_export([str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    hf = getattr(transformers, hf_class).from_pretrained(tmp_path / "hf").eval()
    batch = make_batch("gpt", ours.cfg)
    with torch.no_grad():
        expected = ours(batch["tokens"])
        got = hf(batch["tokens"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gpt_export_equals_our_model(tmp_path):
    _export_and_compare_gpt(tmp_path, "GPT2LMHeadModel")


def test_gpt_with_rotary_positions_exports_as_gpt_neox(tmp_path):
    _export_and_compare_gpt(tmp_path, "GPTNeoXForCausalLM", position_embedding="rope", rope_theta=500.0)


def test_bert_with_rotary_positions_is_refused(tmp_path, capsys):
    _trained("bert", tmp_path / "run", position_embedding="rope")
    assert msg_export([str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) != 0
    assert "RoFormer" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_bert_export_equals_our_model(tmp_path):
    ours = _trained("bert", tmp_path / "run")
    assert msg_export([str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf").eval()
    b = make_batch("bert", ours.cfg)  # with padding in the first sequence
    with torch.no_grad():
        expected = ours(b["tokens"], b["token_types"], b["padding_mask"])
        got = hf(input_ids=b["tokens"], token_type_ids=b["token_types"], attention_mask=b["padding_mask"].long())
    real = b["padding_mask"]  # padded positions' outputs are not defined the same way
    torch.testing.assert_close(got.prediction_logits[real], expected.mlm_logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.seq_relationship_logits, expected.nsp_logits, rtol=1e-5, atol=1e-5)


def test_export_refuses_a_checkpoint_mid_ramp_and_a_used_directory(tmp_path, capsys):
    _trained("gpt", tmp_path / "run", max_steps=10)  # the ffn ramp runs 8..14
    assert msg_export([str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "step 10 is inside a growth ramp" in err and "from step 14 or later" in err
    assert not (tmp_path / "hf").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("x")
    _trained("gpt", tmp_path / "run2", max_steps=4)
    assert msg_export([str(tmp_path / "run2"), "--out", str(tmp_path / "used")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert msg_export([str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
