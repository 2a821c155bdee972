"""Config loading: overrides, bundled configs, and a clear error for every bad schedule."""
from pathlib import Path

import numpy as np

import pytest

from megatron_msg.cli.config_args import CONFIG_DIR
from megatron_msg.config import ConfigError, Shape, config_from_dict, data_prefixes, load_config


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


# --------------------------------------------------------------------------- base:, strict YAML, data.paths

def test_a_config_extends_its_base_and_a_list_of_bases_merges_in_order(tmp_path):
    (tmp_path / "cluster.yaml").write_text("parallel: {dp: 2}\ntrain: {batch_size: 4, grad_accum: 2}\n")
    (tmp_path / "run.yaml").write_text("base: [demo_tiny_gpt, cluster.yaml]\ntrain: {out_dir: runs/x}\n")
    cfg = load_config(tmp_path / "run.yaml")
    demo = load_config(CONFIG_DIR / "demo_tiny_gpt.yaml")
    assert cfg.model == demo.model and cfg.growth == demo.growth  # from the bundled base
    assert (cfg.parallel.dp, cfg.train.batch_size, cfg.train.grad_accum) == (2, 4, 2)  # from cluster.yaml
    assert cfg.train.out_dir == "runs/x" and cfg.train.steps == demo.train.steps  # merged key by key


@pytest.mark.parametrize("files,words", [
    ({"run.yaml": "base: nowhere.yaml\n"}, "base: no config 'nowhere.yaml'"),
    ({"run.yaml": "base: run.yaml\n"}, "extends itself"),
    ({"run.yaml": "base: a.yaml\n", "a.yaml": "base: run.yaml\n"}, "extends itself"),
    ({"run.yaml": "base: {x: 1}\n"}, "expected the name or path of a config"),
    ({"run.yaml": "train:\n  steps: 10\n  steps: 20\n"}, "line 3: duplicate key 'steps' (first on line 2)"),
])
def test_bad_bases_and_duplicate_keys_are_named_errors(tmp_path, files, words):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "run.yaml")
    assert words in str(exc.value) and str(exc.value).startswith(str(tmp_path))  # names the file


def test_a_set_value_that_is_not_yaml_is_a_named_error():
    with pytest.raises(ConfigError, match=r"--set train.steps: the value '\[1, 2' is not valid YAML"):
        load_config(None, ["train.steps=[1, 2"])


@pytest.fixture()
def two_corpora(tmp_path):
    from megatron_msg.data import PreprocessConfig, preprocess_jsonl
    from megatron_msg.training.batches import BUNDLED_CORPUS
    lines = BUNDLED_CORPUS.read_text().splitlines()
    prefixes = []
    for name, part in (("web", lines[::2]), ("books", lines[1::2])):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(part) + "\n")
        prefixes.append(preprocess_jsonl(PreprocessConfig(inputs=[str(tmp_path / f"{name}.jsonl")],
                                                          output_prefix=str(tmp_path / name), progress=False)).prefix)
    return prefixes


def test_data_paths_blend_corpora_by_weight_megatron_style(two_corpora):
    from megatron_msg.data.blended_dataset import BlendedDataset
    from megatron_msg.training.trainer import build_batches
    web, books = two_corpora
    cfg = load_config(None, ["data.format=indexed", f"data.paths=[0.7, {web}, 0.3, {books}]",
                             "data.splits='90,10,0'", "train.steps=500", "train.batch_size=8"])
    assert [w for _, w in data_prefixes(cfg.data)] == [0.7, 0.3]
    train, _ = build_batches(cfg)
    assert isinstance(train.dataset, BlendedDataset)
    share = np.bincount(train.dataset.dataset_index[:400], minlength=2) / 400
    assert abs(share[0] - 0.7) < 0.01 and abs(share[1] - 0.3) < 0.01
    # prefixes alone: equal weights
    cfg = load_config(None, ["data.format=indexed", f"data.paths=[{web}, {books}]", "data.splits='90,10,0'"])
    assert [w for _, w in data_prefixes(cfg.data)] == [1.0, 1.0]


@pytest.mark.parametrize("overrides,field,words", [
    (["data.paths=[0.7, a]"], "data.paths", "needs data.format: indexed"),
    (["data.format=indexed", "data.paths=[0.7, a, b]"], "data.paths", "cannot parse"),
    (["data.format=indexed", "data.paths=[0.0, a, 1.0, b]"], "data.paths", "weight 0.0 of 'a' must be > 0"),
    (["data.format=indexed", "data.path=x", "data.paths=[a]"], "data.paths", "not both"),
    (["data.format=indexed", "data.paths=[1.0, /nonexistent/corpus]"], "data.paths", "no indexed dataset"),
])
def test_bad_data_paths_are_named(overrides, field, words):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert str(exc.value).startswith(field) and words in str(exc.value), str(exc.value)
