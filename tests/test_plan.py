"""msg-plan: FLOPs against Megatron-LM's closed form, per-rank sizes against the layout rules."""
from __future__ import annotations

import json
import math

import pytest

from megatron_msg.cli.plan import main as msg_plan
from megatron_msg.config import ModelConfig, config_from_dict
from megatron_msg.growth.plan import (activation_bytes, flops_per_token, largest_rank_parameters,
                                      layer_activation_bytes, plan_schedule, state_bytes,
                                      final_shape_flops)
from megatron_msg.model.init import logical_num_parameters, logical_shapes
from megatron_msg.model.layout import tensor_spec


@pytest.mark.parametrize("h,layers,seq,vocab", [(64, 2, 32, 256), (768, 12, 1024, 50257)])
def test_gpt_flops_per_token_is_megatrons_closed_form(h, layers, seq, vocab):
    # Narayanan et al. 2021, eq. 3 per token: 72 L h^2 (1 + s/(6h) + V/(12 h L)), for ffn = 4h,
    # heads x head_dim = h and a tied LM head.
    cfg = ModelConfig(arch="gpt", hidden=h, ffn=4 * h, heads=h // 64 or 1, layers=layers, head_dim=min(h, 64),
                      seq_len=seq, vocab_size=vocab, tie_embeddings=True)
    assert cfg.heads * cfg.head_dim == h
    assert flops_per_token(cfg) == 72 * layers * h * h + 12 * layers * seq * h + 6 * vocab * h


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_largest_rank_share_follows_the_tp_layout_rule(arch):
    cfg = ModelConfig(arch=arch, hidden=16, ffn=32, heads=2, layers=2, head_dim=8, seq_len=16, vocab_size=261)
    assert largest_rank_parameters(cfg, 1, 1) == logical_num_parameters(cfg)
    # TP2: split tensors halve (vocab blocks of ceil(261/2) rows), the rest is replicated.
    expected = 0
    for name, shape in logical_shapes(cfg).items():
        spec = tensor_spec(name)
        if spec.is_mask:
            continue
        dim, n = spec.tp_split_dim(), math.prod(shape)
        if dim is None:
            expected += n
        elif spec.vocab_dim is not None:
            expected += n // shape[dim] * math.ceil(shape[dim] / 2)
        else:
            expected += n // 2
    assert largest_rank_parameters(cfg, 2, 1) == expected


def test_state_bytes_partition_only_the_moments_under_zero():
    assert state_bytes(1000, dp=4, zero_stage=0) == 16 * 1000
    assert state_bytes(1000, dp=4, zero_stage=1) == 8 * 1000 + 2000
    assert state_bytes(1000, dp=4, zero_stage=2) == state_bytes(1000, dp=4, zero_stage=1)
    # 16-bit parameters: 2-byte weights, fp32 gradients, fp32 master + moments (split under ZeRO)
    assert state_bytes(1000, dp=4, zero_stage=0, params_bytes=2) == (2 + 4 + 12) * 1000
    assert state_bytes(1000, dp=4, zero_stage=1, params_bytes=2) == (2 + 4) * 1000 + 3000


def test_layer_activations_follow_korthikanti_et_al():
    # GPT-3-like layer (inner = h, ffn = 4h), 16-bit: 34 sbh bytes; TP without SP leaves the
    # 10 sbh of the residual-stream side on every rank (sbh (10 + 24/t)); SP splits it all.
    cfg = ModelConfig(hidden=1024, ffn=4096, heads=16, head_dim=64, seq_len=2048)
    sbh = 2048 * 4 * 1024
    assert layer_activation_bytes(cfg, 4, 1, False) == 34 * sbh
    assert layer_activation_bytes(cfg, 4, 4, False) == (10 + 24 // 4) * sbh
    assert layer_activation_bytes(cfg, 4, 4, True) == 34 * sbh // 4
    assert layer_activation_bytes(cfg, 4, 1, False, act_bytes=4) == 68 * sbh


def test_first_stage_activations_under_1f1b_and_recomputation():
    cfg = ModelConfig(hidden=1024, ffn=4096, heads=16, head_dim=64, seq_len=2048, layers=8)
    layer, layer_input = layer_activation_bytes(cfg, 1, 2, True), 2048 * 1024 // 2 * 2
    # pp 4: 2 layers a stage, min(4, micro-batches) micro-batches in flight on the first stage
    assert activation_bytes(cfg, 1, 16, 2, 4, True) == 4 * 2 * layer
    assert activation_bytes(cfg, 1, 3, 2, 4, True) == 3 * 2 * layer
    assert activation_bytes(cfg, 1, 16, 2, 4, True, "full") == 4 * 2 * layer_input + layer
    assert activation_bytes(cfg, 1, 16, 2, 4, True, "full", 1) == 4 * (layer_input + layer) + layer


def test_first_stage_activations_under_interleaved_1f1b():
    # pp 4 x 2 virtual, 8 layers: 1-layer chunks; the first stage holds 2 (p - 1) + (v - 1) p + 1
    # = 11 chunk-forwards at its peak (Megatron: 1 + (p - 1) / (p v) = 1.375x plain 1F1B's 4 x 2).
    cfg = ModelConfig(hidden=1024, ffn=4096, heads=16, head_dim=64, seq_len=2048, layers=8)
    layer = layer_activation_bytes(cfg, 1, 2, True)
    assert activation_bytes(cfg, 1, 16, 2, 4, True, virtual=2) == 11 * layer
    assert activation_bytes(cfg, 1, 16, 2, 4, True, virtual=2) / activation_bytes(cfg, 1, 16, 2, 4, True) == 1.375
    assert activation_bytes(cfg, 1, 16, 2, 1, True, virtual=2) == activation_bytes(cfg, 1, 16, 2, 1, True)


def test_layer_activation_estimate_matches_what_autograd_saves():
    # fp32 on CPU (fused attention kernel, no s^2 matrices), no dropout: the estimate, which also
    # counts dropout masks, lands within 30% of the bytes the layers really save (measured: 0.84).
    import torch
    from megatron_msg.model import build_model
    cfg = ModelConfig(hidden=64, ffn=256, heads=4, head_dim=16, layers=2, seq_len=128)
    model = build_model(cfg, seed=0)
    x = torch.randn(2, 128, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        model.run_layers(x, None)
    estimate = 2 * layer_activation_bytes(cfg, 2, 1, False, act_bytes=4)
    assert 0.7 < estimate / sum(saved) < 1.3, (estimate, sum(saved))


def _raw(stages):
    return {"model": {"arch": "gpt", "hidden": 16, "ffn": 32, "heads": 2, "layers": 2, "head_dim": 8, "seq_len": 16},
            "lr": {"warmup_steps": 1},
            "train": {"steps": 100, "batch_size": 2, "grad_accum": 2},
            "growth": {"defaults": {"phi": 5}, "stages": stages}}


def test_schedule_plan_covers_every_step_and_saves_compute():
    cfg = config_from_dict(_raw([{"at_step": 40, "hidden": 32}, {"at_step": 70, "layers": 4, "dp": 1}]))
    plans = plan_schedule(cfg)
    assert [(p.first_step, p.last_step) for p in plans] == [(0, 40), (40, 70), (70, 100)]
    assert sum(p.tokens for p in plans) == 100 * 2 * 2 * 16
    assert plans[-1].parameters == logical_num_parameters(cfg.model.with_shape(cfg.resolved_stages()[-1].shape))
    assert all(p.flops == p.flops_per_token * p.tokens for p in plans)
    assert sum(p.flops for p in plans) < final_shape_flops(cfg, plans)
    flat = config_from_dict(_raw([]))
    flat_plans = plan_schedule(flat)
    assert len(flat_plans) == 1 and flat_plans[0].flops == final_shape_flops(flat, flat_plans)


def test_msg_plan_cli(tmp_path, capsys):
    assert msg_plan([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| stage | steps | shape |") and "less compute" in out
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(_raw([{"at_step": 50, "ffn": 64}])))
    assert msg_plan([str(path), "--json", "--set", "parallel.zero_stage=1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in data["stages"]] == ["start", "stage 0"]
    assert data["total_flops"] == sum(s["flops"] for s in data["stages"])
    assert msg_plan([str(path), "--set", "parallel.zero_stage=5"]) == 2
    assert "parallel.zero_stage: must be 0, 1 or 2" in capsys.readouterr().err


def test_hardware_fit_adds_the_parts_and_the_reserve_and_names_the_largest():
    from megatron_msg.growth.hardware import ACCELERATORS, GIB, RESERVE_BYTES, fit, timing
    from megatron_msg.growth.plan import StagePlan
    plan = StagePlan(name="s", first_step=0, last_step=10, shape="-", operator=None, layout=(2, 2, 4),
                     parameters=0, flops_per_token=0, tokens=0, flops=int(16 * 312e12 * 0.5 * 3600),
                     rank_parameters=0, rank_bytes=0, activation_bytes=31 * GIB, weight_bytes=10 * GIB,
                     gradient_bytes=20 * GIB, optimizer_bytes=15 * GIB, logits_bytes=GIB)
    a100, h200 = ACCELERATORS["a100"], ACCELERATORS["h200"]
    assert fit(plan, h200).fits and fit(plan, h200).total_bytes == 77 * GIB + RESERVE_BYTES
    over = fit(plan, a100)
    assert not over.fits and over.describe() == "NO: 1.0 GiB over; largest part: activations 31.0 GiB"
    # FLOPs / (16 GPUs x 312 TFLOP/s x 50%) = one hour; 16 GPU-hours at $3
    t = timing(plan, a100, 0.5, 3.0)
    assert t.seconds == pytest.approx(3600) and t.gpu_hours == pytest.approx(16) and t.cost == pytest.approx(48)


def test_msg_plan_prints_fit_time_and_cost_and_refuses_a_bad_mfu(capsys):
    assert msg_plan(["--mfu", "0.5", "--gpu", "h100", "--usd-per-gpu-hour", "3"]) == 0
    out = capsys.readouterr().out
    assert "fits A100/A800 80GB" in out and "time on H100 SXM 80GB at 50% MFU" in out and "$3.00 per GPU-hour" in out
    assert msg_plan(["--mfu", "1.5"]) == 2
    assert "--mfu must be in (0, 1]" in capsys.readouterr().err
    assert msg_plan(["--json"]) == 0
    stage = json.loads(capsys.readouterr().out)["stages"][0]
    assert set(stage["memory_bytes"]) == {"weights", "gradients", "optimizer", "activations", "logits"}
    assert stage["fits"]["a100"]["fits"] and stage["seconds"] > 0
