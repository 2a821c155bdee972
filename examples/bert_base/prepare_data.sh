#!/usr/bin/env bash
# Bert data: WordPiece token ids, one sequence per sentence, no end-of-document token (BERT's
# sentence pairs never cross documents: the index keeps them apart).
#
#   INPUTS="wiki.jsonl books.jsonl" TOKENIZER=bert-base-uncased/tokenizer.json examples/bert_base/prepare_data.sh
#
# TOKENIZER: a Hugging Face tokenizer.json with [CLS] [SEP] [MASK] [PAD] (bert-base-uncased's
# works); unset, a WordPiece of VOCAB_SIZE (default 30522) is trained on INPUTS into
# OUT_DIR/bert-tokenizer.json.  Writes OUT_DIR/bert_text_sentence.bin/.idx.  INPUTS, OUT_DIR,
# VOCAB_SIZE, WORKERS: examples/launch/data_common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../launch/data_common.sh"
if [ -z "${TOKENIZER:-}" ]; then
    train_tokenizer wordpiece bert-tokenizer 30522
    TOKENIZER="$OUT_DIR/bert-tokenizer.json"
fi
msg-preprocess --input "${inputs[@]}" --output-prefix "$OUT_DIR/bert" --tokenizer huggingface \
    --tokenizer-model "$TOKENIZER" --split-sentences --no-append-eod --workers "${WORKERS:-8}" --no-progress
