"""``msg-bench``: benchmark subcommands.

    msg-bench kernels [--out DIR] [--widths 768,1024,4096,10240] [--only triton,cuda,...]
    msg-bench kernel-sweep [--out DIR] [--widths ...]
    msg-bench mask-overhead [--out DIR] [--batch 16] [--steps 20] [--windows 5] [--compile]

Each subcommand is registered in ``SUBCOMMANDS`` as name -> (help, add_arguments,
run); modules are imported only when their subcommand runs, so adding one is a
two-function change in the owner's module plus one line here.
"""
from __future__ import annotations

import argparse
import sys


def _kernels_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/bench", help="directory for kernels.json and kernels.md")
    p.add_argument("--widths", default="768,1024,4096,10240", help="comma-separated hidden sizes")
    p.add_argument("--only", default=None, help="comma-separated implementations (default: all)")


def _kernels_run(a: argparse.Namespace) -> None:
    from megatron_msg.kernels.bench import run_kernels
    run_kernels(a.out, widths=_widths(a.widths), only=set(a.only.split(",")) if a.only else None)


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise SystemExit(f"--widths: expected comma-separated integers, got {text!r}") from None
    if any(w <= 0 for w in widths):
        raise SystemExit(f"--widths: hidden sizes must be positive, got {text!r}")
    return widths


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/bench", help="directory for sweep.json (sweep_cuda.json with --cuda-only)")
    p.add_argument("--widths", default="768,1024,4096,10240", help="comma-separated hidden sizes")
    p.add_argument("--cuda-only", action="store_true",
                   help="only the CUDA forward candidates (with copy, F.layer_norm and Triton beside them)")


def _sweep_run(a: argparse.Namespace) -> None:
    from megatron_msg.kernels.bench import run_sweep
    run_sweep(a.out, widths=_widths(a.widths), cuda_only=a.cuda_only)


def _overhead_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/bench", help="directory for mask_overhead.json/.md")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps per window")
    p.add_argument("--windows", type=int, default=5, help="timing windows per variant (interleaved)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (variants: no masks, ramp with auto, ramp with Triton custom ops)")


def _overhead_run(a: argparse.Namespace) -> None:
    from megatron_msg.kernels.bench import run_mask_overhead
    run_mask_overhead(a.out, batch=a.batch, steps=a.steps, windows=a.windows, compile_model=a.compile)


SUBCOMMANDS = {
    "kernels": ("masked LayerNorm kernels: GB/s and time, fwd and fwd+bwd", _kernels_args, _kernels_run),
    "kernel-sweep": ("device time of each Triton launch configuration and CUDA forward kernel "
                     "(sets the heuristics)", _sweep_args, _sweep_run),
    "mask-overhead": ("GPT-2-small training step with ramp masks vs masks removed", _overhead_args,
                      _overhead_run),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="msg-bench", description="megatron_msg benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add_args, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        add_args(p)
        p.set_defaults(_run=run)
    args = parser.parse_args(argv)
    args._run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
