"""A growth event may also move the run to another TP x PP x DP layout (same world size).

FLM-101B grew 16B on TP2/PP1/DP96 -> 51B on TP4/PP2/DP24 -> 101B on TP4/PP4/DP12: more model
parallelism as the model grows, fewer data-parallel replicas.  Here, with 4 processes:
DP4 -> TP2 x DP2 (growing hidden and ffn) -> TP2 x PP2 (growing depth and heads).  Because a
growth is gather -> grow -> shard, re-sharding onto a new layout is the same operation.
"""
from __future__ import annotations


import pytest

from megatron_msg.config import ConfigError, Shape, config_from_dict
from megatron_msg.training.trainer import Trainer
from tests.dist_harness import run_distributed
from tests.test_parallel_training import _max_rel_diff, _records, _train


def _raw(**parallel) -> dict:
    return {
        "model": {"arch": "gpt", "hidden": 16, "ffn": 32, "heads": 2, "layers": 2, "head_dim": 8, "seq_len": 16},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
        "lr": {"warmup_steps": 5},
        "train": {"steps": 60, "batch_size": 2, "grad_accum": 4, "log_interval": 1, "eval_interval": 30,
                  "eval_iters": 3, "save_interval": 30, "device": "cpu", "tensorboard": False, "plot": False},
        "growth": {"defaults": {"phi": 8}, "stages": [
            {"at_step": 20, "hidden": 24, "ffn": 48, "tp": 2, "dp": 2},
            {"at_step": 40, "layers": 4, "heads": 4, "pp": 2, "dp": 1},
        ]},
        "parallel": parallel,
    }


def test_growth_moves_the_run_to_a_new_layout(tmp_path):
    par = run_distributed(_train, 4, args=(_raw(dp=4), tmp_path / "par", None))
    single_raw = _raw(growth_layout_parts=2)
    for st in single_raw["growth"]["stages"]:
        for key in ("tp", "pp", "dp"):
            st.pop(key, None)
    single = Trainer(config_from_dict(single_raw), out_dir=tmp_path / "one", progress=False).run()
    assert par[0]["shape"] == Shape(24, 48, 4, 4)
    growth = [r for r in _records(tmp_path / "par") if r["kind"] == "growth"]
    assert [g["layout"] for g in growth] == ["tp2 x pp1 x dp2", "tp2 x pp2 x dp1"]
    for g in growth:
        assert abs(g["loss_after"] - g["loss_before"]) <= 1e-5 * abs(g["loss_before"]), g
    assert _max_rel_diff(par[0]["losses"], single.losses) < 1e-3
    # 3 eval batches over DP2 at step 30 (shares of 1 and 2) and DP1 at 60: the same loss as one process
    assert sorted(par[0]["valid"]) == [-1, 29, 59]  # keyed by the 0-based step just trained (-1: before any)
    assert _max_rel_diff(par[0]["valid"], single.valid_losses) < 1e-3


def test_resume_after_a_layout_change(tmp_path):
    first = run_distributed(_train, 4, args=(_raw(dp=4), tmp_path, 45))
    assert first[0]["final_step"] == 45
    resumed = run_distributed(_train, 4, args=(_raw(dp=4), tmp_path, None))
    ref = run_distributed(_train, 4, args=(_raw(dp=4), tmp_path / "ref", None))
    for step in range(45, 60):
        assert resumed[0]["losses"][step] == ref[0]["losses"][step], step


@pytest.mark.parametrize("stage,message", [
    ({"at_step": 20, "ffn": 48, "tp": 2}, "growth.stages[0]: layout tp2 x pp1 x dp4 needs 8 processes, the run has 4"),
    ({"at_step": 20, "ffn": 48, "heads": 3, "tp": 2, "dp": 2},
     "growth.stages[0].heads: 3 is not divisible by tp=2 (layout tp2 x pp1 x dp2)"),
])
def test_bad_layout_change_is_a_config_error(stage, message):
    raw = _raw(dp=4)
    raw["growth"]["stages"] = [stage]
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert str(err.value).startswith(message), str(err.value)
