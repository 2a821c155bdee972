"""Print the tables of docs/schedules.md and the examples' READMEs from msg-plan's functions.

    python tools/schedule_table.py paper            # each paper schedule: compute saving vs the paper's speed-up
    python tools/schedule_table.py recipes [--mfu 0.4] [--gpu a100] [--usd-per-gpu-hour 2]

Computed, not measured: FLOPs are Megatron-LM's count (growth/plan.py), time and cost assume an MFU
and a price (growth/hardware.py).  The paper's wall-time figures are its own (Tables 4, 5, 9, 10).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_msg.config import BUNDLED_CONFIGS, load_config
from megatron_msg.growth.hardware import ACCELERATORS, fit, timing
from megatron_msg.growth.plan import final_shape_flops, format_count, plan_schedule

REPO = Path(__file__).resolve().parent.parent
# schedule config, its full-size baseline, the paper's name, wall times (MSG, full) and speed-up.
PAPER = [
    ("bert_base_sch1", "bert_base_full", "Sch1-B", "14h36m", "26h10m", "1.8x"),
    ("bert_base_sch0", "bert_base_full", "Sch0-B", "17h46m", "26h10m", "1.5x"),
    ("bert_large_sch1", "bert_large_full", "Sch1-L", "32h10m", "70h48m", "2.2x"),
    ("bert_large_rapid", "bert_large_full", "Rapid-L", "29h20m", "70h48m", "2.4x"),
    ("bert_large_sch0", "bert_large_full", "Sch0-L (as printed)", "36h08m", "70h48m", "2.0x"),
    ("gpt2_sch1", "gpt2_full", "Sch1-G", "37h59m", "53h01m", "1.4x"),
    ("gpt2_sch_new", "gpt2_new_full", "Sch-GPT-New", "39h30m", "54h33m", "1.38x"),
]


def _flops(cfg) -> float:
    return sum(p.flops for p in plan_schedule(cfg))


def paper_table() -> str:
    rows = ["| schedule | config | FLOPs | its final shape, same steps | full-size baseline (config) | "
            "compute saving vs baseline | paper: wall time MSG / full | paper: speed-up |",
            "|" + "---|" * 8]
    for name, full, label, t_msg, t_full, speed in PAPER:
        cfg = load_config(BUNDLED_CONFIGS / "paper" / f"{name}.yaml")
        base = load_config(BUNDLED_CONFIGS / "paper" / f"{full}.yaml")
        plans = plan_schedule(cfg)
        ours, flat, full_flops = sum(p.flops for p in plans), final_shape_flops(cfg, plans), _flops(base)
        rows.append(f"| {label} | `paper/{name}` | {ours / 1e18:.2f} EFLOP | {flat / 1e18:.2f} EFLOP "
                    f"({flat / ours:.2f}x) | {full_flops / 1e18:.2f} EFLOP (`paper/{full}`, {base.train.steps:,} steps) "
                    f"| {full_flops / ours:.2f}x | {t_msg} / {t_full} | {speed} |")
    return "\n".join(rows)


def recipe_table(paths: list[Path], gpu: str, mfu: float, price: float) -> str:
    device = ACCELERATORS[gpu]
    rows = [f"| config | GPUs | tokens | FLOPs | time at {mfu:.0%} MFU ({device.name}) | GPU-hours | cost at "
            f"${price:.2f}/GPU-h | fullest rank, largest stage | fits 80 GB / 141 GB |", "|" + "---|" * 9]
    for path in paths:
        cfg = load_config(path, check_files=False)
        plans = plan_schedule(cfg)
        times = [timing(p, device, mfu, price) for p in plans]
        worst = max(plans, key=lambda p: sum(p.memory_bytes.values()))
        fits = "/".join("yes" if all(fit(p, ACCELERATORS[k]).fits for p in plans) else "no" for k in ("a100", "h200"))
        seconds = sum(t.seconds for t in times)
        when = (f"{seconds / 86400:.2f} days" if seconds > 2 * 86400 else f"{seconds / 3600:.1f} h" if seconds > 360
                else f"{seconds:.1f} s")
        rows.append(f"| `{path.relative_to(REPO)}` | {plans[0].gpus} | {format_count(sum(p.tokens for p in plans))} "
                    f"| {format_count(sum(p.flops for p in plans), 'FLOP')} | {when} | {sum(t.gpu_hours for t in times):,.0f} "
                    f"| ${sum(t.cost for t in times):,.0f} | {fit(worst, device).total_bytes / 2**30:.1f} GiB "
                    f"({worst.name}) | {fits} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["paper", "recipes"])
    ap.add_argument("paths", nargs="*", help="recipe configs (default: every recipe in examples/)")
    ap.add_argument("--gpu", default="a100", choices=sorted(ACCELERATORS))
    ap.add_argument("--mfu", type=float, default=0.40)
    ap.add_argument("--usd-per-gpu-hour", type=float, default=2.0)
    args = ap.parse_args()
    if args.what == "paper":
        print(paper_table())
    else:
        paths = [Path(p).resolve() for p in args.paths] or sorted(
            p for p in (REPO / "examples").rglob("*.yaml") if p.stem not in ("rehearsal", "cluster"))
        print(recipe_table(paths, args.gpu, args.mfu, args.usd_per_gpu_hour))


if __name__ == "__main__":
    main()
