"""msg-tokenizer: train a tokenizer, or encode/decode text with one.

    msg-tokenizer train --input corpus.jsonl --model-prefix out/spm --vocab-size 8000 --model-type bpe
    msg-tokenizer train --library hf --model-type wordpiece --input c.jsonl --model-prefix out/wp  # out/wp.json
    msg-tokenizer encode --model out/spm.model "some text"      # or --tokenizer byte
    msg-tokenizer encode --model out/wp.json "some text"        # a Hugging Face tokenizer.json
    msg-tokenizer encode --model gpt2/vocab.json --merge-file gpt2/merges.txt "some text"
    msg-tokenizer decode --model out/spm.model 101 2087 ...
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msg-tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a tokenizer with every special token reserved")
    train.add_argument("--input", nargs="+", required=True, help=".jsonl (text under --json-key) or plain text files")
    train.add_argument("--library", choices=["sentencepiece", "hf"], default="sentencepiece",
                       help="sentencepiece: PREFIX.model + PREFIX.vocab (special tokens <eod> [PAD] [CLS] [SEP] "
                            "[MASK]); hf: the Hugging Face tokenizers library, PREFIX.json (and for bpe GPT-2's "
                            "PREFIX-vocab.json + PREFIX-merges.txt), special tokens [PAD] [UNK] [CLS] [SEP] [MASK] "
                            "<|endoftext|>")
    train.add_argument("--model-prefix", required=True, help="output files start with this")
    train.add_argument("--vocab-size", type=int, default=8000)
    train.add_argument("--model-type", choices=["bpe", "unigram", "wordpiece"], default="bpe",
                       help="bpe, unigram; wordpiece (BERT's) with --library hf")
    train.add_argument("--json-key", default="text")
    train.add_argument("--character-coverage", type=float, default=1.0)
    train.add_argument("--max-sentences", type=int, default=1_000_000,
                       help="train on at most this many lines (sentencepiece: a random sample)")
    train.add_argument("--threads", type=int, default=None)
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--skip-bad-lines", action="store_true", help="skip malformed jsonl lines instead of failing")

    for name, help_text in (("encode", "print the ids of a text"), ("decode", "print the text of ids")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--tokenizer", choices=["byte", "sentencepiece", "huggingface", "gpt2"], default=None,
                       help="default: from the files given (--merge-file: gpt2; a .json: huggingface; "
                            "another file: sentencepiece; none: byte)")
        p.add_argument("--model", default=None, help="sentencepiece .model, tokenizer.json, or GPT-2 vocab.json")
        p.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
        p.add_argument("items", nargs="*", help="text (encode) or ids (decode); stdin when absent")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_msg.data.errors import DataError

    try:
        if args.command == "train":
            return _train(args)
        return _encode_decode(args)
    except (DataError, ValueError, OSError) as exc:  # the user's input or files: one line, exit 2
        print(f"msg-tokenizer: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _train(args) -> int:
    import os

    from megatron_msg.data.tokenizer import build_tokenizer
    from megatron_msg.data.tokenizer_training import TokenizerTrainConfig, train_hf_tokenizer, train_sentencepiece

    if args.library == "sentencepiece" and args.model_type == "wordpiece":
        raise ValueError("--model-type wordpiece needs --library hf (sentencepiece trains bpe or unigram)")
    config = TokenizerTrainConfig(
        inputs=args.input, model_prefix=args.model_prefix, vocab_size=args.vocab_size,
        model_type=args.model_type, json_key=args.json_key, character_coverage=args.character_coverage,
        max_sentences=args.max_sentences, num_threads=args.threads or os.cpu_count() or 1, seed=args.seed,
        skip_bad_lines=args.skip_bad_lines)
    if args.library == "hf":
        path = train_hf_tokenizer(config)
        tok = build_tokenizer("huggingface", path)
    else:
        path = train_sentencepiece(config)
        tok = build_tokenizer("sentencepiece", path)
    print(f"wrote {path} ({args.library} {args.model_type}, vocab {tok.vocab_size}, special tokens {tok.special_tokens})")
    return 0


def _encode_decode(args) -> int:
    from megatron_msg.data.tokenizer import build_tokenizer, infer_tokenizer_kind

    kind = args.tokenizer or infer_tokenizer_kind(args.model, args.merge_file)
    tok = build_tokenizer(kind, args.model, merges_file=args.merge_file)
    items = args.items or [sys.stdin.read()]
    if args.command == "encode":
        print(" ".join(str(i) for i in tok.encode(" ".join(items))))
    else:
        try:
            ids = [int(x) for item in items for x in item.split()]
        except ValueError:
            raise ValueError(f"decode takes integer ids, got {' '.join(items)[:60]!r}") from None
        sys.stdout.write(tok.decode(ids, skip_special=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
