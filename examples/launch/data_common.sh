# Shared by the recipes' prepare_data.sh: the inputs, the output folder, and training a tokenizer
# when none is given.  Sourced, never run.  Settings (environment variables):
#   INPUTS      jsonl file(s), one document per line, text under "text" (space-separated)
#   OUT_DIR     where the tokenizer and the .bin/.idx files go (default data/)
#   VOCAB_SIZE  size of a tokenizer trained here (default: the recipe's)
#   WORKERS     msg-preprocess tokenizer processes (default: the recipe's)
set -euo pipefail
: "${INPUTS:?set INPUTS to the jsonl file(s)}"
OUT_DIR="${OUT_DIR:-data}"
mkdir -p "$OUT_DIR"
read -r -a inputs <<< "$INPUTS"

# train_tokenizer MODEL_TYPE NAME DEFAULT_VOCAB: a Hugging Face tokenizer of MODEL_TYPE (bpe,
# wordpiece, unigram) trained on the inputs, written as OUT_DIR/NAME.json (bpe: also GPT-2's
# OUT_DIR/NAME-vocab.json and NAME-merges.txt).
train_tokenizer() {
    msg-tokenizer train --library hf --model-type "$1" --vocab-size "${VOCAB_SIZE:-$3}" \
        --input "${inputs[@]}" --model-prefix "$OUT_DIR/$2"
}
