"""msg-grow: apply the next growth stage of a schedule to a checkpoint, offline (growth/offline.py).

    msg-train run.yaml --out-dir runs/small --max-steps 20000   # stop at the growth step
    msg-grow run.yaml --from runs/small --out-dir runs/grown     # grow the checkpoint, file to file
    torchrun --nproc-per-node 8 -m megatron_msg.cli.train run.yaml --out-dir runs/grown  # resume, any layout

The grown checkpoint is what the trainer would have built live at that step, so the resumed
run repeats the uninterrupted one.  Memory: about one logical layer, whatever the model size.
"""
from __future__ import annotations

import argparse
import sys

from megatron_msg.checkpoint.io import CheckpointError
from megatron_msg.cli.config_args import add_config_arguments, load_cli_config
from megatron_msg.cli.outputs import removed_on_failure
from megatron_msg.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="msg-grow", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap, optional=False)  # its schedule names the stage to apply
    ap.add_argument("--from", dest="source", required=True, metavar="DIR",
                    help="a checkpoint directory, or a run directory (its latest checkpoint)")
    ap.add_argument("--out-dir", required=True, help="run directory for the grown checkpoint (must hold none)")
    ap.add_argument("--format", choices=["logical", "sharded"], default="logical",
                    help="logical: one file per tensor; sharded: cut for the stage's layout and the config's ZeRO "
                         "stage, as msg-reshard does (each rank of the resumed run reads only its own chunks)")
    ap.add_argument("--verify", action="store_true",
                    help="evaluate the growth probe (validation batch 0, fp32, one process) on the source and the "
                         "grown checkpoint, print both and record them in the growth record; the whole model is "
                         "built in this process, so only for models that fit its memory")
    args = ap.parse_args(argv)
    cfg = load_cli_config("msg-grow", args)
    if cfg is None:
        return 2
    from megatron_msg.growth.offline import OfflineGrowthError, find_checkpoint, grow_checkpoint, record_probe
    try:
        before = batch = None
        if args.verify:
            from megatron_msg.training.probe import checkpoint_probe_loss, probe_batch
            batch = probe_batch(cfg)  # once: the same batch before and after
            before = checkpoint_probe_loss(find_checkpoint(args.source), batch)
        with removed_on_failure(args.out_dir):
            result = grow_checkpoint(cfg, args.source, args.out_dir, args.format)
    except (OfflineGrowthError, CheckpointError, ConfigError) as exc:
        print(f"msg-grow: {exc}", file=sys.stderr)
        return 2
    st = result.stage
    print(f"grew stage {st.index} ({st.operator}) at step {st.at_step} to {st.shape}, "
          f"{result.parameters:,} parameters; layout from here tp{st.layout[0]} x pp{st.layout[1]} x dp{st.layout[2]}; "
          f"wrote {result.checkpoint}")
    if args.verify:
        after = checkpoint_probe_loss(result.checkpoint, batch)
        record_probe(args.out_dir, st, before, after)
        print(f"verify: probe loss {before:.6f} before, {after:.6f} after (difference {abs(after - before):.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
