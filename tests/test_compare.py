"""msg-compare: runs side by side by training FLOPs (training/compare.py)."""
from __future__ import annotations

import copy
import json
import shutil

import pytest

from megatron_msg.cli.compare import main as msg_compare
from megatron_msg.config import config_from_dict
from megatron_msg.growth.plan import plan_schedule
from megatron_msg.training.compare import compare, flops_to_reach, format_comparison, load_run, loss_at
from megatron_msg.training.trainer import Trainer
from tests.test_zero import _raw


def test_flops_to_reach_interpolates_between_evaluations():
    curve = [(10.0, 5.0), (20.0, 3.0), (40.0, 1.0)]
    assert flops_to_reach(curve, 4.0) == 15.0
    assert flops_to_reach(curve, 3.0) == 20.0
    assert flops_to_reach(curve, 2.0) == 30.0
    assert flops_to_reach(curve, 6.0) == 10.0   # reached at the first evaluation
    assert flops_to_reach(curve, 0.5) is None    # never reached


def test_loss_at_interpolates_a_curve_and_says_none_past_its_end():
    curve = [(0.0, 6.0), (10.0, 5.0), (20.0, 3.0)]
    assert loss_at(curve, 15.0) == 4.0 and loss_at(curve, 0.0) == 6.0 and loss_at(curve, 20.0) == 3.0
    assert loss_at(curve, 20.5) is None


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A grown run (four events) and the full-size final shape for the same steps."""
    root = tmp_path_factory.mktemp("compare")
    grown = _raw("gpt")
    grown["train"]["eval_interval"] = 4
    full = copy.deepcopy(grown)
    full["growth"]["stages"] = []
    full["model"].update(hidden=24, ffn=48, heads=4, layers=4)
    for name, raw in (("full", full), ("msg", grown)):
        Trainer(config_from_dict(raw), out_dir=root / name, progress=False).run()
    return root, config_from_dict(full), config_from_dict(grown)


def test_run_flops_follow_the_schedule(two_runs):
    root, full_cfg, grown_cfg = two_runs
    for name, cfg in (("full", full_cfg), ("msg", grown_cfg)):
        run = load_run(root / name)
        plans = plan_schedule(cfg)
        assert run.flops_after(cfg.train.steps - 1) == sum(p.flops for p in plans)
        first = plans[0]
        assert run.flops_after(0) == first.flops // (first.last_step - first.first_step)
    grown = load_run(root / "msg")
    assert [g["step"] for g in grown.growths] == [8, 16, 24, 30]


def test_msg_compare_reports_flops_to_the_same_loss(two_runs, capsys):
    root, _, _ = two_runs
    plot = root / "compare.png"
    assert msg_compare([str(root / "full"), str(root / "msg"), "--json", "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    full, msg = out["runs"]
    assert out["reference"] == "full" and full["speedup"] == 1.0
    assert out["target_loss"] == max(full["best_valid_loss"], msg["best_valid_loss"])
    assert msg["flops"] < full["flops"] and msg["growth_events"] == 4
    assert msg["speedup"] == pytest.approx(full["flops_to_target"] / msg["flops_to_target"])
    assert plot.stat().st_size > 10_000
    assert msg_compare([str(root / "full"), str(root / "msg"), "--target", "0.01"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| run | growth events |") and "FLOPs to loss 0.0100" in table
    assert table.count("| - | - | - |") == 2  # neither run reached it: no FLOPs, speed-up or wall speed-up


def test_each_run_is_compared_at_its_own_final_loss_in_flops_and_wall_time(two_runs, capsys):
    """Issue 19: the full-size run's FLOPs and training time to each run's own final loss ("not
    reached" where it never gets there), and its loss at each run's budget."""
    root, _, _ = two_runs
    assert msg_compare([str(root / "full"), str(root / "msg"), "--json"]) == 0
    full, msg = json.loads(capsys.readouterr().out)["runs"]
    runs = {name: load_run(root / name) for name in ("full", "msg")}
    ref_flops, ref_time = runs["full"].valid_by_flops(), runs["full"].valid_by_time()
    assert ref_time is not None and [t for t, _ in ref_time] == sorted(t for t, _ in ref_time)
    assert ref_flops[0] == (0, runs["full"].valid[0][1]) and runs["full"].valid[0][0] == -1  # evaluated at step 0
    for row, run in ((full, runs["full"]), (msg, runs["msg"])):
        final = run.valid[-1][1]
        assert row["final_valid_loss"] == final and row["time_s"] == run.valid_by_time()[-1][0] > 0
        assert row["reference_flops_to_final_loss"] == flops_to_reach(ref_flops, final)
        assert row["reference_time_to_final_loss_s"] == flops_to_reach(ref_time, final)
        assert row["reference_loss_at_budget"] == loss_at(ref_flops, row["flops"])
        if row["reference_flops_to_final_loss"] is None:
            assert row["speedup_at_final_loss"] is None
        else:
            assert row["speedup_at_final_loss"] == pytest.approx(row["reference_flops_to_final_loss"] / row["flops"])
    assert full["reference_loss_at_budget"] == full["final_valid_loss"]  # the reference at its own budget
    # A run that ends below anything the reference reached: "not reached", not a made-up speed-up.
    better = copy.deepcopy(runs["msg"])
    better.valid[-1] = (better.valid[-1][0], min(loss for _, loss in ref_flops) - 0.5)
    _, rows = compare([runs["full"], better])
    assert rows[1]["reference_flops_to_final_loss"] is None and rows[1]["speedup_at_final_loss"] is None
    assert rows[1]["reference_time_to_final_loss_s"] is None and rows[1]["wall_speedup_at_final_loss"] is None
    assert "| not reached | not reached / not reached |" in format_comparison(*compare([runs["full"], better]))


def test_msg_compare_names_what_it_cannot_use(two_runs, tmp_path, capsys):
    root, _, _ = two_runs
    assert msg_compare([str(tmp_path)]) == 2
    assert "no metrics.jsonl (not a msg-train run directory)" in capsys.readouterr().err
    assert msg_compare([str(root / "full"), "--reference", "3"]) == 2
    assert "reference 3 is not one of the 1 runs" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 0, "loss": 1.0}\n')
    assert msg_compare([str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("line,message", [('{"kind": "train", "step": 0, "loss"\n', "metrics.jsonl:2: malformed JSON"),
                                          ("3\n", "metrics.jsonl:2: not a metrics record")])
def test_msg_compare_names_the_bad_metrics_line(two_runs, tmp_path, capsys, line, message):
    root, _, _ = two_runs
    run = tmp_path / "run"
    shutil.copytree(root / "full", run)
    first = (run / "metrics.jsonl").read_text().splitlines(keepends=True)[0]
    (run / "metrics.jsonl").write_text(first + line + first)  # a bad line before the last: damage, named
    assert msg_compare([str(run)]) == 2
    assert message in capsys.readouterr().err


def test_msg_compare_reads_past_a_torn_last_line(two_runs, tmp_path, capsys):
    root, _, _ = two_runs
    run = tmp_path / "run"
    shutil.copytree(root / "full", run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 99, "lo')  # a write cut by a kill
    assert msg_compare([str(run)]) == 0
    assert "the last line is cut off" in capsys.readouterr().err
