"""msg-export: a checkpoint's model in the Hugging Face layout (checkpoint/hf_export.py).

    msg-export runs/demo_tiny_gpt --out hf/demo            # the run's latest checkpoint
    msg-export runs/bert/checkpoints/step_00010000 --out hf/bert --dtype bf16

GPT runs become GPT2LMHeadModel, BERT runs BertForPreTraining (load with
``from_pretrained(OUT)``).  The checkpoint must be past its growth ramps and have
heads x head_dim = hidden; the tokenizer is not exported.
"""
from __future__ import annotations

import argparse
import sys

from megatron_msg.cli.outputs import removed_on_failure

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="msg-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    ap.add_argument("--out", required=True, help="new (or empty) directory for config.json and the weights")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the exported weights")
    args = ap.parse_args(argv)
    import torch

    from megatron_msg.checkpoint.hf_export import ExportError, export_checkpoint
    from megatron_msg.checkpoint.io import CheckpointError
    try:
        with removed_on_failure(args.out):
            out = export_checkpoint(args.source, args.out, getattr(torch, DTYPES[args.dtype]))
    except (ExportError, CheckpointError) as exc:
        print(f"msg-export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
