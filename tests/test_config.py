"""Config loading: overrides, bundled configs, and a clear error for every bad schedule."""
from pathlib import Path

import pytest

from megatron_msg.cli.config_args import CONFIG_DIR
from megatron_msg.config import ConfigError, Shape, config_from_dict, load_config


def cfg_with_stages(stages, **sections):
    raw = {"model": {"hidden": 32, "ffn": 64, "heads": 2, "layers": 2}, "train": {"steps": 1000},
           "growth": {"defaults": {"phi": 50}, "stages": stages}}
    raw.update(sections)
    return config_from_dict(raw)


def test_stages_inherit_previous_shape_and_defaults():
    cfg = cfg_with_stages([{"at_step": 100, "ffn": 128}, {"at_step": 200, "layers": 4, "operator": "nomask"}])
    s0, s1 = cfg.resolved_stages()
    assert s0.shape == Shape(32, 128, 2, 2) and s0.operator == "msg" and s0.phi == 50
    assert s1.shape == Shape(32, 128, 2, 4) and s1.operator == "nomask"


@pytest.mark.parametrize("stages,field,words", [
    ([{"at_step": 100, "hidden": 16}], "growth.stages[0].hidden", "shrinks"),
    ([{"at_step": 200, "ffn": 128}, {"at_step": 100, "layers": 4}], "growth.stages[1].at_step", "in order"),
    ([{"at_step": 100, "ffn": 128}, {"at_step": 120, "layers": 4}], "growth.stages[1].at_step", "inside stage 0's mask ramp"),
    ([{"at_step": 100}], "growth.stages[0]", "does not grow"),
    ([{"at_step": 100, "heads": 0}], "growth.stages[0].heads", "shrinks"),
    ([{"at_step": 5000, "ffn": 128}], "growth.stages[0].at_step", "train.steps"),
    ([{"at_step": 0, "ffn": 128}], "growth.stages[0].at_step", ">= 1"),
    ([{"at_step": 100, "ffn": 128, "operator": "grow"}], "growth.stages[0].operator", "not one of"),
    ([{"at_step": 100, "ffn": 128, "init": "xavier"}], "growth.stages[0].init", "not one of"),
    ([{"at_step": 100, "ffn": 128, "phi": 0}], "growth.stages[0].phi", ">= 1"),
    ([{"at_step": 100, "ffn": 128, "operator": "stack"}], "growth.stages[0].operator", "depth only"),
    ([{"at_step": 100, "layers": 3, "operator": "stack"}], "growth.stages[0].layers", "multiple"),
    ([{"at_step": 100, "ffn": 128, "wat": 1}], "growth.stages[0].wat", "unknown field"),
    ([{"ffn": 128}], "growth.stages[0].at_step", "required"),
    ([{"at_step": "soon", "ffn": 128}], "growth.stages[0].at_step", "integer"),
])
def test_bad_schedules_name_the_stage_and_field(stages, field, words):
    with pytest.raises(ConfigError) as exc:
        cfg_with_stages(stages)
    assert str(exc.value).startswith(field), str(exc.value)
    assert words in str(exc.value)


def test_non_overlapping_ramp_and_nomask_back_to_back_are_accepted():
    cfg_with_stages([{"at_step": 100, "ffn": 128}, {"at_step": 150, "layers": 4}])
    cfg_with_stages([{"at_step": 100, "ffn": 128, "operator": "nomask"}, {"at_step": 101, "layers": 4}])


@pytest.mark.parametrize("raw,field", [
    ({"model": {"arch": "t5"}}, "model.arch"),
    ({"model": {"hidden": 0}}, "model.hidden"),
    ({"model": {"dropout": 1.5}}, "model.dropout"),
    ({"model": {"vocab_size": 100}}, "model.vocab_size"),
    ({"optimizer": {"min_lr": 1.0}}, "optimizer.min_lr"),
    ({"optimizer": {"growth_step_rule": "magic"}}, "optimizer.growth_step_rule"),
    ({"lr": {"warmup_steps": 5000}}, "lr.warmup_steps"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"loss_scale_window": 0}}, "train.loss_scale_window"),
    ({"train": {"min_loss_scale": 2.0 ** 20}}, "train.min_loss_scale"),
    ({"train": {"min_loss_scale": 0.0}}, "train.min_loss_scale"),
    ({"modle": {}}, "modle"),
    ({"train": {"steps": True}}, "train.steps"),
])
def test_bad_fields_are_named(raw, field):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    assert str(exc.value).startswith(field), str(exc.value)


def test_overrides_and_file_errors(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {hidden: 32, ffn: 64, heads: 2, layers: 2}\n"
                 "growth: {stages: [{at_step: 100, ffn: 128, phi: 10}]}\n")
    cfg = load_config(p, ["optimizer.lr=3e-4", "growth.stages[0].phi=20", "train.steps=500"])
    assert cfg.optimizer.lr == 3e-4 and cfg.resolved_stages()[0].phi == 20 and cfg.train.steps == 500
    with pytest.raises(ConfigError, match="stages\\[3\\] does not exist"):
        load_config(p, ["growth.stages[3].phi=20"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(p, ["optimizer.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_bundled_config_validates(path):
    cfg = load_config(path)
    assert cfg.train.steps > 0
