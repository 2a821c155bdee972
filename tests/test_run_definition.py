"""A resume refuses a config that describes another run than the checkpoint's (training/run_definition.py)."""
import copy
import json

import pytest

from megatron_msg.checkpoint.errors import CheckpointError
from megatron_msg.cli.train import main as msg_train
from megatron_msg.config import config_from_dict
from megatron_msg.training.trainer import Trainer

RAW = {"model": {"arch": "gpt", "hidden": 16, "ffn": 32, "heads": 2, "layers": 2, "head_dim": 8, "seq_len": 16},
       "lr": {"warmup_steps": 2},
       "growth": {"defaults": {"phi": 2}, "stages": [{"at_step": 3, "ffn": 48}, {"at_step": 8, "layers": 3}]},
       "train": {"steps": 10, "batch_size": 2, "grad_accum": 1, "log_interval": 1, "eval_interval": 100,
                 "eval_iters": 1, "save_interval": 5, "device": "cpu", "tensorboard": False, "plot": False}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run stopped at step 6: the first growth applied, the second still to come."""
    out = tmp_path_factory.mktemp("run")
    Trainer(config_from_dict(RAW), out_dir=out, progress=False).run(max_steps=6)
    return out


def _edited(**changes) -> dict:
    raw = copy.deepcopy(RAW)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = raw
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(leaf) if leaf.isdigit() else leaf] = value
    return raw


@pytest.mark.parametrize("edit, named", [
    ({"model__head_dim": 4}, "model.head_dim: checkpoint 8, config 4"),
    ({"model__activation": "relu"}, "model.activation: checkpoint 'gelu', config 'relu'"),
    ({"model__vocab_size": 300}, "model.vocab_size: checkpoint 261, config 300"),
    ({"model__position_embedding": "rope"}, "model.position_embedding"),
    ({"model__tie_embeddings": False}, "model.tie_embeddings"),
    ({"growth__stages__0__init": "zeros"}, "growth.stages[0].init"),
    ({"growth__stages__0__at_step": 2}, "growth.stages[0].at_step: checkpoint 3, config 2"),
    ({"growth__stages__1__at_step": 5}, "growth.stages[1].at_step: 5 is before the checkpoint's step 6"),
])
def test_a_resume_with_another_run_definition_is_refused_by_name(run_dir, edit, named, tmp_path):
    # (before: each of these trained the checkpoint's model under a config describing another,
    # and a stage moved before the checkpoint's step was silently never applied)
    with pytest.raises(CheckpointError, match="describes another run") as err:
        Trainer(config_from_dict(_edited(**edit)), out_dir=run_dir, progress=False)
    assert named in str(err.value)


def test_the_same_config_resumes_and_a_listed_change_is_allowed(run_dir, tmp_path):
    Trainer(config_from_dict(RAW), out_dir=run_dir, progress=False)  # no complaint
    raw = _edited(model__dropout=0.1)
    with pytest.raises(CheckpointError, match="model.dropout: checkpoint 0.0, config 0.1"):
        Trainer(config_from_dict(raw), out_dir=run_dir, progress=False)
    raw["train"]["resume_may_change"] = ["model.dropout"]
    Trainer(config_from_dict(raw), out_dir=run_dir, progress=False)
    raw = _edited(growth__stages__0__phi=3)
    raw["train"]["resume_may_change"] = ["growth.stages[0]"]  # a whole stage's fields
    Trainer(config_from_dict(raw), out_dir=run_dir, progress=False)


def test_msg_train_refuses_it_in_one_line_with_exit_2(run_dir, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps(_edited(model__activation="relu")))
    assert msg_train([str(cfg), "--out-dir", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.activation" in err[0]
