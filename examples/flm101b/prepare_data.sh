#!/usr/bin/env bash
# FLM-101B data: a 100k BPE (Hugging Face tokenizer.json), one indexed dataset per corpus, blended
# at training time by data.paths (DATA_PATHS="0.7 data/web_text_document 0.3 data/books_text_document").
#
#   INPUTS="web.jsonl books.jsonl" TOKENIZER=flm-tokenizer.json examples/flm101b/prepare_data.sh
#
# One dataset per input, named after the file: web.jsonl -> OUT_DIR/web_text_document.bin/.idx.
# TOKENIZER: a tokenizer.json with an end-of-document token (<|endoftext|>, </s>, <eod> or <eos>);
# unset, a byte-level BPE of VOCAB_SIZE (default 100256) is trained on INPUTS into
# OUT_DIR/tokenizer.json.  INPUTS, OUT_DIR, VOCAB_SIZE, WORKERS: examples/launch/data_common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../launch/data_common.sh"
if [ -z "${TOKENIZER:-}" ]; then
    train_tokenizer bpe tokenizer 100256
    TOKENIZER="$OUT_DIR/tokenizer.json"
fi
for input in "${inputs[@]}"; do
    msg-preprocess --input "$input" --output-prefix "$OUT_DIR/$(basename "${input%.jsonl}")" \
        --tokenizer huggingface --tokenizer-model "$TOKENIZER" --workers "${WORKERS:-16}" --no-progress
done
