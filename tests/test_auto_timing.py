"""Self-adaptive growth timing (``at_step: auto``, issue 19 item 3): the rule's arithmetic, its config
errors, and what makes it trustworthy in a run: a rolled-back lookahead leaves no trace and an adopted
one trains as the run would have (an auto run trains exactly like a fixed run at the steps it decided,
with the adopted stages' LR rewinds where their lookaheads ended), decisions survive a resume, and the
thrown-away lookaheads' compute is counted wherever FLOPs are reported."""
from __future__ import annotations

import copy
import json
import math

import pytest

from megatron_msg.config import ConfigError, config_from_dict
from megatron_msg.growth.auto_timing import AutoTiming, compared_rate, decide, planned_stages
from megatron_msg.training.trainer import Trainer
from tests.dist_harness import run_distributed

STEPS = 120
RAW = {
    # The sch1 target; model.* becomes the start shape (h=16, ffn=16, heads=2, L=1).
    "model": {"arch": "gpt", "hidden": 24, "ffn": 64, "heads": 3, "layers": 4, "head_dim": 8, "seq_len": 16,
              "dropout": 0.0},
    "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
    "lr": {"warmup_steps": 4},
    "train": {"steps": STEPS, "batch_size": 4, "grad_accum": 1, "log_interval": 1, "eval_interval": 30,
              "eval_iters": 2, "save_interval": 1000, "device": "cpu", "tensorboard": False, "plot": False},
    "growth": {"schedule": "sch1", "timing": "auto"},
}


def _raw(**growth_auto) -> dict:
    raw = copy.deepcopy(RAW)
    if growth_auto:
        raw["growth"]["auto"] = growth_auto
    return raw


def _records(run_dir, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _fixed_at(raw: dict, steps: dict[int, int], moved_rewinds: dict[int, int] | None = None) -> dict:
    """``raw``'s stages at fixed steps: what an auto run that decided ``steps`` must equal;
    ``moved_rewinds``: stage -> the step an adopted lookahead moved its LR rewind to."""
    cfg = config_from_dict(copy.deepcopy(raw))
    moved = moved_rewinds or {}
    fixed = copy.deepcopy(raw)
    fixed["model"].update(hidden=cfg.model.hidden, ffn=cfg.model.ffn, heads=cfg.model.heads, layers=cfg.model.layers)
    fixed["growth"] = {"stages": [
        {"at_step": steps[st.index], "hidden": st.shape.hidden, "ffn": st.shape.ffn, "heads": st.shape.heads,
         "layers": st.shape.layers, "phi": st.phi, "rewind_lr": st.rewind_lr and st.index not in moved}
        for st in cfg.resolved_stages()]}
    fixed["lr"] = {**fixed.get("lr", {}), "rewind_at": sorted(moved.values())}
    return fixed


# ----------------------------------------------------------------------------- the rule


def test_checks_start_after_the_ramp_and_end_at_the_stage_deadline():
    cfg = config_from_dict(_raw(check_every=10, probe_steps=4, skip_near_deadline=False))
    stages = cfg.resolved_stages()
    assert all(st.auto and st.at_step is None for st in stages) and len(stages) == 5
    timing = AutoTiming.from_config(cfg, stages)
    # Stage k of 5 grows at the latest at steps * (1 - (5 - k) / 8).
    assert [timing.latest(k) for k in range(5)] == [45, 60, 75, 90, 105]
    assert timing.checks(0, None) == [14, 24, 34, 44, 45]  # after the LR warm-up (4) + check_every
    grown = planned_stages(cfg, {0: 24})[0]
    assert grown.at_step == 24 and grown.uses_masks
    # The next stage's window opens when stage 0's ramp has ended.
    assert timing.checks(1, grown)[0] == 24 + grown.phi + 10
    # Each check's loss, the loss probe_steps before it, and 2 x probe_steps before it (the
    # earlier window the current rate is extrapolated from) where that is after the warm-up.
    assert timing.measure_steps(0, None) == {6, 10, 14, 16, 20, 24, 26, 30, 34, 36, 40, 44}
    plain = AutoTiming.from_config(config_from_dict(_raw(check_every=10, probe_steps=4, extrapolate=False,
                                                         skip_near_deadline=False)), stages)
    assert plain.measure_steps(0, None) == {10, 14, 20, 24, 30, 34, 40, 44}


def test_no_lookahead_nearer_the_deadline_than_a_wait_throws_away():
    cfg = config_from_dict(_raw(check_every=10, probe_steps=4))
    stages = cfg.resolved_stages()
    timing = AutoTiming.from_config(cfg, stages)
    phi = stages[0].phi
    assert stages[0].uses_masks and phi >= 1
    # A "wait" trains the ramp and half the window (stop_early), then is rolled back.
    assert timing.wait_cost(0) == phi + 2
    # Stage 0's deadline is 45: the check at 44 (1 step before it) runs no lookahead, the one at 34
    # (11 steps before) does, and no probe loss is taken for the dropped check.
    assert 45 - 34 > timing.wait_cost(0) >= 45 - 44
    assert timing.checks(0, None) == [14, 24, 34, 45]
    assert timing.measure_steps(0, None) == {6, 10, 14, 16, 20, 24, 26, 30, 34}
    # Without the early stop a "wait" costs the whole window; with no ramp (net2net), only that.
    whole = AutoTiming.from_config(config_from_dict(_raw(check_every=10, probe_steps=4, stop_early=False)), stages)
    assert whole.wait_cost(0) == phi + 4
    n2n_raw = _raw(check_every=10, probe_steps=4)
    n2n_raw["growth"]["defaults"] = {"operator": "net2net"}
    n2n_cfg = config_from_dict(n2n_raw)
    n2n = AutoTiming.from_config(n2n_cfg, n2n_cfg.resolved_stages())
    assert n2n.wait_cost(0) == 2 and n2n.checks(0, None) == [14, 24, 34, 45]


def test_planned_stages_put_undecided_stages_at_their_earliest_check():
    cfg = config_from_dict(_raw(check_every=10, probe_steps=4))
    steps = [st.at_step for st in planned_stages(cfg)]
    assert steps == sorted(steps) and steps[0] == 14
    assert [st.at_step for st in planned_stages(cfg, {0: 40})][0] == 40


def test_the_decision_compares_loss_drop_per_flop():
    # Current shape: 0.5 over 10 steps at 1 FLOP a step; grown (after its ramp): 3x the FLOPs, so it
    # must drop 3x as much over its 10 measured steps.
    tie = decide(0, 50, 10, loss_before=3.0, loss_now=2.5, grown_settled=2.5, grown_after=1.0, flops_current=1,
                 flops_grown=3, lookahead_steps=15)
    assert tie.decision == "grow" and tie.rate_grown == tie.rate_current == pytest.approx(0.05)
    wait = decide(0, 50, 10, loss_before=3.0, loss_now=2.5, grown_settled=2.4, grown_after=1.0, flops_current=1,
                  flops_grown=3, lookahead_steps=15)
    assert wait.decision == "wait" and wait.probe_flops == 45 and wait.grown_after == 1.0


def test_the_grown_window_can_start_at_the_growth_and_run_through_the_ramp():
    # include_ramp: from the probe loss right after growing (2.5, MSG: the current one) over all 15
    # grown steps (ramp 5 + window 10), not from the ramp's end (2.4) over the last 10.
    check = decide(0, 50, 10, loss_before=3.0, loss_now=2.5, grown_settled=2.4, grown_after=1.0, flops_current=1,
                   flops_grown=3, lookahead_steps=15, grown_start=2.5)
    assert check.rate_grown == pytest.approx(1.5 / 45) and check.grown_start == 2.5
    assert check.decision == "wait" and not check.stopped_early
    # Stopped after its ramp and 5 steps: the window is those 10 steps from the growth.
    stopped = decide(0, 50, 10, 3.0, 2.5, 2.4, 2.0, 1, 3, lookahead_steps=10, grown_steps=5, grown_start=2.5)
    assert stopped.stopped_early and stopped.rate_grown == pytest.approx(0.5 / 30)


def test_a_lookahead_stopped_after_half_its_window_measures_that_half():
    # Stopped after 5 of its 10 steps: the grown rate is the drop over those 5, and so is the cost.
    check = decide(0, 50, 10, loss_before=3.0, loss_now=2.5, grown_settled=2.5, grown_after=2.0, flops_current=1,
                   flops_grown=3, lookahead_steps=5 + 5, grown_steps=5)
    assert check.stopped_early and check.decision == "wait" and check.probe_flops == 30
    assert check.rate_grown == pytest.approx(0.5 / 15) and check.rate_current == pytest.approx(0.05)
    assert not decide(0, 50, 10, 3.0, 2.5, 2.5, 2.0, 1, 3, 15, grown_steps=10).stopped_early


def test_the_current_rate_is_extrapolated_to_the_grown_window_along_a_power_law():
    cfg = config_from_dict(_raw(check_every=10, probe_steps=4))
    stages = cfg.resolved_stages()
    timing = AutoTiming.from_config(cfg, stages)
    grown = planned_stages(cfg, {0: 20})[0]  # the shape of stage 1 was made at step 20
    # Windows [42, 46] and [46, 50]: rates 0.2 and 0.1 per FLOP (one FLOP a step) at t0 = 24 and
    # t1 = 28 steps after step 20; the grown window (growth to ramp end, 6 steps, plus 4) has its
    # middle 5 steps after the check, t = 35.
    losses = {42: 3.0, 46: 2.2, 50: 1.8}
    now, ahead = timing.current_rates(losses, 50, grown, ramp=6, flops=1)
    beta = math.log(2) / math.log(28 / 24)
    assert now == pytest.approx(0.1) and ahead == pytest.approx(0.1 * (28 / 35) ** beta)
    # Measured from the ramp's end only (include_ramp: false), the window's middle is 6 + 2 steps on.
    after_ramp = AutoTiming.from_config(config_from_dict(_raw(check_every=10, probe_steps=4, include_ramp=False)),
                                        stages)
    assert after_ramp.current_rates(losses, 50, grown, 6, 1)[1] == pytest.approx(0.1 * (28 / 38) ** beta)
    assert ahead < now / 2  # a rate halving every 4 steps at t = 24..28 is far lower 10 steps on
    # A rate that does not fall, a loss that rose, or no earlier window: compared as measured.
    assert timing.current_rates({42: 3.0, 46: 2.9, 50: 2.5}, 50, grown, 6, 1) == (pytest.approx(0.1), None)
    assert timing.current_rates({42: 3.0, 46: 2.0, 50: 2.1}, 50, grown, 6, 1)[1] is None
    assert timing.current_rates({46: 2.2, 50: 1.8}, 50, grown, 6, 1)[1] is None
    plain = AutoTiming.from_config(config_from_dict(_raw(check_every=10, probe_steps=4, extrapolate=False)), stages)
    assert plain.current_rates(losses, 50, grown, 6, 1) == (pytest.approx(0.1), None)
    # The start shape's t counts from step 0.
    _, first = timing.current_rates({22: 3.0, 26: 2.2, 30: 1.8}, 30, None, ramp=6, flops=1)
    assert first == pytest.approx(0.1 * (28 / 35) ** beta)
    # The extrapolated rate is what the decision compares: as measured the current shape is
    # faster (0.1 > 0.06); where the grown one is measured it is not.
    check = decide(1, 50, 4, 2.2, 1.8, grown_settled=1.8, grown_after=1.08, flops_current=1, flops_grown=3,
                   lookahead_steps=10, rate_ahead=ahead)
    assert check.rate_grown == pytest.approx(0.06) and check.rate_grown > check.rate_current_ahead
    assert check.decision == "grow"
    assert decide(1, 50, 4, 2.2, 1.8, 1.8, 1.08, 1, 3, 10).decision == "wait"


@pytest.mark.parametrize("change, message", [
    ({"growth": {"stages": [{"at_step": "soon", "ffn": 64}]}}, r"^growth.stages\[0\].at_step: expected an integer or 'auto'"),
    ({"growth": {"stages": [{"at_step": "auto", "ffn": 64, "batch_size": 8}]}},
     r"^growth.stages\[0\].batch_size: an at_step: auto stage cannot change it"),
    ({"growth": {"stages": [{"at_step": "auto", "ffn": 64, "tp": 2}]}}, r"^growth.stages\[0\].tp: an at_step: auto"),
    ({"growth": {"stages": [{"at_step": "auto", "ffn": 64}, {"at_step": 90, "layers": 8}]}},
     r"^growth.stages\[1\].at_step: a fixed step after the at_step: auto stage 0"),
    ({"growth": {"timing": "auto", "stages": [{"at_step": 60, "ffn": 64}]}},
     r"^growth.timing: auto decides every stage's step, but growth.stages\[0\].at_step is 60"),
    ({"growth": {"timing": "sometimes", "stages": []}}, r"^growth.timing: 'sometimes' is not one of fixed, auto"),
    ({"growth": {"schedule": "sch1", "timing": "auto", "auto": {"reserve": 0.2}}},
     r"^growth.auto.reserve: 0.2 x 5 auto stage\(s\) must leave part of train.steps"),
    ({"growth": {"schedule": "sch1", "timing": "auto", "auto": {"check_every": 4, "probe_steps": 8}}},
     r"^growth.auto.probe_steps: 8 exceeds growth.auto.check_every=4"),
    ({"growth": {"schedule": "sch1", "timing": "auto", "auto": {"check_every": 8, "probe_steps": 5}}},
     r"^growth.auto.probe_steps: 5 is more than half of growth.auto.check_every=8: an adopted lookahead"),
    ({"growth": {"schedule": "sch1", "timing": "auto", "auto": {"adopt_lookahead": "yes"}}},
     r"^growth.auto.adopt_lookahead: expected true/false, got 'yes'"),
    ({"growth": {"schedule": "sch1", "timing": "auto", "auto": {"extrapolate": 1}}},
     r"^growth.auto.extrapolate: expected true/false, got 1"),
    ({"growth": {"schedule": "sch1", "timing": "auto", "auto": {"check_every": 0}}},
     r"^growth.auto.check_every: must be >= 1, got 0"),
    # Checks every 50 steps: stage 0 first at 54, stage 1 at ~106, stage 2 would be past the run.
    ({"growth": {"schedule": "sch1", "timing": "auto", "auto": {"check_every": 50, "probe_steps": 10}}},
     r"^growth.auto: growth.stages\[2\] gets its first check at step \d+, not before train.steps=120"),
])
def test_bad_auto_timing_configs_name_the_field(change, message):
    raw = copy.deepcopy(RAW)
    raw.update(change)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_validate_prints_the_rule_and_auto_steps(capsys):
    from megatron_msg.cli.train import describe_schedule
    text = describe_schedule(config_from_dict(_raw(check_every=10, probe_steps=4)))
    assert "at_step auto: a 4-step lookahead every 10 steps" in text and "stage 0 45" in text
    assert ("(kept when it says grow, stopped after 2 steps when it cannot say grow; current rate extrapolated "
            "to the grown window; grown rate from the growth, ramp included; none nearer a deadline than a "
            "\"wait\" costs)") in text
    assert text.count("step    auto ->") == 5
    plain = describe_schedule(config_from_dict(_raw(check_every=10, probe_steps=4, extrapolate=False,
                                                    adopt_lookahead=False, stop_early=False, include_ramp=False,
                                                    skip_near_deadline=False)))
    assert "(always rolled back; current rate as measured; grown rate from the ramp's end)" in plain


# ----------------------------------------------------------------------------- in a run


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """An uninterrupted auto run: (its directory, result, decided steps)."""
    out = tmp_path_factory.mktemp("auto")
    result = Trainer(config_from_dict(_raw(check_every=8, probe_steps=4)), out_dir=out, progress=False).run()
    decided = {g["stage"]: g["step"] for g in _records(out, "growth")}
    return out, result, decided


def test_an_auto_run_records_every_decision_and_reaches_the_target(auto_run):
    out, result, decided = auto_run
    checks = _records(out, "growth_check")
    assert result.shape == config_from_dict(copy.deepcopy(RAW)).resolved_stages()[-1].shape
    assert sorted(decided) == [0, 1, 2, 3, 4] and list(decided.values()) == sorted(decided.values())
    waited = [c for c in checks if c["decision"] == "wait" and c["probe_flops"] > 0]
    assert waited, "no lookahead was rolled back: the test would not exercise the rollback"
    assert any(c["adopted"] for c in checks), "no lookahead was adopted: the test would not exercise adoption"
    for c in checks:
        if c["decision"] == "deadline":
            assert c["probe_flops"] == 0 and c["rate_grown"] is None and not c["adopted"]
            continue
        assert (c["decision"] == "grow") == (c["rate_grown"] >= c["rate_current"])
        if c["adopted"]:  # kept: its steps are the run's, none of its compute is overhead
            assert c["decision"] == "grow" and c["probe_flops"] == 0 and c["grown_after"] is not None
            continue
        if c["probe_flops"] == 0:  # no lookahead: still faster than the grown shape at the last one
            assert c["decision"] == "wait" and c["grown_after"] is None
            earlier = [e for e in checks if e["stage"] == c["stage"] and e["step"] < c["step"] and e["probe_flops"]]
            assert earlier and c["rate_grown"] == earlier[-1]["rate_grown"]
    # Each stage's last check is the one that grew it.
    for stage, step in decided.items():
        assert [c for c in checks if c["stage"] == stage][-1]["step"] == step
    # No check ran nearer its stage's deadline than a "wait" costs (skip_near_deadline): the stage grew
    # there by the rule or at the deadline.  The dropped checks would have been on the grid, so
    # this fails if they ran.
    cfg = config_from_dict(_raw(check_every=8, probe_steps=4))
    timing = AutoTiming.from_config(cfg, cfg.resolved_stages())
    near = [c for c in checks if c["decision"] != "deadline"
            and 0 < timing.latest(c["stage"]) - c["step"] <= timing.wait_cost(c["stage"])]
    assert not near
    assert all(g["timing"] == "auto" for g in _records(out, "growth"))


def test_lookaheads_leave_no_trace_but_the_adopted_ones(auto_run, tmp_path):
    """The auto run's losses, train and validation, are bit-identical to a fixed run that grows at the
    steps it decided and rewinds the LR where the adopted lookaheads ended: every rolled-back lookahead
    restored the model, optimizer, ramp and step exactly, and an adopted one trained exactly as the run
    itself would have (its records are the run's, none missing)."""
    out, result, decided = auto_run
    cfg = config_from_dict(_raw(check_every=8, probe_steps=4))
    stages = cfg.resolved_stages()
    moved = {c["stage"]: c["step"] + stages[c["stage"]].phi + 4 for c in _records(out, "growth_check")
             if c["adopted"] and stages[c["stage"]].rewind_lr}
    fixed = Trainer(config_from_dict(_fixed_at(_raw(check_every=8, probe_steps=4), decided, moved)),
                    out_dir=tmp_path, progress=False).run()
    assert fixed.losses == result.losses and fixed.valid_losses == result.valid_losses
    assert sorted(result.losses) == list(range(STEPS))
    assert [r["lr"] for r in _records(tmp_path, "train")] == [r["lr"] for r in _records(out, "train")]


def test_an_adopted_lookahead_moves_the_stage_lr_rewind_to_its_end(tmp_path):
    """A stage with an LR rewind whose lookahead is adopted: the LR decays on through the lookahead's
    steps and rewinds to the peak where it ended, exactly like a fixed run with lr.rewind_at there;
    a resume from the step after the adoption keeps the moved rewind."""
    raw = copy.deepcopy(RAW)
    raw["model"].update(hidden=16, ffn=16, heads=2, layers=1)
    raw["train"].update(steps=64)
    raw["growth"] = {"defaults": {"phi": 3}, "auto": {"check_every": 6, "probe_steps": 3},
                     "stages": [{"at_step": "auto", "hidden": 24, "rewind_lr": True},
                                {"at_step": "auto", "ffn": 64, "rewind_lr": True}]}
    auto = Trainer(config_from_dict(copy.deepcopy(raw)), out_dir=tmp_path / "auto", progress=False).run()
    adopted = [c for c in _records(tmp_path / "auto", "growth_check") if c["adopted"]]
    assert [c["stage"] for c in adopted] == [0], "stage 0's lookahead must be adopted for this test"
    grew, rewind = adopted[0]["step"], adopted[0]["step"] + 3 + 3  # + phi + probe_steps
    lrs = {r["step"]: r["lr"] for r in _records(tmp_path / "auto", "train")}
    assert lrs[grew] < lrs[grew - 1] and lrs[rewind - 1] < lrs[grew] and lrs[rewind] == raw["optimizer"]["lr"]
    decided = {g["stage"]: g["step"] for g in _records(tmp_path / "auto", "growth")}
    fixed = copy.deepcopy(raw)
    fixed["growth"] = {"defaults": {"phi": 3}, "stages": [
        {"at_step": decided[0], "hidden": 24, "rewind_lr": False}, {"at_step": decided[1], "ffn": 64, "rewind_lr": True}]}
    fixed["lr"] = {**fixed["lr"], "rewind_at": [rewind]}
    ref = Trainer(config_from_dict(fixed), out_dir=tmp_path / "fixed", progress=False).run()
    assert ref.losses == auto.losses and ref.valid_losses == auto.valid_losses
    # Stop right after the adopted lookahead, resume: the same losses (the checkpoint kept the moved rewind).
    resumed = copy.deepcopy(raw)
    first = Trainer(config_from_dict(resumed), out_dir=tmp_path / "resumed", progress=False).run(max_steps=rewind + 1)
    assert first.final_step == rewind + 1
    rest = Trainer(config_from_dict(resumed), out_dir=tmp_path / "resumed", progress=False).run()
    assert {**first.losses, **rest.losses} == auto.losses


def test_a_resumed_auto_run_decides_and_trains_identically(auto_run, tmp_path):
    """Stopped every 7 steps (inside measuring windows, between a lookahead and the growth it chose,
    inside ramps) and resumed: the same decisions and the same losses as the uninterrupted run."""
    out, result, decided = auto_run
    cfg = config_from_dict(_raw(check_every=8, probe_steps=4))
    losses, done = {}, 0
    while done < STEPS:
        part = Trainer(cfg, out_dir=tmp_path, progress=False).run(max_steps=7)
        losses.update(part.losses)
        done = part.final_step
    assert losses == result.losses
    assert {g["stage"]: g["step"] for g in _records(tmp_path, "growth")} == decided
    assert _records(tmp_path, "growth_check") == [{**c, "time_s": r["time_s"]} for c, r in
                                                  zip(_records(out, "growth_check"),
                                                      _records(tmp_path, "growth_check"))]


def test_stopping_lookaheads_early_changes_no_decision_and_costs_less(tmp_path):
    """Windows from the ramp's end (include_ramp: false), the same run with every lookahead trained
    to the end of its window (stop_early: false): each check the early-stopping run cut short said
    "wait" there too, over a whole-window rate no higher than the half's (the decelerating curve the
    early stop relies on), so both runs decide and train alike, and early stops spend less on
    thrown-away lookaheads.  (With the ramp in the window a ramp that first raises the loss breaks
    the premise: this run's last stage then says "wait" cut short and "grow" over its whole window.)"""
    out, other = tmp_path / "cut", tmp_path / "whole"
    # Both on the same check grid: without the early stop a "wait" costs more, which would drop more
    # checks near a deadline (skip_near_deadline).
    result = Trainer(config_from_dict(_raw(check_every=8, probe_steps=4, include_ramp=False, skip_near_deadline=False)),
                     out_dir=out, progress=False).run()
    decided = {g["stage"]: g["step"] for g in _records(out, "growth")}
    full = Trainer(config_from_dict(_raw(check_every=8, probe_steps=4, stop_early=False, include_ramp=False,
                                         skip_near_deadline=False)), out_dir=other, progress=False).run()
    assert full.losses == result.losses and {g["stage"]: g["step"] for g in _records(other, "growth")} == decided
    cut, whole = _records(out, "growth_check"), _records(other, "growth_check")
    stopped = [(c, w) for c, w in zip(cut, whole) if c["stopped_early"]]
    assert stopped, "no lookahead stopped early: the test would not exercise it"
    for c, w in stopped:
        assert (c["step"], c["decision"], w["decision"]) == (w["step"], "wait", "wait")
        assert w["rate_grown"] <= c["rate_grown"] < compared_rate(c["rate_current"], c["rate_current_ahead"])
        assert c["grown_settled"] == w["grown_settled"] and c["probe_flops"] < w["probe_flops"]
    assert not any(w["stopped_early"] for w in whole)
    assert sum(c["probe_flops"] for c in cut) < sum(w["probe_flops"] for w in whole)


def test_the_grown_window_starts_at_the_growth_where_msg_keeps_the_current_loss(auto_run):
    """The default (include_ramp) measures the grown rate from right after growing: MSG preserves the
    function, so that probe loss is the current one, and the rate is its drop over every grown step
    the lookahead trained (ramp and window; half the window where it stopped early)."""
    out, _, _ = auto_run
    from megatron_msg.growth.auto_timing import step_flops
    cfg = config_from_dict(_raw(check_every=8, probe_steps=4))
    looked = [c for c in _records(out, "growth_check") if c["grown_after"] is not None and c["grown_start"] is not None]
    assert looked, "no lookahead ran"
    for c in looked:
        assert c["grown_start"] == pytest.approx(c["loss_now"], rel=1e-6)
        stage = cfg.resolved_stages({})[c["stage"]]
        flops = step_flops(cfg.model.with_shape(stage.shape), cfg.train.batch_size)
        steps = stage.phi + (2 if c["stopped_early"] else 4)
        assert c["rate_grown"] == pytest.approx((c["grown_start"] - c["grown_after"]) / (steps * flops))


def test_the_lookaheads_are_counted_in_the_run_flops(auto_run):
    from megatron_msg.growth.plan import plan_schedule
    from megatron_msg.training.compare import load_run
    out, _, decided = auto_run
    curves = load_run(out)
    probes = sum(c["probe_flops"] for c in _records(out, "growth_check"))
    assert probes > 0 and len(curves.lookaheads) == sum(1 for c in _records(out, "growth_check") if c["probe_flops"])
    schedule = sum(p.flops for p in plan_schedule(curves.cfg, decided))
    assert curves.flops_after(STEPS - 1) == schedule + probes
    assert [p.first_step for p in curves.plans[1:]] == [decided[k] for k in range(5)]


def _dp2(rank, world, raw, out_dir):
    from megatron_msg.parallel.launch import LaunchEnv, init_parallel
    cfg = config_from_dict(raw)
    ps = init_parallel(cfg.parallel, "cpu", LaunchEnv(rank, world, rank))
    res = Trainer(cfg, out_dir=out_dir, progress=False, parallel=ps).run()
    return res.losses


def test_auto_timing_under_data_parallel_zero2_rolls_back_the_partitioned_optimizer(tmp_path):
    """DP2 with ZeRO-2, two hand-listed auto stages: every replica takes the same decisions (the probe
    loss is all-reduced), and the run equals the DP2 fixed run at the steps it decided."""
    raw = copy.deepcopy(RAW)
    raw["model"].update(hidden=16, ffn=16, heads=2, layers=1)
    raw["train"].update(steps=64, batch_size=2, grad_accum=2)  # the single-process run's 4 samples per step
    # Lookaheads never adopted: the run must equal the fixed one at its steps, rewinds included.
    raw["growth"] = {"defaults": {"phi": 3}, "auto": {"check_every": 6, "probe_steps": 3, "adopt_lookahead": False},
                     "stages": [{"at_step": "auto", "ffn": 64, "rewind_lr": True}, {"at_step": "auto", "layers": 2}]}
    raw["parallel"] = {"dp": 2, "zero_stage": 2}
    auto = run_distributed(_dp2, 2, args=(raw, tmp_path / "auto"))
    decided = {g["stage"]: g["step"] for g in _records(tmp_path / "auto", "growth")}
    assert sorted(decided) == [0, 1]
    assert any(c["decision"] == "wait" and c["probe_flops"] for c in _records(tmp_path / "auto", "growth_check"))
    fixed = copy.deepcopy(raw)
    for k, stage in enumerate(fixed["growth"]["stages"]):
        stage["at_step"] = decided[k]
    fixed = run_distributed(_dp2, 2, args=(fixed, tmp_path / "fixed"))
    assert auto[0] == fixed[0] and auto[0] == auto[1]
