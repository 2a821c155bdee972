#!/usr/bin/env bash
# Bert data: WordPiece token ids, one sequence per sentence, no end-of-document token (BERT's
# sentence pairs never cross documents: the index keeps them apart).
#
#   INPUTS="wiki.jsonl books.jsonl" TOKENIZER=bert-base-uncased/tokenizer.json examples/bert_base/prepare_data.sh
#
# INPUTS: jsonl files with the text under "text".  TOKENIZER: a Hugging Face tokenizer.json with
# [CLS] [SEP] [MASK] [PAD] (bert-base-uncased's works); unset, one is trained on INPUTS
# (VOCAB_SIZE, default 30522) and written to OUT_DIR/bert-tokenizer.json.
# OUT_DIR (default data/) receives bert_text_sentence.bin/.idx; WORKERS tokenizer processes.
set -euo pipefail
: "${INPUTS:?set INPUTS to the jsonl file(s)}"
OUT_DIR="${OUT_DIR:-data}"
mkdir -p "$OUT_DIR"
read -r -a inputs <<< "$INPUTS"
if [ -z "${TOKENIZER:-}" ]; then
    msg-tokenizer train --library hf --model-type wordpiece --vocab-size "${VOCAB_SIZE:-30522}" \
        --input "${inputs[@]}" --model-prefix "$OUT_DIR/bert-tokenizer"
    TOKENIZER="$OUT_DIR/bert-tokenizer.json"
fi
msg-preprocess --input "${inputs[@]}" --output-prefix "$OUT_DIR/bert" --tokenizer huggingface \
    --tokenizer-model "$TOKENIZER" --split-sentences --no-append-eod --workers "${WORKERS:-8}" --no-progress
