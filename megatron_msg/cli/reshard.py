"""msg-reshard: rewrite a checkpoint for another layout or format, offline and streaming (checkpoint/reshard.py).

    msg-reshard runs/big --out-dir runs/big_tp4pp4 --tp 4 --pp 4 --dp 12 --zero 1
    msg-reshard runs/big/checkpoints/step_00052001 --out-dir runs/big_universal --format logical
    torchrun --nproc-per-node 8 -m megatron_msg.cli.train run.yaml --out-dir runs/big_tp4pp4

Any layout resumes any checkpoint; a checkpoint resharded for the layout that will resume it is
cut so that each rank reads only whole chunks it keeps.  Values, moments and step offsets are
copied bit for bit; memory stays at about one logical tensor whatever the model size.
--verify evaluates a fixed batch (validation batch 0 of the run's own config) on the source
and the result in this process and prints the largest logit difference (0 when exact).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_msg.cli.outputs import removed_on_failure


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="msg-reshard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a checkpoint directory, or a run directory (its newest complete checkpoint)")
    ap.add_argument("--out-dir", required=True, help="run directory for the new checkpoint (must hold none)")
    for name in ("tp", "pp", "dp"):
        ap.add_argument(f"--{name}", type=int, default=1, help=f"target {name} size (default 1)")
    ap.add_argument("--zero", type=int, default=0, help="target ZeRO stage: cuts the Adam state per DP rank")
    ap.add_argument("--virtual-stages", type=int, default=1,
                    help="target model chunks per pipeline stage (parallel.virtual_stages, default 1)")
    ap.add_argument("--format", choices=["sharded", "logical"], default="sharded")
    ap.add_argument("--verify", action="store_true",
                    help="compare the logits of a fixed batch before and after (builds the whole model here)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from megatron_msg.checkpoint.errors import CheckpointError
    from megatron_msg.checkpoint.reshard import Layout, reshard
    from megatron_msg.config import ConfigError
    from megatron_msg.growth.offline import OfflineGrowthError, find_checkpoint
    layout = Layout(args.tp, args.pp, args.dp, args.zero, args.virtual_stages)
    try:
        source = find_checkpoint(args.source)
        bar = None
        if not args.no_progress and sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="msg-reshard", file=sys.stderr)
        with removed_on_failure(args.out_dir):
            result = reshard(source, Path(args.out_dir), layout, args.format,
                             on_bytes=bar.update if bar is not None else (lambda n: None))
            copy_metrics(source, Path(args.out_dir))
        if bar is not None:
            bar.close()
        print(f"wrote {result.checkpoint} ({args.format}, {layout.describe()}): "
              f"{result.bytes_written / 2**20:,.1f} MiB of tensors in {result.seconds:.2f} s "
              f"({result.bytes_written / 2**20 / max(result.seconds, 1e-9):,.1f} MiB/s)")
        if args.verify:
            from megatron_msg.checkpoint.io import open_checkpoint
            from megatron_msg.config import config_from_dict
            from megatron_msg.training.probe import checkpoint_logits, probe_batch
            batch = probe_batch(config_from_dict(open_checkpoint(source).state["config"]))
            diff = (checkpoint_logits(source, batch) - checkpoint_logits(result.checkpoint, batch)).abs().max()
            print(f"verify: largest logit difference on a fixed batch: {diff.item():.3e}")
    except (CheckpointError, OfflineGrowthError, ConfigError) as exc:
        print(f"msg-reshard: {exc}", file=sys.stderr)
        return 2
    return 0


def copy_metrics(source: Path, out_dir: Path) -> None:
    """The source run's metrics.jsonl beside the new checkpoint (a resume truncates it to its step)."""
    import os
    run = source.parent.parent if source.parent.name == "checkpoints" else source.parent
    src = run / "metrics.jsonl"
    if src.is_file():
        tmp = out_dir / f".metrics.jsonl.tmp.{os.getpid()}"
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, out_dir / "metrics.jsonl")


if __name__ == "__main__":
    sys.exit(main())
