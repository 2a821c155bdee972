#!/usr/bin/env bash
# FLM-101B data: a 100k BPE (Hugging Face tokenizer.json), one indexed dataset per corpus, blended
# at training time by data.paths (DATA_PATHS="0.7 data/web_text_document 0.3 data/books_text_document").
#
#   INPUTS="web.jsonl books.jsonl" TOKENIZER=flm-tokenizer.json examples/flm101b/prepare_data.sh
#
# INPUTS: jsonl files (text under "text"), one dataset each, named after the file: web.jsonl ->
# OUT_DIR/web_text_document.bin/.idx.  TOKENIZER: a tokenizer.json with an end-of-document token
# (<|endoftext|>, </s>, <eod> or <eos>); unset, a byte-level BPE of VOCAB_SIZE (default 100256) is
# trained on INPUTS into OUT_DIR/tokenizer.json.  OUT_DIR default data/; WORKERS tokenizer processes.
set -euo pipefail
: "${INPUTS:?set INPUTS to the jsonl file(s)}"
OUT_DIR="${OUT_DIR:-data}"
mkdir -p "$OUT_DIR"
read -r -a inputs <<< "$INPUTS"
if [ -z "${TOKENIZER:-}" ]; then
    msg-tokenizer train --library hf --model-type bpe --vocab-size "${VOCAB_SIZE:-100256}" \
        --input "${inputs[@]}" --model-prefix "$OUT_DIR/tokenizer"
    TOKENIZER="$OUT_DIR/tokenizer.json"
fi
for input in "${inputs[@]}"; do
    name="$(basename "${input%.jsonl}")"
    msg-preprocess --input "$input" --output-prefix "$OUT_DIR/$name" --tokenizer huggingface \
        --tokenizer-model "$TOKENIZER" --workers "${WORKERS:-16}" --no-progress
done
