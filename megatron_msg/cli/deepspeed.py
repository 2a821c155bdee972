"""msg-deepspeed: DeepSpeed universal checkpoints in and out (training/deepspeed_universal.py).

    # DeepSpeed -> us: convert DeepSpeed's ZeRO save with its own tool, then import
    python -m deepspeed.checkpoint.ds_to_universal --input_folder ds/global_step1000 \\
        --output_folder universal/global_step1000
    msg-deepspeed import universal run.yaml --out-dir runs/from_ds
    msg-train run.yaml --out-dir runs/from_ds                    # continues at step 1000

    # us -> DeepSpeed: a universal checkpoint that an engine loads with
    # "checkpoint": {"load_universal": true} and engine.load_checkpoint("universal")
    msg-deepspeed export runs/msg --out universal

The DeepSpeed model must be our module (build_model) or have its parameter names; its
optimizer AdamW over our two groups (weight decay, then none).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_msg.cli.outputs import removed_on_failure


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="msg-deepspeed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="our checkpoint -> a DeepSpeed universal checkpoint")
    exp.add_argument("source", help="a checkpoint directory, or a run directory (its newest complete checkpoint)")
    exp.add_argument("--out", required=True, help="directory for <tag>/ and latest_universal")
    imp = sub.add_parser("import", help="a DeepSpeed universal checkpoint -> our checkpoint")
    imp.add_argument("universal", help="the universal checkpoint: its tag directory, or the directory with "
                                       "latest_universal")
    imp.add_argument("config", help="the run's config (its model and schedule at the checkpoint's step)")
    imp.add_argument("--out-dir", required=True, help="run directory for our checkpoint (must hold none)")
    args = ap.parse_args(argv)
    from megatron_msg.checkpoint.errors import CheckpointError
    from megatron_msg.config import ConfigError, load_config
    from megatron_msg.growth.offline import OfflineGrowthError, find_checkpoint
    from megatron_msg.training.deepspeed_universal import export_universal, import_universal
    try:
        if args.command == "export":
            with removed_on_failure(args.out):
                tag = export_universal(find_checkpoint(args.source), Path(args.out))
            print(f"wrote the DeepSpeed universal checkpoint {tag}")
        else:
            out = Path(args.out_dir)
            if (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step_*")):
                raise CheckpointError(f"{out} already holds checkpoints; import into a new run directory")
            with removed_on_failure(out):
                written = import_universal(Path(args.universal), load_config(args.config), out)
            print(f"wrote {written}; resume it with msg-train {args.config} --out-dir {out}")
    except (CheckpointError, OfflineGrowthError, ConfigError, OSError) as exc:
        print(f"msg-deepspeed: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
