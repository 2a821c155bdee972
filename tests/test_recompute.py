"""Activation recomputation (parallel/recompute.py): the same training, fewer saved activations.

Recomputation changes what autograd keeps, never the arithmetic: the second
forward of a layer must draw the same dropout masks (default generators and the
TP-region tracker) and produce the same values, so losses and parameters equal
a run without it bit for bit, through growth ramps, under TP x PP with
sequence parallelism and in fp16.  Replaying no generator state, or only the
default one, moves the loss at the first step with dropout (checked by hand,
2026-11-23).  What it saves is counted exactly: a recomputed layer keeps only
its inputs.
"""
from __future__ import annotations

import hashlib

import pytest
import torch

from megatron_msg.config import ConfigError, Shape, config_from_dict
from megatron_msg.model import build_model
from megatron_msg.model.placement import Placement
from megatron_msg.parallel.launch import LaunchEnv, init_parallel
from megatron_msg.parallel.recompute import RecomputePolicy
from megatron_msg.training.trainer import Trainer
from tests.dist_harness import run_distributed
from tests.helpers import tiny_cfg
from tests.test_zero import STEPS, _raw


def _with(raw: dict, recompute: str, layers: int = 0) -> dict:
    raw["model"].update(dropout=0.1, attention_dropout=0.1)
    raw["train"].update(recompute=recompute, recompute_layers=layers)
    return raw


def _digest(model) -> str:
    h = hashlib.sha256()
    for _, p in model.named_parameters():
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- what is saved

def _saved_bytes(policy: RecomputePolicy, masked: bool, layers: int = 4) -> int:
    """Bytes autograd keeps for backward while 4 layers run forward on a [2, 16, 32] input."""
    cfg = tiny_cfg("gpt", Shape(32, 64, 4, layers), seq_len=16)
    model = build_model(cfg, Placement(recompute=policy), seed=0)
    model.set_masked(masked)
    x = torch.randn(2, 16, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        y = model.run_layers(x, model.hidden_mask_or_none())
    y.sum().backward()
    assert model.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    return sum(saved)


@pytest.mark.parametrize("masked", [False, True])
def test_a_recomputed_layer_keeps_only_its_inputs(masked):
    plain = _saved_bytes(RecomputePolicy(), masked)
    per_layer = plain // 4
    layer_input = 2 * 16 * 32 * 4 + (32 * 4 if masked else 0)  # x, and the hidden mask c on a ramp
    assert per_layer > 10 * layer_input  # what recomputation is for
    assert _saved_bytes(RecomputePolicy(enabled=True), masked) == 4 * layer_input
    # recompute_layers=N: the stage's first N layers recompute, the others save as usual
    for n in (1, 3):
        assert _saved_bytes(RecomputePolicy(enabled=True, num_layers=n), masked) == (
            n * layer_input + (4 - n) * per_layer)


def test_policy_positions():
    assert not RecomputePolicy().recomputes(0)
    assert all(RecomputePolicy(True).recomputes(i) for i in range(8))
    assert [RecomputePolicy(True, 2).recomputes(i) for i in range(4)] == [True, True, False, False]
    with pytest.raises(ValueError, match="recompute mode 'block'"):
        RecomputePolicy.from_config("block")


# --------------------------------------------------------------------------- training

def _run_single(raw, out_dir):
    trainer = Trainer(config_from_dict(raw), out_dir=out_dir, progress=False)
    return trainer.run().losses, _digest(trainer.model)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_single_process_training_is_identical_with_recomputation(arch, tmp_path):
    # Dropout in both regions and four growth events (ramps: masked layers are recomputed too).
    ref = _run_single(_with(_raw(arch), "none"), tmp_path / "none")
    assert len(ref[0]) == STEPS
    assert _run_single(_with(_raw(arch), "full"), tmp_path / "full") == ref
    assert _run_single(_with(_raw(arch), "full", layers=1), tmp_path / "first") == ref


def test_recomputation_with_16_bit_parameters_is_identical(tmp_path):
    # fp32 gradient accumulation hooks fire during the recomputed backward as during a plain one.
    def raw(mode):
        r = _with(_raw("gpt", "bf16"), mode)
        r["train"]["params_dtype"] = "bf16"
        return r
    ref = _run_single(raw("none"), tmp_path / "none")
    assert len(ref[0]) == STEPS
    assert _run_single(raw("full"), tmp_path / "full") == ref


def _train(rank, world, raw, out_dir):
    cfg = config_from_dict(raw)
    ps = init_parallel(cfg.parallel, "cpu", LaunchEnv(rank, world, rank))
    trainer = Trainer(cfg, out_dir=out_dir, progress=False, parallel=ps)
    res = trainer.run()
    return res.losses, _digest(trainer.model)


@pytest.mark.parametrize("arch,dtype,parallel", [
    ("gpt", "fp32", {"tp": 2, "pp": 2, "sequence_parallel": True}),
    ("bert", "fp16", {"tp": 2, "sequence_parallel": True}),
    ("gpt", "bf16", {"pp": 2, "dp": 2, "zero_stage": 2}),
], ids=["tp2xpp2-sp-gpt", "tp2-sp-bert-fp16", "pp2xdp2-zero2-gpt-bf16-params"])
def test_parallel_training_is_identical_with_recomputation(arch, dtype, parallel, tmp_path):
    # The recomputed forward reissues the layer's TP collectives in backward and, under SP,
    # draws the residual dropout from the tracker (per-rank tokens): all must replay exactly.
    # The last case adds 16-bit parameters (fp32 gradient hooks) and ZeRO-2 under the pipeline.
    world = parallel.get("tp", 1) * parallel.get("pp", 1) * parallel.get("dp", 1)

    def raw(mode):
        r = _with(_raw(arch, dtype, **parallel), mode)
        if dtype == "bf16":
            r["train"]["params_dtype"] = "bf16"
        return r
    ref = run_distributed(_train, world, args=(raw("none"), tmp_path / "a"))
    got = run_distributed(_train, world, args=(raw("full"), tmp_path / "b"))
    assert len(ref[0][0]) == STEPS
    assert got == ref


# --------------------------------------------------------------------------- config

def test_recompute_config_errors():
    with pytest.raises(ConfigError, match=r"train.recompute: 'selective' is not one of none, full"):
        config_from_dict({"train": {"recompute": "selective"}})
    with pytest.raises(ConfigError, match=r"train.recompute_layers: 2 needs train.recompute=full"):
        config_from_dict({"train": {"recompute_layers": 2}})
    with pytest.raises(ConfigError, match=r"train.recompute_layers: must be >= 0"):
        config_from_dict({"train": {"recompute": "full", "recompute_layers": -1}})
    with pytest.raises(ConfigError, match=r"train.recompute: full with train.compile=true needs model.dropout"):
        config_from_dict({"train": {"recompute": "full", "compile": True}, "model": {"attention_dropout": 0.1}})
    config_from_dict({"train": {"recompute": "full", "compile": True}})  # no dropout: fine
