"""msg-plan: what a growth schedule costs before running it (growth/plan.py).

    msg-plan                                  # the bundled tiny GPT demo
    msg-plan paper/gpt2_small_full --set parallel.dp=8 --set parallel.zero_stage=1
    msg-plan run.yaml --json                  # machine-readable

Per stage: steps, shape, layout, parameters, FLOPs per token and in total, the largest
rank's share and the bytes of its weights, gradients and Adam moments, an estimate of the
first pipeline stage's activations; and the compute growth saves against training the final
shape throughout.
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_msg.cli.config_args import add_config_arguments, load_cli_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="msg-plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap)
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    cfg = load_cli_config("msg-plan", args)
    if cfg is None:
        return 2
    from megatron_msg.growth.plan import final_shape_flops, format_plan, plan_schedule
    plans = plan_schedule(cfg)
    if args.json:
        print(json.dumps({"stages": [p.as_dict() for p in plans], "total_flops": sum(p.flops for p in plans),
                          "final_shape_flops": final_shape_flops(cfg, plans)}, indent=2))
    else:
        print(format_plan(cfg, plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
