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

from megatron_msg.cli.config_args import add_config_arguments, load_cli_config
from megatron_msg.config import ConfigError

def describe_schedule(cfg) -> str:
    lines = [f"{cfg.model.arch} start {cfg.model.shape}, head_dim {cfg.model.head_dim}, {cfg.train.steps} steps"]
    for st in cfg.resolved_stages():
        lines.append(f"  stage {st.index}: step {st.at_step:>7} -> {st.shape} operator={st.operator} "
                     f"init={st.init} phi={st.phi} depth={st.depth_placement}/{st.depth_init}"
                     f"{' rewind-lr' if st.rewind_lr else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="msg-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap)
    ap.add_argument("--out-dir", help="run directory (default: train.out_dir)")
    ap.add_argument("--no-resume", action="store_true", help="ignore checkpoints in the run directory")
    ap.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many steps of this invocation")
    ap.add_argument("--validate", action="store_true", help="only validate the config and print the schedule")
    ap.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help=argparse.SUPPRESS)  # appended by the deepspeed launcher; LOCAL_RANK wins
    args = ap.parse_args(argv)

    cfg = load_cli_config("msg-train", args)
    if cfg is None:
        return 2
    from megatron_msg.parallel.launch import LaunchEnv, init_parallel, shutdown
    from megatron_msg.parallel.topology import TopologyError
    try:
        env = LaunchEnv.from_environ(args.local_rank)
    except TopologyError as exc:
        print(f"msg-train: launch error: {exc}", file=sys.stderr)
        return 2
    main_rank = env.rank == 0
    if main_rank:
        print(describe_schedule(cfg), flush=True)
    if args.validate:
        return 0
    try:
        ps = init_parallel(cfg.parallel, cfg.train.device, env)
    except (TopologyError, RuntimeError) as exc:
        print(f"msg-train: rank {env.rank}: {exc}", file=sys.stderr)
        return 2
    from megatron_msg.training.trainer import Trainer, TrainingDivergedError
    try:
        try:
            trainer = Trainer(cfg, out_dir=args.out_dir, resume=not args.no_resume,
                              progress=False if args.no_progress else None, parallel=ps)
        except ConfigError as exc:  # found while opening the data (e.g. a tokenizer that does not match it)
            print(f"msg-train: config error: {exc}", file=sys.stderr)
            return 2
        try:
            result = trainer.run(max_steps=args.max_steps)
        except TrainingDivergedError as exc:
            if main_rank:
                print(f"msg-train: training diverged: {exc}", file=sys.stderr)
            return 3
    finally:
        shutdown()
    if main_rank:
        last = result.valid_losses[max(result.valid_losses)] if result.valid_losses else float("nan")
        print(f"done: step {result.final_step}/{cfg.train.steps}, final shape {result.shape}, "
              f"last validation loss {last:.4f}; run directory {result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
