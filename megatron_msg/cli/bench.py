"""``msg-bench``: benchmark subcommands.

    msg-bench kernels [--out DIR] [--widths 768,1024,4096,10240] [--only triton,cuda,...]
    msg-bench kernel-sweep [--out DIR] [--widths ...]
    msg-bench mask-overhead [--out DIR] [--batch 16] [--steps 20] [--windows 5] [--compile]
    msg-bench optimizer [--out DIR] [--hidden 256] [--layers 12] [--device cpu]
    msg-bench train [--out DIR] [--size tiny|768|1024|2048] [--device auto] [--compile | --no-compile]
    msg-bench pipeline [--out DIR] [--stages 2] [--virtual 1,2,4] [--micro-batches 2,4,8] [--device cpu|cuda]
    msg-bench growth [--out DIR] [--size tiny|small|gpu] [--corpus FILE.jsonl] [--tokenizer-vocab N] [--seeds N]
                     [--runs full,msg,msg_auto,...] [--growth-budget F] [--schedule sch1|sch0|rapid] [--keep-runs]

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


def _optimizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/bench", help="directory for optimizer.json/.md")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10, help="timed steps per window")
    p.add_argument("--windows", type=int, default=7, help="timing windows per variant (interleaved)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def _optimizer_run(a: argparse.Namespace) -> None:
    import torch
    from megatron_msg.training.step_bench import run_optimizer_bench
    torch.set_num_threads(a.threads)
    run_optimizer_bench(a.out, a.hidden, a.layers, a.vocab, a.steps, a.windows, a.device)


def _train_args(p: argparse.ArgumentParser) -> None:
    from megatron_msg.training.step_bench import TRAIN_SIZES
    p.add_argument("--out", default="runs/bench", help="directory for train_<size>.json/.md")
    p.add_argument("--size", default="tiny", choices=sorted(TRAIN_SIZES),
                   help="tiny (CPU) or a GPT hidden size of the GPU shapes (768: 12 layers; 1024, 2048: 24)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5, help="timed steps per window")
    p.add_argument("--windows", type=int, default=5, help="timing windows per variant (interleaved)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 1024 on GPU, 64 on CPU)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default 50304 on GPU, 261 on CPU)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the reference (default on GPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def _train_run(a: argparse.Namespace) -> None:
    import torch
    from megatron_msg.training.step_bench import run_train_bench
    torch.set_num_threads(a.threads)
    run_train_bench(a.out, a.size, a.device, a.steps, a.windows, a.compile, a.seq, a.vocab)


def _growth_args(p: argparse.ArgumentParser) -> None:
    from megatron_msg.named_schedules import SCHEDULES
    from megatron_msg.training.growth_bench import RUN_KINDS, SIZES
    p.add_argument("--out", default="runs/bench/growth", help="directory for growth.json/.md/.png and runs/")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES),
                   help="tiny (CPU, about a minute), small (CPU, under an hour), gpu (GPT-2-small's shape, one GPU)")
    p.add_argument("--corpus", default=None, help="a jsonl corpus (default: the bundled one)")
    p.add_argument("--tokenizer-vocab", type=int, default=0,
                   help="train a sentencepiece tokenizer of this many pieces on the corpus (default 0: bytes)")
    p.add_argument("--seeds", type=int, default=1, help="seeds of every run (2+ to read the seed spread)")
    p.add_argument("--runs", default=None,
                   help="comma-separated subset of " + ",".join(RUN_KINDS) + " (default: all; full is always run)")
    p.add_argument("--growth-budget", type=float, default=1.0,
                   help="steps of the growth runs as a multiple of the full-size runs' (default 1)")
    p.add_argument("--schedule", default="sch1", choices=SCHEDULES,
                   help="the named schedule the growth runs follow, made from the target and budget: sch1 "
                        "(default), sch0 or rapid (Rapid-L's rules: fast growth after a long small stage)")
    p.add_argument("--keep-runs", action="store_true",
                   help="keep runs already in --out that were trained to the end with the same config, and resume "
                        "interrupted ones (deterministic: the same losses; their wall times are from when they ran)")


def _growth_run(a: argparse.Namespace) -> None:
    from megatron_msg.config import ConfigError
    from megatron_msg.data.errors import DataError
    from megatron_msg.training.growth_bench import BenchStopped, run_growth_bench
    if a.seeds < 1:
        raise SystemExit("msg-bench growth: --seeds must be >= 1")
    try:
        from megatron_msg.training.growth_bench import RUN_KINDS
        kinds = RUN_KINDS if a.runs is None else tuple(k.strip() for k in a.runs.split(",") if k.strip())
        run_growth_bench(a.out, a.size, a.corpus, a.tokenizer_vocab, a.seeds, kinds=kinds, budget=a.growth_budget,
                         keep_runs=a.keep_runs, schedule=a.schedule)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"msg-bench growth: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except BenchStopped as exc:
        print(f"msg-bench growth: {exc}", file=sys.stderr)
        raise SystemExit(130) from None


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/bench", help="directory for pipeline.json and pipeline.md")
    p.add_argument("--stages", type=int, default=2, help="pipeline ranks of the measured runs (default 2)")
    p.add_argument("--virtual", default="1,2,4", help="comma-separated chunks per stage to measure")
    p.add_argument("--micro-batches", default="2,4,8", help="comma-separated micro-batches per step to measure")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per case (median)")
    p.add_argument("--schedule-only", action="store_true", help="only the table from the schedule")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu: gloo ranks; cuda: NCCL ranks, one GPU each (needs --stages GPUs)")


def _pipeline_run(a: argparse.Namespace) -> None:
    from megatron_msg.parallel.pipeline_bench import run_pipeline_bench
    try:
        run_pipeline_bench(a.out, a.stages, _widths(a.virtual), _widths(a.micro_batches), a.repeats,
                           measure_steps=not a.schedule_only, device_type=a.device)
    except ValueError as exc:
        print(f"msg-bench pipeline: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


SUBCOMMANDS = {
    "kernels": ("masked LayerNorm kernels: GB/s and time, fwd and fwd+bwd", _kernels_args, _kernels_run),
    "kernel-sweep": ("device time of each Triton launch configuration and CUDA forward kernel "
                     "(sets the heuristics)", _sweep_args, _sweep_run),
    "mask-overhead": ("GPT-2-small training step with ramp masks vs masks removed", _overhead_args,
                      _overhead_run),
    "optimizer": ("one AdamW step: ours (fused, unfused, ZeRO, with offsets) vs torch AdamW(fused=True)",
                  _optimizer_args, _optimizer_run),
    "train": ("msg-train's real step vs a plain PyTorch loop and a nanoGPT-style reference: tokens/s, MFU",
              _train_args, _train_run),
    "pipeline": ("pipeline bubble of plain vs interleaved 1F1B: from the schedule and measured on gloo ranks",
                 _pipeline_args, _pipeline_run),
    "growth": ("full size vs a named schedule (sch1 by default) with each operator and the LR controls: "
               "FLOPs and wall time to equal loss", _growth_args, _growth_run),
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
