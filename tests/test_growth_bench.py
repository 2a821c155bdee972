"""msg-bench growth --size tiny (issue 19): the report is complete and well-formed (a structure
check, not a speed check: the tiny size trains too briefly to say which schedule wins)."""
from __future__ import annotations

import json

import pytest

from megatron_msg.cli.bench import main as msg_bench
from megatron_msg.config import config_from_dict
from megatron_msg.training.growth_bench import LR_POLICIES, OPERATORS

ROW_KEYS = {"flops", "time_s", "final_valid_loss", "reference_flops_to_final_loss", "speedup_at_final_loss",
            "reference_time_to_final_loss_s", "wall_speedup_at_final_loss", "reference_loss_at_budget",
            "flops_to_reference_final_loss", "speedup_to_reference_final_loss", "time_to_reference_final_loss_s",
            "wall_speedup_to_reference_final_loss"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("growth_bench")
    msg_bench(["growth", "--size", "tiny", "--out", str(out)])
    return out, json.loads((out / "growth.json").read_text())


def _config(out, name):
    from megatron_msg.checkpoint.io import latest_checkpoint, open_checkpoint
    return config_from_dict(open_checkpoint(latest_checkpoint(out / "runs" / name)).state["config"], check=False)


def test_every_run_is_reported_against_both_full_size_references(bench):
    out, rep = bench
    names = [r["run"] for r in rep["runs"]]
    assert names == ["full", "full_rewinds", *OPERATORS, "msg_no_rewinds", *LR_POLICIES, "msg_auto", "msg_deadlines"]
    assert rep["size"] == "tiny" and rep["corpus"] == "bundled" and rep["steps"] == 144
    assert rep["seeds"] == {}  # one seed: no spread to read
    assert [s["rewind_lr"] for s in rep["stages"]][:2] == [True, True] and len(rep["stages"]) >= 3
    for row in rep["runs"]:
        for ref in ("vs_full", "vs_full_rewinds"):
            extra = {"flops_to_reference_final_loss_without_lookaheads"} if row["lookaheads"] else set()
            assert set(row[ref]) == ROW_KEYS | extra
            v = row[ref]
            assert v["flops"] > 0 and v["time_s"] > 0 and v["final_valid_loss"] > 0
            if v["reference_flops_to_final_loss"] is None:  # "not reached": no speed-up made up
                assert v["speedup_at_final_loss"] is None
            else:
                assert v["speedup_at_final_loss"] == pytest.approx(v["reference_flops_to_final_loss"] / v["flops"])
            if v["flops_to_reference_final_loss"] is None:
                assert v["speedup_to_reference_final_loss"] is None
            else:
                assert 0 < v["flops_to_reference_final_loss"] <= v["flops"]
    by = {r["run"]: r for r in rep["runs"]}
    assert by["full"]["vs_full"]["speedup_at_final_loss"] == 1.0
    assert by["full_rewinds"]["vs_full_rewinds"]["speedup_at_final_loss"] == 1.0
    growth_flops = {by[n]["vs_full"]["flops"] for n in (*OPERATORS, "msg_no_rewinds", *LR_POLICIES)}  # msg_auto: its own
    assert len(growth_flops) == 1 and growth_flops.pop() < by["full"]["vs_full"]["flops"]  # one schedule
    assert by["stack"]["width_operator"] == "nomask" and by["msg"]["growth_events"] == len(rep["stages"])
    # MSG is exact at every growth; nomask's new units move the loss at once.
    assert len(by["msg"]["growth_loss_jumps"]) == len(rep["stages"])
    assert max(abs(j) for j in by["msg"]["growth_loss_jumps"]) < 1e-5
    assert max(abs(j) for j in by["nomask"]["growth_loss_jumps"]) > 1e-4
    auto = by["msg_auto"]
    assert auto["timing"] == "auto" and auto["growth_events"] == len(rep["stages"])
    assert auto["growth_steps"] == sorted(auto["growth_steps"]) and auto["lookaheads"] >= 1
    table = (out / "growth.md").read_text()
    assert table.count("| msg_no_rewinds |") == 2 and "Against `full_rewinds`" in table
    assert f"`msg_auto` (at_step auto) grew at steps {', '.join(map(str, auto['growth_steps']))}" in table
    assert (out / "growth.png").stat().st_size > 10_000


def test_the_controls_differ_from_the_schedule_only_by_what_they_control(bench):
    out, _ = bench
    msg, no_rewinds, full, full_rewinds = (_config(out, n) for n in ("msg", "msg_no_rewinds", "full", "full_rewinds"))
    rewinds = [s.at_step for s in msg.resolved_stages() if s.rewind_lr]
    assert rewinds and full_rewinds.lr.rewind_at == rewinds and full.lr.rewind_at == []
    assert [s.shape for s in no_rewinds.resolved_stages()] == [s.shape for s in msg.resolved_stages()]
    assert not any(s.rewind_lr for s in no_rewinds.resolved_stages())
    assert full.model.shape == msg.resolved_stages()[-1].shape  # the target
    stack = _config(out, "stack").resolved_stages()
    for before, st in zip([_config(out, "stack").model.shape] + [s.shape for s in stack], stack):
        assert st.operator == ("stack" if st.shape.layers != before.layers else "nomask")
    for a, b in ((msg, full), (no_rewinds, full_rewinds)):
        assert (a.train.seed, a.data.seed, a.optimizer, a.train.steps) == (b.train.seed, b.data.seed, b.optimizer,
                                                                             b.train.steps)


def test_the_lr_policy_runs_train_the_msg_schedule_with_their_rewinds(bench):
    """msg_partial_rewinds / msg_fast_decay: msg's stages and data, and the LR they logged is msg's
    until the first rewind, below it after (half the peak), or at the floor before the end."""
    out, rep = bench
    msg = _config(out, "msg")

    def logged_lr(name: str) -> dict[int, float]:
        lines = (out / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["lr"] for r in map(json.loads, lines) if r.get("kind") == "train"}
    lr_of = {n: logged_lr(n) for n in ("msg", *LR_POLICIES)}
    first = next(s.at_step for s in msg.resolved_stages() if s.rewind_lr)
    last = [s.at_step for s in msg.resolved_stages() if s.rewind_lr][-1]
    for kind, lr in LR_POLICIES.items():
        cfg = _config(out, kind)
        assert cfg.resolved_stages() == msg.resolved_stages() and cfg.data == msg.data
        assert {k: getattr(cfg.lr, k) for k in lr} == lr
        assert [lr_of[kind][s] for s in lr_of["msg"] if s < first] == [lr_of["msg"][s] for s in lr_of["msg"] if s < first]
    after = [s for s in lr_of["msg"] if s >= first]
    assert all(lr_of["msg_partial_rewinds"][s] < lr_of["msg"][s] for s in after)
    floor = msg.optimizer.min_lr
    tail = [s for s in lr_of["msg"] if s > last + (msg.train.steps - last) * 0.6]
    assert tail and all(lr_of["msg_fast_decay"][s] == pytest.approx(floor) and floor < lr_of["msg"][s] for s in tail)
    by = {r["run"]: r for r in rep["runs"]}
    assert by["msg_partial_rewinds"]["lr_policy"] == "rewinds (0.5 x peak)"
    assert by["msg_fast_decay"]["lr_policy"] == "rewinds (floor after 0.5 of the rest)"


def test_a_missing_corpus_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        msg_bench(["growth", "--size", "tiny", "--out", str(tmp_path), "--corpus", str(tmp_path / "none.jsonl")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("msg-bench growth: --corpus: no such file") and err.count("\n") == 1


def test_the_auto_run_has_the_schedule_shapes_and_its_lookaheads_cost_flops(bench):
    from megatron_msg.growth.plan import plan_schedule
    from megatron_msg.training.compare import load_run
    out, rep = bench
    auto, msg = _config(out, "msg_auto"), _config(out, "msg")
    assert [s.shape for s in auto.resolved_stages()] == [s.shape for s in msg.resolved_stages()]
    assert all(s.auto for s in auto.resolved_stages()) and not any(s.auto for s in msg.resolved_stages())
    curve = load_run(out / "runs" / "msg_auto")
    decided = dict(enumerate(next(r for r in rep["runs"] if r["run"] == "msg_auto")["growth_steps"]))
    schedule_flops = sum(p.flops for p in plan_schedule(curve.cfg, decided))
    row = next(r for r in rep["runs"] if r["run"] == "msg_auto")
    assert row["vs_full"]["flops"] == schedule_flops + row["lookahead_flops"]
    bare = row["vs_full"]["flops_to_reference_final_loss_without_lookaheads"]
    with_lookaheads = row["vs_full"]["flops_to_reference_final_loss"]
    if bare is not None and with_lookaheads is not None:
        assert bare <= with_lookaheads


def test_the_deadline_control_grows_each_auto_stage_at_its_latest_step(bench):
    from megatron_msg.growth.auto_timing import AutoTiming
    out, rep = bench
    auto, fixed = _config(out, "msg_auto"), _config(out, "msg_deadlines")
    timing = AutoTiming.from_config(auto, auto.resolved_stages())
    stages = fixed.resolved_stages()
    assert [s.shape for s in stages] == [s.shape for s in auto.resolved_stages()] and not any(s.auto for s in stages)
    assert [s.at_step for s in stages] == [timing.latest(k) for k in range(len(stages))]
    row = next(r for r in rep["runs"] if r["run"] == "msg_deadlines")
    assert row["timing"] == "deadlines" and row["lookaheads"] == 0 and row["growth_steps"] == [s.at_step for s in stages]


def test_runs_and_growth_budget_pick_what_is_trained(tmp_path):
    from megatron_msg.training.growth_bench import SIZES, Corpus, bench_runs
    runs = bench_runs(SIZES["tiny"], Corpus({"format": "jsonl", "path": "x.jsonl"}, None), 1, ("msg_auto",), 2.0)
    assert [r.name for r in runs] == ["full", "msg_auto"]  # full: every run is compared with it
    assert runs[0].raw["train"]["steps"] == 144 and runs[1].raw["train"]["steps"] == 288
    with pytest.raises(SystemExit) as exc:
        msg_bench(["growth", "--size", "tiny", "--out", str(tmp_path), "--runs", "msg,bogus"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        msg_bench(["growth", "--size", "tiny", "--out", str(tmp_path), "--schedule", "sch9"])
    assert exc.value.code == 2


def test_schedule_picks_the_named_schedule_of_every_growth_run():
    from megatron_msg.config import config_from_dict
    from megatron_msg.named_schedules import Dims, rapid
    from megatron_msg.training.growth_bench import SIZES, Corpus, bench_runs
    runs = bench_runs(SIZES["tiny"], Corpus({"format": "jsonl", "path": "x.jsonl"}, None), 1,
                      ("full_rewinds", "msg", "nomask", "msg_auto"), 2.0, schedule="rapid")
    size = SIZES["tiny"]
    made = rapid(Dims(size.hidden, size.ffn, size.heads, size.layers), 288, size.head_dim)
    for run in runs[2:]:
        cfg = config_from_dict(run.raw, check=False)
        assert [s.shape.layers for s in cfg.resolved_stages()] == [s.dims.layers for s in made.stages]
        assert (cfg.model.hidden, cfg.model.ffn) == (made.start.hidden, made.start.ffn)
        if run.timing == "fixed":
            assert [s.at_step for s in cfg.resolved_stages()] == [s.at_step for s in made.stages]
    # full_rewinds gets rapid's rewinds (1st and 2nd growth) scaled to its own budget.
    assert runs[1].raw["lr"]["rewind_at"] == [round(s.at_step / 2) for s in made.stages[:2]]


def test_a_stopped_benchmark_stops_and_keep_runs_resumes_it_to_the_same_losses(bench, tmp_path, monkeypatch, capsys):
    """SIGTERM during a run stops the whole benchmark (not just that run, which would leave it
    half-trained in the report); --keep-runs then resumes it bit-exactly."""
    import shutil

    from megatron_msg.training.compare import load_run
    from megatron_msg.training.trainer import Trainer
    done, _ = bench
    shutil.copytree(done / "runs" / "full", tmp_path / "runs" / "full")  # kept: only msg trains
    real_stop = Trainer._stop_agreed
    monkeypatch.setattr(Trainer, "_stop_agreed", lambda self: self.step == 60 or real_stop(self))
    args = ["growth", "--size", "tiny", "--out", str(tmp_path), "--runs", "msg", "--keep-runs"]
    with pytest.raises(SystemExit) as exc:
        msg_bench(args)
    assert exc.value.code == 130
    assert "stopped during run msg at step 60" in capsys.readouterr().err
    assert not (tmp_path / "growth.json").exists()
    assert json.loads((tmp_path / "finished_runs.json").read_text()) == ["full"]  # what a wrapper reports over
    monkeypatch.setattr(Trainer, "_stop_agreed", real_stop)
    msg_bench(args)
    assert json.loads((tmp_path / "finished_runs.json").read_text()) == ["full", "msg"]
    assert "msg: resuming from step 60" in capsys.readouterr().out
    assert load_run(tmp_path / "runs" / "msg", "msg").valid == load_run(done / "runs" / "msg", "msg").valid


def test_the_seed_summary_says_whether_msg_wins_by_more_than_the_seed_spread():
    from megatron_msg.training.growth_bench import _format_seeds, seed_summary

    def row(kind, seed, final, to_full=None, jumps=()):
        return {"run": f"{kind}_s{seed}", "kind": kind, "seed": seed, "growth_loss_jumps": list(jumps),
                "vs_full": {"final_valid_loss": final, "flops_to_reference_final_loss": to_full}}
    rows = [row("full", 0, 1.50, 3e13), row("msg", 0, 1.40, 1.4e13), row("nomask", 0, 1.45, jumps=(0.1, 0.3)), row("net2net", 0, 1.405),
            row("full", 1, 1.52, 3e13), row("msg", 1, 1.41, 1.5e13), row("nomask", 1, 1.47, jumps=(0.2, 0.1)), row("net2net", 1, 1.42)]
    summary = seed_summary(rows)
    assert summary["kinds"]["msg"]["final_loss_mean"] == pytest.approx(1.405)
    assert summary["kinds"]["msg"]["final_loss_spread"] == pytest.approx(0.01)
    assert summary["kinds"]["msg"]["flops_to_full_final_loss"] == [1.4e13, 1.5e13]
    assert summary["kinds"]["nomask"]["largest_growth_loss_jump_mean"] == pytest.approx(0.25)
    assert summary["kinds"]["msg"]["largest_growth_loss_jump_mean"] is None  # no growth events given
    nomask, net2net = summary["msg_against"]["nomask"], summary["msg_against"]["net2net"]
    assert nomask["difference_per_seed"] == pytest.approx([0.05, 0.06]) and nomask["seed_spread"] == pytest.approx(0.02)
    assert nomask["msg_lower_beyond_spread"] is True
    assert nomask["difference_spread"] == pytest.approx(0.01)
    # Lower on both seeds, but by less on average (0.0075) than net2net's own spread (0.015).
    assert net2net["msg_lower_beyond_spread"] is False
    text = "\n".join(_format_seeds(summary))
    assert "msg against nomask:" in text and "beyond the seed spread: yes" in text
    assert "| nomask | 2 | 1.4600 | 0.0200 | +0.2500 |" in text
    assert "msg against net2net:" in text and "beyond the seed spread: no" in text
    assert seed_summary([r for r in rows if r["seed"] == 0]) == {}  # one seed: no spread to read
    assert "msg_fast_decay" not in summary["msg_against"]  # a kind not trained is not compared

    # msg's own schedule under another LR policy is compared the same way, per seed.
    policies = seed_summary(rows + [row("msg_fast_decay", 0, 1.43), row("msg_fast_decay", 1, 1.46)])
    fast = policies["msg_against"]["msg_fast_decay"]
    assert fast["difference_per_seed"] == pytest.approx([0.03, 0.05]) and fast["msg_lower_beyond_spread"] is True
    assert "msg against msg_fast_decay:" in "\n".join(_format_seeds(policies))


def test_keep_runs_keeps_a_full_size_run_whatever_the_growth_defaults_but_not_a_growth_run(bench):
    """A run that never grows trains nothing with growth.defaults, so a default changed since
    (depth_init) leaves it kept; a growth run with other growth options is another run."""
    import copy
    import dataclasses

    from megatron_msg.training.growth_bench import _checkpointed_step
    out, _ = bench
    for name, kept in (("full", True), ("msg", False)):
        cfg = copy.deepcopy(_config(out, name))
        assert _checkpointed_step(out / "runs" / name, cfg) == cfg.train.steps
        other = "random" if cfg.growth.defaults.depth_init == "copy" else "copy"
        cfg.growth.defaults = dataclasses.replace(cfg.growth.defaults, depth_init=other)
        if cfg.growth.stages:
            cfg.growth.stages = [dataclasses.replace(st, depth_init=other) for st in cfg.growth.stages]
        assert _checkpointed_step(out / "runs" / name, cfg) == (cfg.train.steps if kept else None)
        cfg.train.seed += 1  # anything else still makes it another run
        assert _checkpointed_step(out / "runs" / name, cfg) is None
