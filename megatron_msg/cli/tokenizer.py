"""msg-tokenizer: train a sentencepiece tokenizer, or encode/decode text with one.

    msg-tokenizer train --input corpus.jsonl --model-prefix out/spm --vocab-size 8000 --model-type bpe
    msg-tokenizer encode --model out/spm.model "some text"      # or --tokenizer byte
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

    train = sub.add_parser("train", help="train a sentencepiece model (special tokens: <eod> [PAD] [CLS] [SEP] [MASK])")
    train.add_argument("--input", nargs="+", required=True, help=".jsonl (text under --json-key) or plain text files")
    train.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--vocab-size", type=int, default=8000)
    train.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    train.add_argument("--json-key", default="text")
    train.add_argument("--character-coverage", type=float, default=1.0)
    train.add_argument("--max-sentences", type=int, default=1_000_000,
                       help="sentencepiece trains on a random sample of at most this many lines")
    train.add_argument("--threads", type=int, default=None)
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--skip-bad-lines", action="store_true", help="skip malformed jsonl lines instead of failing")

    for name, help_text in (("encode", "print the ids of a text"), ("decode", "print the text of ids")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--tokenizer", choices=["byte", "sentencepiece"], default=None,
                       help="default: sentencepiece when --model is given, else byte")
        p.add_argument("--model", default=None, help="sentencepiece .model file")
        p.add_argument("items", nargs="*", help="text (encode) or ids (decode); stdin when absent")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_msg.data.errors import DataError

    try:
        if args.command == "train":
            return _train(args)
        return _encode_decode(args)
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"msg-tokenizer: error: {exc}", file=sys.stderr)
        return 1


def _train(args) -> int:
    import os

    from megatron_msg.data.tokenizer import SentencePieceTokenizer
    from megatron_msg.data.tokenizer_training import TokenizerTrainConfig, train_sentencepiece

    config = TokenizerTrainConfig(
        inputs=args.input, model_prefix=args.model_prefix, vocab_size=args.vocab_size,
        model_type=args.model_type, json_key=args.json_key, character_coverage=args.character_coverage,
        max_sentences=args.max_sentences, num_threads=args.threads or os.cpu_count() or 1, seed=args.seed,
        skip_bad_lines=args.skip_bad_lines)
    path = train_sentencepiece(config)
    tok = SentencePieceTokenizer(path)
    print(f"wrote {path} ({args.model_type}, vocab {tok.vocab_size}, special tokens {tok.special_tokens})")
    return 0


def _encode_decode(args) -> int:
    from megatron_msg.data.tokenizer import build_tokenizer

    kind = args.tokenizer or ("sentencepiece" if args.model else "byte")
    tok = build_tokenizer(kind, args.model)
    items = args.items or [sys.stdin.read()]
    if args.command == "encode":
        print(" ".join(str(i) for i in tok.encode(" ".join(items))))
    else:
        ids = [int(x) for item in items for x in item.split()]
        sys.stdout.write(tok.decode(ids, skip_special=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
