"""msg-compare: finished runs side by side by the compute they spent (training/compare.py).

    msg-compare runs/full runs/msg                  # the first run is the reference
    msg-compare runs/full runs/msg --target 3.2 --plot compare.png
    msg-compare runs/* --json

For each run: growth events, final shape, training FLOPs, best and final validation
loss, FLOPs to reach a target loss (default: the highest of the runs' best validation
losses) and the speed-up against the reference run.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="msg-compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (train.out_dir of finished or stopped runs)")
    ap.add_argument("--reference", type=int, default=0, help="index of the reference run (default 0: the first)")
    ap.add_argument("--target", type=float, help="validation loss to compare at (default: the highest best loss)")
    ap.add_argument("--plot", help="write validation loss against training FLOPs to this PNG")
    ap.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = ap.parse_args(argv)
    from megatron_msg.training.compare import CompareError, compare, format_comparison, load_run, plot_comparison
    try:
        runs = [load_run(path) for path in args.runs]
        target, rows = compare(runs, args.reference, args.target)
    except CompareError as exc:
        print(f"msg-compare: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"target_loss": target, "reference": rows[args.reference]["run"], "runs": rows}, indent=2))
    else:
        print(format_comparison(target, rows, args.reference))
    if args.plot:
        written = plot_comparison(runs, target, args.plot)
        if written is None:
            print("msg-compare: --plot needs matplotlib (pip install -e '.[viz]')", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
