"""msg-plan: what a growth schedule costs before running it (growth/plan.py, growth/hardware.py).

    msg-plan                                  # the bundled tiny GPT demo
    msg-plan paper/gpt2_small_full --set parallel.dp=8 --set parallel.zero_stage=1
    msg-plan examples/flm101b/flm101b.yaml --gpu a100 --mfu 0.52 --usd-per-gpu-hour 2
    msg-plan run.yaml --json                  # machine-readable

Per stage: steps, shape, layout, global batch, parameters, FLOPs per token and in total, the
largest rank's share and the bytes of its weights, gradients and Adam moments, an estimate of
the first pipeline stage's activations; whether that fits an 80 GB and a 141 GB GPU (naming the
largest part when it does not); the wall time, GPU-hours and cost at a stated MFU; and the
compute growth saves against training the final shape throughout.  The data and tokenizer
files need not exist yet: nothing is read but the config.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from megatron_msg.cli.config_args import add_config_arguments, load_cli_config


def main(argv: list[str] | None = None) -> int:
    from megatron_msg.growth.hardware import ACCELERATORS
    ap = argparse.ArgumentParser(prog="msg-plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap)
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--gpu", choices=sorted(ACCELERATORS), default="a100",
                    help="device for the wall time and cost (a100: A100/A800, 312 TFLOP/s bf16; default a100)")
    ap.add_argument("--mfu", type=float, default=0.40,
                    help="model FLOPs utilisation assumed for the wall time (default 0.40; FLM-101B reported ~0.52)")
    ap.add_argument("--usd-per-gpu-hour", type=float, default=2.0, help="price for the cost column (default 2.00)")
    args = ap.parse_args(argv)
    if not 0 < args.mfu <= 1:
        print(f"msg-plan: --mfu must be in (0, 1], got {args.mfu}", file=sys.stderr)
        return 2
    if args.usd_per_gpu_hour < 0:
        print(f"msg-plan: --usd-per-gpu-hour must be >= 0, got {args.usd_per_gpu_hour}", file=sys.stderr)
        return 2
    cfg = load_cli_config("msg-plan", args, check_files=False)
    if cfg is None:
        return 2
    from megatron_msg.growth.hardware import FIT_CHECKS, fit, format_hardware, timing
    from megatron_msg.growth.plan import final_shape_flops, format_plan, plan_schedule
    plans = plan_schedule(cfg)
    device = ACCELERATORS[args.gpu]
    if args.json:
        stages = []
        for p in plans:
            t = timing(p, device, args.mfu, args.usd_per_gpu_hour)
            fits = {k: dataclasses.asdict(fit(p, ACCELERATORS[k])) for k in FIT_CHECKS}
            stages.append({**p.as_dict(), "memory_bytes": p.memory_bytes, "fits": fits,
                           "seconds": t.seconds, "gpu_hours": t.gpu_hours, "cost_usd": t.cost})
        print(json.dumps({"stages": stages, "total_flops": sum(p.flops for p in plans),
                          "final_shape_flops": final_shape_flops(cfg, plans),
                          "assumptions": {"gpu": dataclasses.asdict(device), "mfu": args.mfu,
                                          "usd_per_gpu_hour": args.usd_per_gpu_hour}}, indent=2))
    else:
        print(format_plan(cfg, plans))
        print()
        print(format_hardware(plans, device, args.mfu, args.usd_per_gpu_hour))
    return 0


if __name__ == "__main__":
    sys.exit(main())
