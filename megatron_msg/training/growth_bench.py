"""``msg-bench growth``: does growth pay on *this* corpus and hardware, and is it the operator or the
LR schedule that pays?

One command trains, one after another with the same data order, seed and LR recipe:

* ``full``: the target shape from step 0;
* ``full_rewinds``: the same, with the growth schedule's LR rewinds at the same steps
  (``lr.rewind_at``), the control that separates the operator from the LR schedule;
* the ``sch1`` schedule of the target (named_schedules.py; ``--schedule sch0|rapid`` for the
  others) with each operator: ``msg``,
  ``nomask``, ``net2net`` and ``stack`` (stack grows depth only; its width stages use ``nomask``,
  direct growth without masks, so the pair is the usual stacking baseline);
* ``msg_no_rewinds``: the MSG schedule without its LR rewinds, the other control;
* ``msg_partial_rewinds`` and ``msg_fast_decay``: the other LR policies across growths the paper's
  rewind is measured against, a rewind to half the peak (``lr.rewind_peak``) and a rewind to the
  peak that reaches the floor in half the steps left (``lr.rewind_decay``, LEMON's faster decay);
* ``msg_auto``: the schedule's shapes with MSG, every step decided by the trainer (``at_step: auto``,
  growth/auto_timing.py); its lookaheads' FLOPs and time count in its totals;
* ``msg_deadlines``: the same shapes with every stage at the step ``msg_auto`` grows it at the
  latest (``growth.auto.reserve``), no lookahead: the rule's fallback alone, the control that says
  what measuring buys.

``--runs`` picks a subset; ``--growth-budget F`` gives the growth runs F times the references'
steps (their schedules made for that budget), so a grown run can go on until it reaches the
full-size run's final loss (the paper's Sch1-G trains longer than its full-size baseline).

Every run is compared with both full-size references (training/compare.py): FLOPs and training
wall time to its own final validation loss ("not reached" where the reference never gets there),
the speed-ups they give, the reference's loss at the run's own FLOP budget, and the FLOPs and time
the run needed to reach the reference's final loss.  ``--seeds N``
repeats the growth runs (and the references) with N seeds, so a difference can be read against
the seed spread; msg is then compared per seed with each other operator and with its own
schedule under each other LR policy.  Output: ``growth.json`` (the report), ``growth.md``
(tables), ``growth.png`` (validation loss against FLOPs and against wall time, growth events
marked) and the run directories under ``runs/``.

Sizes: ``tiny`` (CPU, about a minute: the CI smoke test), ``small`` (CPU, under an hour: the
docs/benchmarks.md tables), ``gpu`` (GPT-2-small's shape, under 10 minutes on one H100/H200).
"""
from __future__ import annotations

import copy
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from megatron_msg.config import ConfigError, RunConfig, config_from_dict
from megatron_msg.data.fileio import atomic_write_bytes, atomic_write_json
from megatron_msg.growth.auto_timing import AutoTiming
from megatron_msg.named_schedules import SCHEDULES
from megatron_msg.training.compare import RunCurves, compare, flops_to_reach, load_run
from megatron_msg.training.plot import save_figure


@dataclass(frozen=True)
class GrowthBenchSize:
    hidden: int
    ffn: int
    heads: int
    layers: int
    head_dim: int
    seq_len: int
    steps: int
    batch_size: int
    eval_interval: int
    eval_iters: int
    lr: float
    device: str


SIZES = {
    "tiny": GrowthBenchSize(48, 128, 3, 4, 16, 32, 144, 8, 24, 2, 3e-3, "cpu"),
    "small": GrowthBenchSize(128, 512, 4, 8, 32, 128, 1500, 16, 75, 8, 2e-3, "cpu"),
    "gpu": GrowthBenchSize(768, 3072, 12, 12, 64, 512, 1200, 32, 100, 8, 6e-4, "cuda"),
}
OPERATORS = ("msg", "nomask", "net2net", "stack")
# The LR policies across growths besides the schedule's own rewinds and none: run kind -> lr.* settings.
LR_POLICIES = {"msg_partial_rewinds": {"rewind_peak": 0.5}, "msg_fast_decay": {"rewind_decay": 0.5}}
SAME_SCHEDULE_LR_KINDS = ("msg_no_rewinds", *LR_POLICIES)  # msg's schedule, another LR policy
RUN_KINDS = ("full", "full_rewinds", *OPERATORS, *SAME_SCHEDULE_LR_KINDS, "msg_auto", "msg_deadlines")
STACK_WIDTH_OPERATOR = "nomask"  # stacking grows depth only; its width stages use this
FINISHED_RUNS = "finished_runs.json"  # names of the runs this invocation trained to the end (or kept)


@dataclass(frozen=True)
class BenchRun:
    name: str
    raw: dict
    seed: int
    operator: str | None  # None: full size from step 0
    lr_policy: str        # "rewinds" (the schedule's), "none", or one of LR_POLICIES' (policy_name)
    kind: str = ""        # one of RUN_KINDS
    timing: str = "fixed"  # "auto": at_step auto; "deadlines": fixed at the auto stages' latest steps


@dataclass(frozen=True)
class Corpus:
    data: dict              # the config's data section
    vocab_size: int | None  # None: the byte tokenizer's


def target_raw(size: GrowthBenchSize, corpus: Corpus, seed: int) -> dict:
    """The full-size run: the target from step 0, with the recipe every run shares."""
    vocab = {} if corpus.vocab_size is None else {"vocab_size": corpus.vocab_size}
    return {
        "model": {"arch": "gpt", "hidden": size.hidden, "ffn": size.ffn, "heads": size.heads, "layers": size.layers,
                  "head_dim": size.head_dim, "seq_len": size.seq_len, "dropout": 0.0, **vocab},
        "optimizer": {"lr": size.lr, "min_lr": size.lr / 10, "weight_decay": 0.1, "beta2": 0.95, "grad_clip": 1.0},
        "lr": {"warmup_steps": max(1, size.steps // 50), "decay": "cosine"},
        "train": {"steps": size.steps, "batch_size": size.batch_size, "eval_interval": size.eval_interval,
                  "eval_iters": size.eval_iters, "log_interval": max(1, size.eval_interval // 2),
                  "save_interval": size.steps, "seed": seed, "device": size.device,
                  "dtype": "bf16" if size.device == "cuda" else "fp32", "tensorboard": False, "plot": False},
        "data": {**corpus.data, "seed": seed},
    }


def schedule_raw(full: dict, operator: str, rewinds: bool, budget: float = 1.0, auto: bool = False,
                 schedule: str = "sch1") -> dict:
    """The named ``schedule`` of ``full``'s target with ``operator`` (stack: depth only, nomask for
    width), made for ``budget`` times ``full``'s steps; ``auto``: the same shapes at steps the
    trainer decides."""
    raw = copy.deepcopy(full)
    raw["train"]["steps"] = round(full["train"]["steps"] * budget)
    raw["train"]["save_interval"] = raw["train"]["steps"]
    raw["growth"] = {"schedule": schedule, "defaults": {"operator": operator}}
    made = config_from_dict(copy.deepcopy(raw), check=False)
    stages = []
    layers = made.model.layers
    for st in made.growth.stages:
        stage = {k: v for k, v in asdict(st).items() if v is not None}
        if operator == "stack" and st.layers == layers:
            stage["operator"] = STACK_WIDTH_OPERATOR
        if not rewinds:
            stage["rewind_lr"] = False
        if auto:
            stage["at_step"] = "auto"
        stages.append(stage)
        layers = st.layers
    raw["model"].update(hidden=made.model.hidden, ffn=made.model.ffn, heads=made.model.heads,
                        layers=made.model.layers)
    raw["growth"] = {"defaults": {"operator": operator}, "stages": stages}
    return raw


def at_deadlines(auto_raw: dict) -> dict:
    """``auto_raw`` (every stage ``at_step: auto``) with each stage fixed at the step the rule grows
    it at the latest: stage k of n at ``steps * (1 - (n - k) * growth.auto.reserve)``."""
    raw = copy.deepcopy(auto_raw)
    cfg = config_from_dict(copy.deepcopy(raw), check=False)
    resolved = cfg.resolved_stages()
    timing = AutoTiming.from_config(cfg, resolved)
    for stage, st in zip(raw["growth"]["stages"], resolved):
        assert st.auto, "at_deadlines takes an auto schedule"
        stage["at_step"] = timing.latest(st.index)
    return raw


def policy_name(lr: dict) -> str:
    """How a run's rewinds differ from the paper's, as the report's LR column says it."""
    parts = [f"{lr['rewind_peak']:g} x peak" if "rewind_peak" in lr else "",
             f"floor after {lr['rewind_decay']:g} of the rest" if "rewind_decay" in lr else ""]
    return "rewinds (" + ", ".join(p for p in parts if p) + ")"


def rewind_steps(raw: dict) -> list[int]:
    return [s["at_step"] for s in raw["growth"]["stages"] if s.get("rewind_lr")]


def bench_runs(size: GrowthBenchSize, corpus: Corpus, seeds: int, kinds: tuple[str, ...] = RUN_KINDS,
               budget: float = 1.0, schedule: str = "sch1") -> list[BenchRun]:
    """The runs of ``kinds`` for every seed; ``full`` always (every run is compared with it)."""
    runs = []
    for seed in range(seeds):
        tag = f"_s{seed}" if seeds > 1 else ""
        full = target_raw(size, corpus, seed)
        def grown(operator: str, rewinds: bool = True, auto: bool = False) -> dict:
            return schedule_raw(full, operator, rewinds, budget, auto, schedule)
        msg = grown("msg")
        with_rewinds = copy.deepcopy(full)
        # The growth schedule's rewinds, scaled back to the references' steps.
        with_rewinds["lr"]["rewind_at"] = sorted({max(1, round(r / budget)) for r in rewind_steps(msg)})
        made = {"full": BenchRun(f"full{tag}", full, seed, None, "none", "full"),
                "full_rewinds": BenchRun(f"full_rewinds{tag}", with_rewinds, seed, None, "rewinds", "full_rewinds")}
        for op in OPERATORS:
            made[op] = BenchRun(f"{op}{tag}", grown(op), seed, op, "rewinds", op)
        made["msg_no_rewinds"] = BenchRun(f"msg_no_rewinds{tag}", grown("msg", rewinds=False), seed, "msg", "none",
                                          "msg_no_rewinds")
        for kind, lr in LR_POLICIES.items():
            raw = grown("msg")
            raw["lr"].update(lr)
            made[kind] = BenchRun(f"{kind}{tag}", raw, seed, "msg", policy_name(lr), kind)
        made["msg_auto"] = BenchRun(f"msg_auto{tag}", grown("msg", auto=True), seed, "msg", "rewinds", "msg_auto",
                                    timing="auto")
        made["msg_deadlines"] = BenchRun(f"msg_deadlines{tag}", at_deadlines(made["msg_auto"].raw), seed, "msg",
                                         "rewinds", "msg_deadlines", timing="deadlines")
        runs += [made[k] for k in RUN_KINDS if k == "full" or k in kinds]
    return runs


def prepare_corpus(corpus: Path, out: Path, vocab: int) -> Corpus:
    """The jsonl read directly (byte tokenizer), or with ``vocab`` > 0 a sentencepiece tokenizer
    trained on it and the corpus preprocessed with it."""
    if vocab <= 0:
        return Corpus({"format": "jsonl", "path": str(corpus)}, None)
    from megatron_msg.data.preprocessing import PreprocessConfig, preprocess_jsonl
    from megatron_msg.data.tokenizer_training import TokenizerTrainConfig, train_sentencepiece
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    model = train_sentencepiece(TokenizerTrainConfig(inputs=[str(corpus)], model_prefix=str(data_dir / "spm"),
                                                     vocab_size=vocab))
    stats = preprocess_jsonl(PreprocessConfig(inputs=[str(corpus)], output_prefix=str(data_dir / "corpus"),
                                              tokenizer="sentencepiece", tokenizer_model=model, progress=False))
    return Corpus({"format": "indexed", "path": stats.prefix, "tokenizer": "sentencepiece",
                   "tokenizer_model": model}, vocab)


class BenchStopped(RuntimeError):
    """A stop request (SIGTERM/SIGINT) ended a run before its last step: the benchmark stops too."""


def _without_growth(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "growth"}


def _checkpointed_step(run_dir: Path, cfg: RunConfig) -> int | None:
    """The step of ``run_dir``'s latest checkpoint when it holds this very run (same config), else None."""
    from megatron_msg.checkpoint.io import CheckpointError, latest_checkpoint, open_checkpoint
    try:
        last = latest_checkpoint(run_dir, report=None)
        state = open_checkpoint(last).state if last is not None else None
    except CheckpointError:
        return None
    if state is None:
        return None
    if state["config"] == cfg.to_dict():
        return state["step"]
    if not cfg.growth.stages and not state["config"].get("growth", {}).get("stages"):
        # A run that never grows: growth.defaults (whose defaults may have changed since) train nothing.
        same = _without_growth(state["config"]) == _without_growth(cfg.to_dict())
        return state["step"] if same else None
    if any(st.auto for st in cfg.resolved_stages()):
        return None  # what an auto run did depends on growth.auto fields added since (adopt_lookahead)
    try:  # a fixed run: through today's loader, so a field added since at its default is the same run
        same = config_from_dict(copy.deepcopy(state["config"]), check=False).to_dict() == cfg.to_dict()
    except ConfigError:
        return None
    return state["step"] if same else None


def _train(run: BenchRun, out: Path, log, keep: bool = False) -> None:
    """Train ``run`` into ``out/runs/<name>``; with ``keep`` a finished run is kept and an
    interrupted one resumed (runs are deterministic and resume bit-exactly)."""
    from megatron_msg.training.trainer import Trainer
    cfg: RunConfig = config_from_dict(copy.deepcopy(run.raw))
    run_dir = out / "runs" / run.name
    at = _checkpointed_step(run_dir, cfg) if keep else None
    if at == cfg.train.steps:
        log(f"{run.name}: kept (already trained to step {cfg.train.steps} with this config)")
        return
    if at is not None:
        log(f"{run.name}: resuming from step {at}")
    start = time.perf_counter()
    result = Trainer(cfg, out_dir=run_dir, resume=at is not None, progress=False).run()
    if result.interrupted:
        # Going on to the next run would leave this one half-trained in the report.
        raise BenchStopped(f"stopped during run {run.name} at step {result.final_step}; "
                           "run the same command with --keep-runs to resume it")
    last = result.valid_losses[max(result.valid_losses)]
    log(f"{run.name}: {len(cfg.growth.stages)} growth events, final validation loss {last:.4f}, "
        f"{time.perf_counter() - start:.1f} s")


def _row_summary(row: dict, to_reference: dict) -> dict:
    """``row``: the run at its own final loss; ``to_reference``: the run at the reference's."""
    keep = ("flops", "time_s", "final_valid_loss", "reference_flops_to_final_loss", "speedup_at_final_loss",
            "reference_time_to_final_loss_s", "wall_speedup_at_final_loss", "reference_loss_at_budget")
    out = {k: row[k] for k in keep}
    out.update(flops_to_reference_final_loss=to_reference["flops_to_target"],
               speedup_to_reference_final_loss=to_reference["speedup"],
               time_to_reference_final_loss_s=to_reference["time_to_target_s"],
               wall_speedup_to_reference_final_loss=to_reference["wall_speedup"])
    return out


def report(runs: list[BenchRun], curves: dict[str, RunCurves], size_name: str, corpus: str,
           budget: float = 1.0, schedule: str = "sch1") -> dict:
    """Every run against ``full`` and ``full_rewinds`` of its seed."""
    references = {(r.seed, r.lr_policy): r.name for r in runs if r.operator is None}
    rows = []
    for r in runs:
        curve = curves[r.name]
        entry = {"run": r.name, "kind": r.kind, "seed": r.seed, "operator": r.operator or "full size",
                 "width_operator": STACK_WIDTH_OPERATOR if r.operator == "stack" else r.operator,
                 "lr_policy": r.lr_policy, "timing": r.timing, "steps": r.raw["train"]["steps"],
                 "growth_events": len(curve.growths),
                 "growth_steps": [g["step"] for g in curve.growths],
                 # probe loss right after each growth minus right before: 0 for an exact growth (msg;
                 # net2net's FFN and heads), what nomask's new units and the copies of net2net's
                 # hidden and depth and of stack cost at once.
                 "growth_loss_jumps": [g["loss_after"] - g["loss_before"] for g in curve.growths
                                       if g.get("loss_after") is not None and g.get("loss_before") is not None],
                 "lookaheads": len(curve.lookaheads), "lookahead_flops": sum(f for _, f in curve.lookaheads),
                 "adopted_lookaheads": sum(1 for c in curve.checks if c.get("adopted")),
                 "stopped_lookaheads": sum(1 for c in curve.checks if c.get("stopped_early"))}
        for ref, policy in (("full", "none"), ("full_rewinds", "rewinds")):
            if (r.seed, policy) not in references:
                continue
            reference = curves[references[r.seed, policy]]
            _, cmp_rows = compare([reference, curve])
            _, to_ref = compare([reference, curve], target=reference.valid[-1][1])
            entry["vs_" + ref] = _row_summary(cmp_rows[1], to_ref[1])
            if curve.lookaheads:  # what the decided steps alone cost: timing apart from lookahead overhead
                bare = replace(curve, lookaheads=[])
                entry["vs_" + ref]["flops_to_reference_final_loss_without_lookaheads"] = flops_to_reach(
                    bare.valid_by_flops(), reference.valid[-1][1])
        rows.append(entry)
    first = runs[0].raw
    made = config_from_dict(copy.deepcopy(schedule_raw(first, "msg", True, budget, schedule=schedule)), check=False)
    return {"size": size_name, "corpus": corpus, "device": first["train"]["device"],
            "target": str(config_from_dict(copy.deepcopy(first), check=False).model.shape),
            "steps": first["train"]["steps"], "growth_budget": budget, "growth_steps": made.train.steps,
            "schedule": schedule, "start": str(made.model.shape),
            "stages": [{"at_step": s.at_step, "shape": str(s.shape), "rewind_lr": s.rewind_lr, "phi": s.phi}
                       for s in made.resolved_stages()],
            "date": time.strftime("%Y-%m-%d"), "runs": rows, "seeds": seed_summary(rows)}


def seed_summary(rows: list[dict]) -> dict:
    """With two or more seeds: per run kind, the final validation loss's mean and spread (max - min)
    and the FLOPs to ``full``'s final loss per seed; and MSG against each other operator and each
    other LR policy on its schedule, the other run's final loss minus MSG's per seed (> 0: MSG ends
    lower), and whether MSG ends lower on every seed by more than the larger of the two seed
    spreads on average."""
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    if max(len(rs) for rs in by_kind.values()) < 2:
        return {}
    kinds = {}
    for kind, rs in by_kind.items():
        finals = [r["vs_full"]["final_valid_loss"] for r in rs]
        jumps = [max(r["growth_loss_jumps"]) for r in rs if r.get("growth_loss_jumps")]
        kinds[kind] = {"seeds": [r["seed"] for r in rs], "final_loss_mean": sum(finals) / len(finals),
                       "largest_growth_loss_jump_mean": sum(jumps) / len(jumps) if jumps else None,
                       "final_loss_spread": max(finals) - min(finals),
                       "flops_to_full_final_loss": [r["vs_full"]["flops_to_reference_final_loss"] for r in rs]}
    msg_against = {}
    # The other operators on msg's schedule, and msg on it with another LR policy: each differs
    # from msg in one thing, so the per-seed difference is that thing's effect.
    for other in (*OPERATORS, *SAME_SCHEDULE_LR_KINDS):
        if other == "msg" or other not in by_kind or "msg" not in by_kind:
            continue
        msg_final = {r["seed"]: r["vs_full"]["final_valid_loss"] for r in by_kind["msg"]}
        diffs = [r["vs_full"]["final_valid_loss"] - msg_final[r["seed"]] for r in by_kind[other]
                 if r["seed"] in msg_final]
        spread = max(kinds["msg"]["final_loss_spread"], kinds[other]["final_loss_spread"])
        mean = sum(diffs) / len(diffs)
        # The spread of the paired differences themselves: what the seed does to the comparison,
        # without what it does to every run kind alike (shared data order and initialisation).
        msg_against[other] = {"difference_per_seed": diffs, "mean_difference": mean, "seed_spread": spread,
                              "difference_spread": max(diffs) - min(diffs),
                              "msg_lower_beyond_spread": all(d > 0 for d in diffs) and mean > spread}
    return {"kinds": kinds, "msg_against": msg_against}


def _fmt(x, kind: str) -> str:
    if x is None:
        return "not reached"
    return {"flops": f"{x:.3g}", "s": f"{x:.1f}", "x": f"{x:.2f}x", "loss": f"{x:.4f}"}[kind]


def format_report(rep: dict) -> str:
    budget = rep.get("growth_budget", 1.0)
    lines = [f"msg-bench growth --size {rep['size']} on {rep['corpus']} ({rep['device']}), {rep['date']}: "
             f"target {rep['target']}, {rep['steps']} steps"
             + (f" (growth runs {rep['growth_steps']} steps, --growth-budget {budget:g})" if budget != 1.0 else "")
             + f"; {rep.get('schedule', 'sch1')} from {rep['start']}, growth at "
             + ", ".join(f"{s['at_step']} -> {s['shape']}" for s in rep["stages"]), ""]
    for r in rep["runs"]:
        if r.get("timing") == "auto":
            bare = r["vs_full"].get("flops_to_reference_final_loss_without_lookaheads")
            kept, stopped = r.get("adopted_lookaheads", 0), r.get("stopped_lookaheads", 0)
            lines += [f"`{r['run']}` (at_step auto) grew at steps {', '.join(map(str, r['growth_steps']))}; "
                      + (f"{kept} lookaheads kept (their steps are the run's); " if kept else "")
                      + f"{r['lookaheads']} thrown away"
                      + (f" ({stopped} stopped after half their window)" if stopped else "")
                      + f" spent {_fmt(r['lookahead_flops'], 'flops')} FLOPs (counted in its FLOPs and time)"
                      + (f"; without them its steps reach `full`'s final loss with {_fmt(bare, 'flops')} FLOPs"
                         if r["lookaheads"] else "") + ".", ""]
    for ref in ("full", "full_rewinds"):
        if not any("vs_" + ref in r for r in rep["runs"]):
            continue
        lines += [f"Against `{ref}` (full size from step 0, LR policy: "
                  f"{'the schedule' + chr(39) + 's rewinds' if ref == 'full_rewinds' else 'no rewinds'}):", "",
                  "| run | operator (width) | LR rewinds | timing | FLOPs | train s | final loss | ref FLOPs to it "
                  "| speed-up FLOPs | ref s to it | speed-up wall | ref loss at this budget "
                  "| FLOPs to ref's final loss | speed-up | s to it | speed-up wall |",
                  "|" + "---|" * 16]
        for r in rep["runs"]:
            v = r["vs_" + ref]
            op = r["operator"] if r["width_operator"] in (None, r["operator"]) else f"{r['operator']} ({r['width_operator']})"
            lines.append(f"| {r['run']} | {op} | {r['lr_policy']} | {r.get('timing', 'fixed')} | "
                         f"{_fmt(v['flops'], 'flops')} | "
                         f"{_fmt(v['time_s'], 's')} | {_fmt(v['final_valid_loss'], 'loss')} | "
                         f"{_fmt(v['reference_flops_to_final_loss'], 'flops')} | "
                         f"{_fmt(v['speedup_at_final_loss'], 'x')} | {_fmt(v['reference_time_to_final_loss_s'], 's')} | "
                         f"{_fmt(v['wall_speedup_at_final_loss'], 'x')} | {_fmt(v['reference_loss_at_budget'], 'loss')} | "
                         f"{_fmt(v['flops_to_reference_final_loss'], 'flops')} | "
                         f"{_fmt(v['speedup_to_reference_final_loss'], 'x')} | "
                         f"{_fmt(v['time_to_reference_final_loss_s'], 's')} | "
                         f"{_fmt(v['wall_speedup_to_reference_final_loss'], 'x')} |")
        lines.append("")
    return "\n".join(lines + _format_seeds(rep.get("seeds") or {}))


def _format_seeds(summary: dict) -> list[str]:
    if not summary:
        return []
    lines = ["Across seeds (final validation loss: mean and spread, max - min; the largest probe-loss jump at a "
             "growth event, mean over seeds; FLOPs to `full`'s final loss per seed):", "",
             "| run | seeds | final loss mean | spread | largest jump at a growth | FLOPs to full's final loss |",
             "|---|---|---|---|---|---|"]
    for kind, k in summary["kinds"].items():
        jump = k.get("largest_growth_loss_jump_mean")
        lines.append(f"| {kind} | {len(k['seeds'])} | {_fmt(k['final_loss_mean'], 'loss')} | "
                     f"{_fmt(k['final_loss_spread'], 'loss')} | {'-' if jump is None else f'{jump:+.4f}'} | "
                     f"{', '.join(_fmt(f, 'flops') for f in k['flops_to_full_final_loss'])} |")
    lines.append("")
    for other, m in summary["msg_against"].items():
        lines.append(f"msg against {other}: {other}'s final loss minus msg's per seed "
                     f"{', '.join(f'{d:+.4f}' for d in m['difference_per_seed'])} (mean {m['mean_difference']:+.4f}), "
                     f"seed spread {m['seed_spread']:.4f} (of the differences: {m['difference_spread']:.4f}): "
                     "msg ends lower beyond the seed spread: "
                     f"{'yes' if m['msg_lower_beyond_spread'] else 'no'}.")
    return lines + [""] if summary["msg_against"] else lines


def plot_report(runs: list[BenchRun], curves: dict[str, RunCurves], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (by_flops, by_time) = plt.subplots(1, 2, figsize=(14, 5))
    for r in runs:
        curve = curves[r.name]
        style = "--" if r.operator is None else "-"
        (line,) = by_flops.plot(*zip(*curve.valid_by_flops()), style, lw=1.2, label=r.name)
        timed = curve.valid_by_time()
        if timed:
            by_time.plot(*zip(*timed), style, lw=1.2, color=line.get_color(), label=r.name)
        for g in curve.growths:
            by_flops.axvline(curve.flops_after(g["step"] - 1), color=line.get_color(), ls=":", lw=0.6)
            if "time_s" in g:
                by_time.axvline(g["time_s"], color=line.get_color(), ls=":", lw=0.6)
    by_flops.set_xlabel("training FLOPs")
    by_time.set_xlabel("training wall time (s)")
    by_flops.set_ylabel("validation loss")
    by_time.set_ylabel("validation loss")
    by_time.legend(loc="upper right")
    by_time.grid(alpha=0.3)
    fig.suptitle("msg-bench growth: validation loss per FLOP and per second (dotted: growth events)")
    return save_figure(fig, by_flops, path)


def run_growth_bench(out_dir: str, size_name: str, corpus: str | None, vocab: int, seeds: int,
                     log=lambda text: print(text, flush=True), kinds: tuple[str, ...] = RUN_KINDS,
                     budget: float = 1.0, keep_runs: bool = False, schedule: str = "sch1") -> dict:
    """Train every run of the benchmark into ``out_dir/runs`` and write the report beside it."""
    from megatron_msg.training.batches import BUNDLED_CORPUS
    size = SIZES[size_name]
    out = Path(out_dir)
    corpus_path = Path(corpus) if corpus else BUNDLED_CORPUS
    if not corpus_path.is_file():
        raise FileNotFoundError(f"--corpus: no such file {corpus_path}")
    unknown = sorted(set(kinds) - set(RUN_KINDS))
    if unknown:
        raise ValueError(f"--runs: {', '.join(unknown)} is not one of {', '.join(RUN_KINDS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"--schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if budget <= 0:
        raise ValueError(f"--growth-budget: must be > 0, got {budget}")
    if (out / "runs").exists() and not keep_runs:
        shutil.rmtree(out / "runs")  # a benchmark starts over: stale runs would be compared
    runs = bench_runs(size, prepare_corpus(corpus_path, out, vocab), seeds, tuple(kinds), budget, schedule)
    finished: list[str] = []
    for i, run in enumerate(runs):
        log(f"[{i + 1}/{len(runs)}] {run.name}")
        _train(run, out, log, keep_runs)
        # What a killed benchmark completed, for a wrapper that reports over those (tools/gpu_session.sh).
        finished.append(run.name)
        atomic_write_json(str(out / FINISHED_RUNS), finished)
    curves = {r.name: load_run(out / "runs" / r.name, r.name) for r in runs}  # read once: report and plot
    rep = report(runs, curves, size_name, "bundled" if corpus is None else str(corpus_path), budget, schedule)
    atomic_write_json(str(out / "growth.json"), rep)
    text = format_report(rep)
    atomic_write_bytes(str(out / "growth.md"), (text + "\n").encode("utf-8"))
    plot_report(runs, curves, out / "growth.png")
    print(text, file=sys.stdout, flush=True)
    return rep

