"""msg-train: run a (multi-stage) growth schedule from a YAML config.

    msg-train                         # the bundled tiny GPT demo on CPU
    msg-train CONFIG.yaml --set train.steps=2000 --set growth.stages[0].phi=50
    msg-train CONFIG.yaml --validate  # check the config and print the schedule

    # tensor x pipeline x data parallel (processes = tp * pp * dp), on CPU (gloo) or GPUs (nccl):
    torchrun --nproc-per-node 4 -m megatron_msg.cli.train CONFIG --set parallel.tp=2 --set parallel.pp=2
    deepspeed --hostfile HOSTFILE --module megatron_msg.cli.train CONFIG --set parallel.tp=8 ...
"""
from __future__ import annotations

import argparse
import sys
import time

from megatron_msg.cli.config_args import add_config_arguments, load_cli_config, resolve_config_path
from megatron_msg.config import ConfigError, load_config

def _batch(micro: int, accum: int, seq_len: int) -> str:
    tokens = micro * accum * seq_len
    size = f"{tokens / 1e6:.2f}M" if tokens >= 1e6 else f"{tokens:,}"
    return f"batch {micro}x{accum}={micro * accum} ({size} tokens)"


def _lr(peak: float, floor: float, warmup: int) -> str:
    return f"lr {peak:g}->{floor:g} warmup {warmup}"


def describe_schedule(cfg) -> str:
    """The schedule as --validate prints it: every stage's shape, operator and training settings."""
    from megatron_msg.growth.operators import GrowthSpec
    t, seq = cfg.train, cfg.model.seq_len
    lines = [f"{cfg.model.arch} start {cfg.model.shape}, head_dim {cfg.model.head_dim}, {t.steps} steps; "
             f"tp{cfg.parallel.tp} x pp{cfg.parallel.pp} x dp{cfg.parallel.dp}; "
             f"{_batch(t.batch_size, t.grad_accum, seq)}; "
             f"{_lr(cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.lr.warmup_steps)} ({cfg.lr.decay})"]
    if cfg.growth.generated_from:
        lines.append(f"  stages made by growth.schedule: {cfg.growth.generated_from}")
    if cfg.lr.rewind_at:
        lines.append(f"  lr rewinds to the peak at steps {', '.join(map(str, cfg.lr.rewind_at))} (lr.rewind_at), "
                     f"warmup {cfg.lr.rewind_warmup_steps}")
    if cfg.lr.rewind_peak != 1 or cfg.lr.rewind_decay != 1:
        lines.append(f"  every rewind restarts at {cfg.lr.rewind_peak:g} x its peak (lr.rewind_peak) and reaches its "
                     f"floor after {cfg.lr.rewind_decay:g} of the steps left to the decay end (lr.rewind_decay)")
    stages = cfg.resolved_stages()
    if any(st.auto for st in stages):
        from megatron_msg.growth.auto_timing import AutoTiming
        a = AutoTiming.from_config(cfg, stages)
        current = "extrapolated to the grown window" if a.extrapolate else "as measured"
        current += "; grown rate from the growth, ramp included" if a.include_ramp else "; grown rate from the ramp's end"
        if a.skip_near_deadline:
            current += "; none nearer a deadline than a \"wait\" costs"
        kept = "kept when it says grow" if a.adopt else "always rolled back"
        if a.early_stop_steps() is not None:
            kept += f", stopped after {a.early_stop_steps()} steps when it cannot say grow"
        lines.append(f"  at_step auto: a {a.probe_steps}-step lookahead every {a.check_every} steps once the shape "
                     f"has settled ({kept}; current rate {current}), {a.eval_iters} validation batches per "
                     "probe loss; latest steps " + ", ".join(f"stage {k} {a.latest(k)}" for k in a.deadlines))
    prev_layout, prev_batch = cfg.parallel.layout, (t.batch_size, t.grad_accum)
    for st in stages:
        extra = []
        if st.layout != prev_layout:
            extra.append("layout tp{} x pp{} x dp{}".format(*st.layout))
        if (st.batch_size, st.grad_accum) != prev_batch:
            extra.append(_batch(st.batch_size, st.grad_accum, seq))
        if st.rewind_lr:
            extra.append("rewind " + _lr(st.lr, st.min_lr, st.warmup_steps))
        prev_layout, prev_batch = st.layout, (st.batch_size, st.grad_accum)
        # The depth rule the operator really uses (net2net and stack have their own).
        placement, depth_init = GrowthSpec(st.shape, st.shape, cfg.model.head_dim, operator=st.operator,
                                           depth_placement=st.depth_placement,
                                           depth_init=st.depth_init).effective_depth
        at = "auto" if st.at_step is None else st.at_step
        lines.append(f"  stage {st.index}: step {at:>7} -> {st.shape} operator={st.operator} "
                     f"init={st.init} phi={st.phi} depth={placement}/{depth_init}"
                     + "".join(f"; {e}" for e in extra))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="msg-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap)
    ap.add_argument("--out-dir", help="run directory (default: train.out_dir)")
    ap.add_argument("--no-resume", action="store_true", help="ignore checkpoints in the run directory")
    ap.add_argument("--resume-from", metavar="CHECKPOINT",
                    help="resume from this checkpoint directory instead of the run directory's newest complete one")
    ap.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many steps of this invocation")
    ap.add_argument("--validate", action="store_true", help="only validate the config and print the schedule")
    ap.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help=argparse.SUPPRESS)  # appended by the deepspeed launcher; LOCAL_RANK wins
    args = ap.parse_args(argv)

    from megatron_msg.parallel.launch import LaunchEnv, init_parallel, shutdown
    from megatron_msg.parallel.topology import TopologyError
    try:
        env = LaunchEnv.from_environ(args.local_rank)
    except TopologyError as exc:
        print(f"msg-train: launch error: {exc}", file=sys.stderr)
        return 2
    main_rank = env.rank == 0
    cfg = _load_config_on_rank(args, env.rank)
    if cfg is None:
        return 2
    if main_rank:
        print(describe_schedule(cfg), flush=True)
    if args.validate:
        return 0
    try:
        ps = init_parallel(cfg.parallel, cfg.train.device, env)
    except (TopologyError, RuntimeError) as exc:
        print(f"msg-train: rank {env.rank}: {exc}", file=sys.stderr)
        return 2
    try:
        return _train(cfg, args, ps, env.rank)
    finally:
        shutdown()


# How long a rank other than 0 waits before it reports a config error of its own.  torchrun stops every
# worker as soon as one exits, so a rank that exits at once can cut rank 0 off before it prints.
CONFIG_ERROR_GRACE_S = 10.0


def _load_config_on_rank(args, rank: int, grace_s: float = CONFIG_ERROR_GRACE_S):
    """The validated config, or None after the error was reported.

    Every rank reads the same config, so a bad one fails the same way everywhere: rank 0 says so once
    for the launch and exits, and the launcher stops the others while they wait out ``grace_s``.  A
    rank that is still running after that reports its own error, named by rank: the failure was then
    its alone (a file missing on its node), and it must not exit silently."""
    if rank == 0:
        return load_cli_config("msg-train", args)
    try:
        return load_config(resolve_config_path(args.config), args.overrides)
    except ConfigError as exc:
        time.sleep(grace_s)
        print(f"msg-train: rank {rank}: config error: {exc}", file=sys.stderr, flush=True)
        return None


def _train(cfg, args, ps, rank: int) -> int:
    """Build the trainer and run it; every failure a user can act on is one line and an exit code
    (docs/user_guide.md, "Exit codes").  Errors another rank may not see name this rank."""
    from megatron_msg.checkpoint.io import CheckpointError
    from megatron_msg.data.errors import DataError
    from megatron_msg.parallel.failures import describe_peer_failure, is_peer_failure
    from megatron_msg.training.metrics import MetricsError
    from megatron_msg.training.trainer import Trainer, TrainingDivergedError
    who = f"rank {rank}: " if ps.topology.world_size > 1 else ""
    try:
        trainer = Trainer(cfg, out_dir=args.out_dir, resume=not args.no_resume,
                          progress=False if args.no_progress else None, parallel=ps,
                          resume_from=args.resume_from)
        result = trainer.run(max_steps=args.max_steps)
    except ConfigError as exc:  # found while opening the data (e.g. a tokenizer that does not match it)
        print(f"msg-train: {who}config error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:  # a corpus or .bin/.idx that cannot be read as training data
        print(f"msg-train: {who}data error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except CheckpointError as exc:  # a damaged checkpoint, or one that does not fit the config
        print(f"msg-train: {who}checkpoint error: {exc}", file=sys.stderr)
        return 2
    except MetricsError as exc:  # a metrics.jsonl damaged before its last line
        print(f"msg-train: {who}{exc}", file=sys.stderr)
        return 2
    except TrainingDivergedError as exc:
        if rank == 0:
            print(f"msg-train: training diverged: {exc}", file=sys.stderr)
        return 3
    except RuntimeError as exc:
        if not is_peer_failure(exc):
            raise  # a bug: the traceback is the report
        print(f"msg-train: {describe_peer_failure(exc, rank, ps.timeout_s)}", file=sys.stderr)
        return 4
    if rank == 0:
        valid = result.valid_losses or {r["step"]: r["loss"] for r in trainer.metrics.read() if r.get("kind") == "valid"}
        last = valid[max(valid)] if valid else float("nan")  # a finished run resumed: its last evaluation
        print(f"done: step {result.final_step}/{cfg.train.steps}, final shape {result.shape}, "
              f"last validation loss {last:.4f}; run directory {result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
