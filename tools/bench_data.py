#!/usr/bin/env python
"""Benchmark the data pipeline: C++ vs numpy index builders, and preprocessing throughput.

    python tools/bench_data.py --corpus /work/shared/data/python-docs.jsonl

Everything is measured in the same run, so the ratios compare like with like.  Prints a
markdown section (paste it into docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

from megatron_msg.data import index_builders as ib
from megatron_msg.data.preprocessing import PreprocessConfig, preprocess_jsonl


def best_of(repeats, fn):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_sample_index(num_docs, epochs, seq_len, repeats, seed=0):
    rng = np.random.default_rng(seed)
    # Document lengths of a web-like corpus: log-normal, median ~400 tokens, long tail.
    sizes = np.clip(rng.lognormal(6.0, 1.0, num_docs), 1, 2**31 - 1).astype(np.int32)
    document_index = np.tile(np.arange(num_docs, dtype=np.int64), epochs)
    rng.shuffle(document_index)
    t_cpp, a = best_of(repeats, lambda: ib.build_sample_index(sizes, document_index, seq_len, backend="cpp"))
    t_np, b = best_of(repeats, lambda: ib.build_sample_index(sizes, document_index, seq_len, backend="numpy"))
    assert np.array_equal(a, b), "C++ and numpy sample indices differ"
    return t_cpp, t_np, len(a) - 1


def bench_blending(num_datasets, size, repeats, seed=0):
    w = ib.normalize_weights(np.random.default_rng(seed).random(num_datasets))
    t_cpp, a = best_of(repeats, lambda: ib.build_blending_index(w, size, backend="cpp"))
    t_py, b = best_of(1, lambda: ib.build_blending_index(w, size, backend="numpy"))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), "C++ and Python blending differ"
    return t_cpp, t_py


def bench_preprocess(corpus, tokenizer, model, workers, out_dir, repeats):
    config = PreprocessConfig(inputs=[corpus], output_prefix=os.path.join(out_dir, f"{tokenizer}{workers}"),
                              tokenizer=tokenizer, tokenizer_model=model, workers=workers, progress=False)
    runs = [preprocess_jsonl(config) for _ in range(repeats)]
    return max(r.mb_per_s for r in runs), runs[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="/work/shared/data/python-docs.jsonl")
    p.add_argument("--spm-model", default=None, help="sentencepiece model (default: train one, vocab 8000)")
    p.add_argument("--num-docs", type=int, default=1_000_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 128])
    p.add_argument("--blend-size", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    if ib.load_cpp_helpers() is None:
        sys.exit("megatron_msg.data._helpers is not built: run `pip install -e .` with a C++ compiler first")

    load = os.getloadavg()[0]
    lines = [f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
             f"Python {platform.python_version()}, numpy {np.__version__}; 1-min load average at start {load:.2f} "
             "(other processes compete for the cores when it is high)",
             f"- command: `python tools/bench_data.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace("  ", " "),
             "", "### Index builders: C++ (`megatron_msg.data._helpers`) vs numpy fallback", "",
             "Identical outputs asserted in the same run. Times are best of "
             f"{args.repeats} (the Python blending loop: one run).", "",
             "| builder | problem | C++ | fallback | speedup |", "|---|---|---:|---:|---:|"]
    for seq_len in args.seq_lens:
        t_cpp, t_np, n = bench_sample_index(args.num_docs, args.epochs, seq_len, args.repeats)
        lines.append(f"| sample index (numpy, vectorised) | {args.num_docs:,} docs x {args.epochs} epochs, "
                     f"seq_len {seq_len} ({n:,} samples) | {t_cpp * 1e3:.1f} ms | {t_np * 1e3:.1f} ms | "
                     f"{t_np / t_cpp:.1f}x |")
    for k in (2, 8):
        t_cpp, t_py = bench_blending(k, args.blend_size, args.repeats)
        lines.append(f"| blending index (Python loop) | {k} datasets, {args.blend_size:,} samples | "
                     f"{t_cpp * 1e3:.1f} ms | {t_py * 1e3:.0f} ms | {t_py / t_cpp:.0f}x |")

    size_mb = os.path.getsize(args.corpus) / 2**20
    lines += ["", f"### Preprocessing throughput: `{os.path.basename(args.corpus)}` ({size_mb:.1f} MB)", "",
              f"Input MB/s, best of {args.repeats}; workers = tokenizer processes.", "",
              "| tokenizer | 1 worker | 2 workers | 2 vs 1 |", "|---|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.spm_model
        if model is None:
            from megatron_msg.data.tokenizer_training import TokenizerTrainConfig, train_sentencepiece
            start = time.perf_counter()
            model = train_sentencepiece(TokenizerTrainConfig(inputs=[args.corpus], model_prefix=os.path.join(tmp, "spm"),
                                                             vocab_size=8000, model_type="bpe"))
            lines.insert(-4, f"(sentencepiece BPE model, vocab 8000, trained on the corpus in "
                             f"{time.perf_counter() - start:.1f} s)\n")
        for name, kind, m in (("byte", "byte", None), ("sentencepiece BPE 8k", "sentencepiece", model)):
            one, stats = bench_preprocess(args.corpus, kind, m, 1, tmp, args.repeats)
            two, _ = bench_preprocess(args.corpus, kind, m, 2, tmp, args.repeats)
            lines.append(f"| {name} ({stats.tokens:,} tokens) | {one:.1f} MB/s | {two:.1f} MB/s | {two / one:.2f}x |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
