#!/usr/bin/env bash
# GPT-2 data: GPT-2's byte-level BPE token ids, one sequence per document, <|endoftext|> between
# documents (what Megatron-LM's preprocess_data.py --append-eod writes).
#
#   INPUTS=openwebtext.jsonl VOCAB=gpt2/vocab.json MERGES=gpt2/merges.txt examples/gpt2/prepare_data.sh
#
# VOCAB + MERGES: GPT-2's files (any GPT-2 checkpoint has them); unset, a byte-level BPE of
# VOCAB_SIZE (default 50257) is trained on INPUTS and written in GPT-2's format as
# OUT_DIR/gpt2-vocab.json + gpt2-merges.txt.  Writes OUT_DIR/openwebtext_text_document.bin/.idx.
# INPUTS, OUT_DIR, VOCAB_SIZE, WORKERS: examples/launch/data_common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../launch/data_common.sh"
if [ -z "${VOCAB:-}" ]; then
    train_tokenizer bpe gpt2 50257
    VOCAB="$OUT_DIR/gpt2-vocab.json" MERGES="$OUT_DIR/gpt2-merges.txt"
fi
: "${MERGES:?set MERGES to GPT-2 merges.txt (with VOCAB)}"
msg-preprocess --input "${inputs[@]}" --output-prefix "$OUT_DIR/openwebtext" --tokenizer gpt2 \
    --vocab-file "$VOCAB" --merge-file "$MERGES" --workers "${WORKERS:-8}" --no-progress
