"""examples/: every recipe's configs load, validate and plan; the paper's schedules are transcribed
as printed; the FLM-101B plan has the public parameter counts and fits its GPUs; and a CPU
rehearsal of every recipe runs end to end through the recipe's own launch script.

The rehearsals are scaled-down copies (rehearsal.yaml in each folder: same schedule shape and
stage order, the same kind of topology changes on at most 4 processes, tiny widths, few steps),
started with the deepspeed launcher on local processes (DS_ACCELERATOR=cpu, gloo).  After every
growth the probe loss equals the probe loss before it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_msg.cli.plan import main as msg_plan
from megatron_msg.config import BUNDLED_CONFIGS, Shape, load_config
from megatron_msg.growth.hardware import ACCELERATORS, fit, timing
from megatron_msg.growth.plan import plan_schedule

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
RECIPES = ["tiny_demo", "bert_base", "bert_large", "gpt2", "flm101b"]
EXAMPLE_CONFIGS = sorted(EXAMPLES.rglob("*.yaml"))


def test_every_recipe_folder_has_its_configs_readme_launch_scripts_and_rehearsal():
    for recipe in RECIPES:
        folder = EXAMPLES / recipe
        for name in ("README.md", "launch_deepspeed.sh", "launch_torchrun.sh", "launch_slurm.sbatch", "rehearsal.yaml"):
            assert (folder / name).is_file(), f"{folder}/{name}"
        assert list(folder.glob("*.yaml")) != [folder / "rehearsal.yaml"]
    scripts = sorted(EXAMPLES.rglob("*.sh")) + sorted(EXAMPLES.rglob("*.sbatch"))
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_example_config_loads_validates_and_plans(path, capsys):
    cfg = load_config(path, check_files=False)  # the data is the user's to prepare
    assert cfg.train.steps > 0
    assert msg_plan([str(path)]) == 0
    assert "total" in capsys.readouterr().out


# The paper's global batch (samples per step) in each recipe, however the recipe splits it.
PAPER_BATCH = {"bert_base": 256, "bert_large": 256, "gpt2/sch1_g": 140, "gpt2/full": 140, "gpt2/sch_new": 480,
               "gpt2/new_full": 480}


@pytest.mark.parametrize("path", [p for p in EXAMPLE_CONFIGS if p.stem not in ("rehearsal", "cluster")
                                  and p.parent.name in ("bert_base", "bert_large", "gpt2")],
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipes_keep_the_papers_global_batch_and_schedule(path):
    cfg = load_config(path, check_files=False)
    key = f"{path.parent.name}/{path.stem}" if path.parent.name == "gpt2" else path.parent.name
    assert cfg.train.batch_size * cfg.train.grad_accum == PAPER_BATCH[key]
    assert cfg.train.grad_accum % cfg.parallel.dp == 0
    paper_name = yaml.safe_load(path.read_text())["base"][0]  # base: [paper/<schedule>, cluster.yaml]
    paper = load_config(BUNDLED_CONFIGS / f"{paper_name}.yaml")
    assert cfg.resolved_stages() == [dataclasses.replace(s, batch_size=cfg.train.batch_size,
                                                         grad_accum=cfg.train.grad_accum, layout=cfg.parallel.layout)
                                     for s in paper.resolved_stages()]
    assert (cfg.optimizer, cfg.lr, cfg.train.steps, cfg.model) == (paper.optimizer, paper.lr, paper.train.steps,
                                                                   paper.model)


# ../shared/paper_schedules.md: (start shape, [(at_step, shape), ...], total steps).  Tables 2, 8, 10.
PAPER_TABLES = {
    "bert_base_sch1": ((512, 768, 8, 3), [(200_000, (512, 3072, 8, 3)), (400_000, (512, 3072, 8, 6)),
                                          (500_000, (768, 3072, 8, 6)), (600_000, (768, 3072, 12, 6)),
                                          (700_000, (768, 3072, 12, 12))], 900_000),
    "bert_large_sch1": ((768, 1024, 12, 6), [(200_000, (768, 4096, 12, 6)), (400_000, (768, 4096, 12, 12)),
                                             (500_000, (1024, 4096, 12, 12)), (600_000, (1024, 4096, 16, 12)),
                                             (700_000, (1024, 4096, 16, 24))], 900_000),
    "gpt2_sch1": ((512, 768, 8, 3), [(50_000, (512, 3072, 8, 3)), (100_000, (512, 3072, 8, 6)),
                                     (130_000, (768, 3072, 8, 6)), (160_000, (768, 3072, 12, 6)),
                                     (190_000, (768, 3072, 12, 12))], 240_000),
    "bert_large_rapid": ((512, 1024, 8, 6), [(400_000, (512, 4096, 8, 6)), (420_000, (1024, 4096, 8, 6)),
                                             (440_000, (1024, 4096, 16, 6)), (500_000, (1024, 4096, 16, 24))],
                         800_000),
    "bert_large_sch0": ((768, 1024, 16, 6), [(200_000, (768, 4096, 16, 6)), (400_000, (768, 4096, 16, 12)),
                                             (600_000, (768, 4096, 16, 24))], 900_000),
    "bert_base_sch0": ((768, 768, 12, 3), [(200_000, (768, 768, 12, 6)), (400_000, (768, 768, 12, 9)),
                                           (600_000, (768, 768, 12, 12)), (700_000, (768, 3072, 12, 12))], 900_000),
    "gpt2_sch_new": ((512, 768, 8, 12), [(30_000, (768, 768, 8, 12)), (60_000, (768, 768, 12, 12)),
                                         (80_000, (768, 3072, 12, 12))], 100_000),
}
# Appendix D / J: (lr, warm-up, batch, sequence, clip) of each schedule's settings.
PAPER_SETTINGS = {"bert_base": (1e-4, 10_000, 256, 128, 0.0), "bert_large": (1e-5, 30_000, 256, 128, 1.0),
                  "gpt2": (1e-4, 2_400, 140, 1024, 1.0), "gpt2_sch_new": (1e-4, 1_000, 480, 1024, 1.0)}


@pytest.mark.parametrize("name", sorted(PAPER_TABLES))
def test_paper_schedules_are_transcribed_as_printed(name):
    cfg = load_config(BUNDLED_CONFIGS / "paper" / f"{name}.yaml")
    start, stages, steps = PAPER_TABLES[name]
    assert cfg.model.shape == Shape(*start) and cfg.train.steps == steps and cfg.model.head_dim == 64
    resolved = cfg.resolved_stages()
    assert [(s.at_step, tuple(s.shape.__dict__.values())) for s in resolved] == stages
    # One dimension per stage (Sch1/Sch0/Rapid/New), phi 5000, LR reset at the 1st and 2nd growth,
    # new width N(0, 0.02), new layers stacked copies.
    assert all(len(s.shape.grows_from(p)) == 1 for s, p in zip(resolved, [cfg.model.shape] + [r.shape for r in resolved]))
    assert [s.rewind_lr for s in resolved] == [True, True] + [False] * (len(resolved) - 2)
    assert {(s.operator, s.phi, s.init, s.init_std, s.depth_placement, s.depth_init) for s in resolved} == \
        {("msg", 5000, "normal", 0.02, "top", "copy")}
    key = name if name == "gpt2_sch_new" else name.rsplit("_", 1)[0]
    assert (cfg.optimizer.lr, cfg.lr.warmup_steps, cfg.train.batch_size * cfg.train.grad_accum, cfg.model.seq_len,
            cfg.optimizer.grad_clip) == PAPER_SETTINGS[key]
    assert cfg.lr.decay == "linear"


def test_full_size_baselines_are_appendix_ds():
    for name, shape, steps in (("bert_base_full", (768, 3072, 12, 12), 1_000_000),
                               ("bert_large_full", (1024, 4096, 16, 24), 1_000_000),
                               ("gpt2_full", (768, 3072, 12, 12), 240_000), ("gpt2_new_full", (768, 3072, 12, 12), 100_000)):
        cfg = load_config(BUNDLED_CONFIGS / "paper" / f"{name}.yaml")
        assert cfg.model.shape == Shape(*shape) and cfg.train.steps == steps and not cfg.growth.stages


# --------------------------------------------------------------------------- FLM-101B

FLM = EXAMPLES / "flm101b" / "flm101b.yaml"


def test_flm101b_plan_has_the_public_sizes_tokens_and_layouts_and_fits_80gb_gpus():
    cfg = load_config(FLM, check_files=False)
    plans = plan_schedule(cfg)
    assert [p.layout for p in plans] == [(2, 1, 96), (4, 2, 24), (4, 4, 12)]
    for plan, billions in zip(plans, (16, 51, 101)):
        assert abs(plan.parameters / 1e9 - billions) / billions < 0.02, (plan.name, plan.parameters)
    for plan, tokens in zip(plans, (245.37e9, 39.64e9, 26.54e9)):
        assert abs(plan.tokens - tokens) / tokens < 1e-4, (plan.name, plan.tokens)
    assert [round(p.global_batch * cfg.model.seq_len / 1e6, 2) for p in plans] == [4.72, 4.72, 4.30]
    assert cfg.model.shape == Shape(5632, 22528, 44, 40) and plans[-1].shape == str(Shape(10240, 40960, 80, 80))
    assert cfg.model.head_dim == 128 and cfg.model.vocab_size == 100256 and cfg.model.seq_len == 2048
    stages = cfg.resolved_stages()
    assert [(s.lr, s.warmup_steps) for s in stages] == [(3.4e-4, 100), (2e-4, 110)]
    assert (cfg.optimizer.lr, cfg.lr.warmup_steps) == (4e-4, 2000)
    for plan in plans:  # every stage fits an A800/H100 (80 GB) and an H200 (141 GB), with the reserve
        assert fit(plan, ACCELERATORS["a100"]).fits and fit(plan, ACCELERATORS["h200"]).fits, plan.memory_bytes
    # The whole schedule at FLM-101B's reported ~52% MFU on 192 A800s: within 10% of its 21.54 days.
    days = sum(timing(p, ACCELERATORS["a100"], 0.52, 1.0).seconds for p in plans) / 86400
    assert abs(days - 21.54) / 21.54 < 0.10, days


def test_a_stage_that_does_not_fit_names_its_largest_part():
    cfg = load_config(FLM, ["parallel.zero_stage=0", "growth.stages[1].tp=1", "growth.stages[1].pp=16",
                            "growth.stages[1].dp=12", "growth.stages[1].layers=96"], check_files=False)
    last = plan_schedule(cfg)[-1]
    verdict = fit(last, ACCELERATORS["a100"])
    assert not verdict.fits and verdict.describe().startswith("NO: ") and "largest part: optimizer" in verdict.describe()


# --------------------------------------------------------------------------- CPU rehearsals

CPU_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "GPUS_PER_NODE": "4"}


def _free_port() -> str:
    from tests.dist_harness import free_port
    return str(free_port())


def _run(cmd, env, timeout=600):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **CPU_ENV, "MASTER_PORT": _free_port(), **env}, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _assert_growths_preserve_the_probe_loss(run_dir: Path, expected: int) -> list[dict]:
    growth = _records(run_dir, "growth")
    assert len(growth) == expected
    for g in growth:
        assert abs(g["loss_after"] - g["loss_before"]) < 1e-5, g
    return growth


@pytest.fixture(scope="module")
def rehearsal_data(tmp_path_factory):
    """Each recipe's data, prepared by its own prepare_data.sh from the bundled corpus (tiny tokenizers)."""
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")
    out = tmp_path_factory.mktemp("rehearsal_data")
    from megatron_msg.training.batches import BUNDLED_CORPUS
    lines = BUNDLED_CORPUS.read_text().splitlines()
    (out / "web.jsonl").write_text("\n".join(lines[::2]) + "\n")
    (out / "books.jsonl").write_text("\n".join(lines[1::2]) + "\n")
    env = {"VOCAB_SIZE": "500", "WORKERS": "1"}
    _run(["examples/bert_base/prepare_data.sh"], {**env, "INPUTS": str(BUNDLED_CORPUS), "OUT_DIR": str(out / "bert")})
    _run(["examples/gpt2/prepare_data.sh"], {**env, "INPUTS": str(BUNDLED_CORPUS), "OUT_DIR": str(out / "gpt2")})
    _run(["examples/flm101b/prepare_data.sh"], {**env, "INPUTS": f"{out}/web.jsonl {out}/books.jsonl",
                                                "OUT_DIR": str(out / "flm")})
    return {
        "bert_base": {"DATA_PATHS": f"{out}/bert/bert_text_sentence", "TOKENIZER": f"{out}/bert/bert-tokenizer.json"},
        "bert_large": {"DATA_PATHS": f"{out}/bert/bert_text_sentence", "TOKENIZER": f"{out}/bert/bert-tokenizer.json"},
        "gpt2": {"DATA_PATHS": f"{out}/gpt2/openwebtext_text_document", "TOKENIZER": f"{out}/gpt2/gpt2-vocab.json",
                 "MERGES": f"{out}/gpt2/gpt2-merges.txt"},
        "flm101b": {"DATA_PATHS": f"0.7 {out}/flm/web_text_document 0.3 {out}/flm/books_text_document",
                    "TOKENIZER": f"{out}/flm/tokenizer.json"},
        "tiny_demo": {},
    }


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tiny_demo", "bert_base", "bert_large", "gpt2"])
def test_rehearsal_through_the_recipes_deepspeed_launch_script(recipe, rehearsal_data, tmp_path):
    cfg = load_config(EXAMPLES / recipe / "rehearsal.yaml", check_files=False)
    proc = _run([f"examples/{recipe}/launch_deepspeed.sh"],
                {**rehearsal_data[recipe], "CONFIG": f"examples/{recipe}/rehearsal.yaml", "OUT_DIR": str(tmp_path)})
    assert f"done: step {cfg.train.steps}/{cfg.train.steps}" in proc.stdout
    growth = _assert_growths_preserve_the_probe_loss(tmp_path, len(cfg.growth.stages))
    assert growth[-1]["shape"] == str(cfg.resolved_stages()[-1].shape)


@pytest.mark.slow
def test_flm101b_rehearsal_two_topology_changes_live_and_through_msg_grow(rehearsal_data, tmp_path):
    """Stage 0 grows live and moves DP4 -> TP2 x DP2 inside the job; the job stops at stage 1's
    step, msg-grow grows the checkpoint offline, and the relaunch continues on TP2 x PP2.  A second
    job does both growths live; the two runs' losses after the growths are identical."""
    env = {**rehearsal_data["flm101b"], "CONFIG": "examples/flm101b/rehearsal.yaml"}
    cfg = load_config(EXAMPLES / "flm101b" / "rehearsal.yaml", check_files=False)
    first, second = (s.at_step for s in cfg.resolved_stages())
    small, grown, live = tmp_path / "small", tmp_path / "grown", tmp_path / "live"
    _run(["examples/flm101b/launch_deepspeed.sh", "--max-steps", str(second)], {**env, "OUT_DIR": str(small)})
    [g0] = _assert_growths_preserve_the_probe_loss(small, 1)
    assert (g0["step"], g0["layout"]) == (first, "tp2 x pp1 x dp2")
    data = [f"data.paths=[{','.join(env['DATA_PATHS'].split())}]", f"data.tokenizer_model={env['TOKENIZER']}"]
    proc = _run([sys.executable, "-m", "megatron_msg.cli.grow", "examples/flm101b/rehearsal.yaml", "--from",
                 str(small), "--out-dir", str(grown), "--verify", *sum((["--set", d] for d in data), [])], {})
    assert "layout from here tp2 x pp2 x dp1" in proc.stdout and "verify: probe loss" in proc.stdout
    _run(["examples/flm101b/launch_deepspeed.sh"], {**env, "OUT_DIR": str(grown)})
    growth = _assert_growths_preserve_the_probe_loss(grown, 2)
    assert growth[1]["offline"] and growth[1]["layout"] == "tp2 x pp2 x dp1"
    _run(["examples/flm101b/launch_deepspeed.sh"], {**env, "OUT_DIR": str(live)})
    _assert_growths_preserve_the_probe_loss(live, 2)
    after = {r["step"]: r["loss"] for r in _records(grown, "train") if r["step"] >= second}
    assert after and after == {r["step"]: r["loss"] for r in _records(live, "train") if r["step"] >= second}
    # the second growth shrank the global batch (2304 -> 2100 samples at full size; 8 -> 6 here)
    assert {r["global_batch"] for r in _records(live, "train") if r["step"] >= second} == {6}


@pytest.mark.slow
def test_torchrun_and_slurm_launch_scripts_run_the_tiny_demo(tmp_path):
    """The torchrun launcher script, and the Slurm script with srun/scontrol stand-ins (one node)."""
    _run(["examples/tiny_demo/launch_torchrun.sh", "--max-steps", "13"],
         {"CONFIG": "examples/tiny_demo/rehearsal.yaml", "OUT_DIR": str(tmp_path / "torchrun")})
    _assert_growths_preserve_the_probe_loss(tmp_path / "torchrun", 1)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/usr/bin/env bash\n# stand-in: run the task once, as on a one-node allocation\n"
                               "while [[ $1 == --* ]]; do shift; done\nexec \"$@\"\n")
    (fake / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": str(REPO),
           "CONFIG": "examples/tiny_demo/rehearsal.yaml", "OUT_DIR": str(tmp_path / "slurm")}
    _run(["bash", "examples/tiny_demo/launch_slurm.sbatch", "--max-steps", "13"], env)
    _assert_growths_preserve_the_probe_loss(tmp_path / "slurm", 1)
