"""msg-preprocess: jsonl -> Megatron-LM mmap indexed dataset (.bin/.idx).

    msg-preprocess --input corpus.jsonl --output-prefix data/corpus --tokenizer byte
    msg-preprocess --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer sentencepiece --tokenizer-model spm.model --workers 2 --split-sentences

Writes <output-prefix>_<json-key>_document.{bin,idx} (``_sentence`` with --split-sentences), the
names Megatron-LM's preprocess_data.py uses, plus a .meta.json with the tokenizer fingerprint.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msg-preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="jsonl file(s), one document per line")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--json-key", default="text", help="field holding the document text (default: text)")
    p.add_argument("--tokenizer", choices=["byte", "sentencepiece", "huggingface", "gpt2"], default=None,
                   help="default: from the files given (--merge-file: gpt2; a .json: huggingface; "
                        "another file: sentencepiece; none: byte)")
    p.add_argument("--tokenizer-model", "--vocab-file", dest="tokenizer_model", default=None,
                   help="sentencepiece .model, Hugging Face tokenizer.json, or GPT-2 vocab.json")
    p.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (with --tokenizer gpt2)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (1: in this process)")
    p.add_argument("--split-sentences", action="store_true", help="one sequence per sentence (BERT)")
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                   help="do not end each document with the EOD token")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed lines, missing keys and empty documents (reported) instead of failing")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_msg.data.errors import DataError
    from megatron_msg.data.preprocessing import PreprocessConfig, preprocess_jsonl
    from megatron_msg.data.tokenizer import infer_tokenizer_kind

    config = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, json_key=args.json_key,
        tokenizer=args.tokenizer or infer_tokenizer_kind(args.tokenizer_model, args.merge_file),
        tokenizer_model=args.tokenizer_model, merges_file=args.merge_file, workers=args.workers,
        append_eod=args.append_eod, split_sentences=args.split_sentences, skip_bad_lines=args.skip_bad_lines,
        progress=args.progress)
    try:
        stats = preprocess_jsonl(config)
    except (DataError, ValueError, OSError) as exc:  # user input: exit 2, one line, nothing written
        print(f"msg-preprocess: error: {' '.join(str(exc).split())}; nothing was written", file=sys.stderr)
        return 2
    print(f"wrote {stats.prefix}.bin/.idx: {stats.documents} documents, {stats.sequences} sequences, "
          f"{stats.tokens} tokens from {stats.input_bytes / 2**20:.1f} MB in {stats.seconds:.2f}s "
          f"({stats.mb_per_s:.1f} MB/s, {config.workers} worker{'s' if config.workers > 1 else ''})")
    if stats.skipped_lines:
        print(f"skipped {len(stats.skipped_lines)} bad line(s):", file=sys.stderr)
        for path, line, reason in stats.skipped_lines[:20]:
            print(f"  {path}:{line}: {reason}", file=sys.stderr)
        if len(stats.skipped_lines) > 20:
            print(f"  ... and {len(stats.skipped_lines) - 20} more", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
