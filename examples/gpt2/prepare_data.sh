#!/usr/bin/env bash
# GPT-2 data: GPT-2's byte-level BPE token ids, one sequence per document, <|endoftext|> between
# documents (what Megatron-LM's preprocess_data.py --append-eod writes).
#
#   INPUTS=openwebtext.jsonl VOCAB=gpt2/vocab.json MERGES=gpt2/merges.txt examples/gpt2/prepare_data.sh
#
# INPUTS: jsonl files (text under "text").  VOCAB + MERGES: GPT-2's files (from any GPT-2 checkpoint);
# unset, a byte-level BPE of VOCAB_SIZE (default 50257) is trained on INPUTS and written in GPT-2's
# format as OUT_DIR/gpt2-vocab.json + gpt2-merges.txt.  OUT_DIR default data/; WORKERS processes.
set -euo pipefail
: "${INPUTS:?set INPUTS to the jsonl file(s)}"
OUT_DIR="${OUT_DIR:-data}"
mkdir -p "$OUT_DIR"
read -r -a inputs <<< "$INPUTS"
if [ -z "${VOCAB:-}" ]; then
    msg-tokenizer train --library hf --model-type bpe --vocab-size "${VOCAB_SIZE:-50257}" \
        --input "${inputs[@]}" --model-prefix "$OUT_DIR/gpt2"
    VOCAB="$OUT_DIR/gpt2-vocab.json" MERGES="$OUT_DIR/gpt2-merges.txt"
fi
: "${MERGES:?set MERGES to GPT-2 merges.txt (with VOCAB)}"
msg-preprocess --input "${inputs[@]}" --output-prefix "$OUT_DIR/openwebtext" --tokenizer gpt2 \
    --vocab-file "$VOCAB" --merge-file "$MERGES" --workers "${WORKERS:-8}" --no-progress
