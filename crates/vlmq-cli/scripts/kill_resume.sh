#!/usr/bin/env bash
# Kills `vlmq quantize` with SIGKILL at chosen points of a real run, resumes
# it with the same --state-dir, and compares the checkpoint byte for byte
# with an uninterrupted run's (issue 25; the table is in docs/RELIABILITY.md).
#
#   VLMQ=target/release/vlmq MODEL=model.gguf TEXT=calibration.txt WORK=/tmp/kill \
#     crates/vlmq-cli/scripts/kill_resume.sh
#
# MODEL: a .gguf file or an HF directory; TEXT: any long English text (e.g.
# CPython's pydoc_data/topics.py). Optional: METHOD (vlmq), SAMPLES (8),
# SEQ_LEN (256), POINTS (the scenarios, below).
#
# A scenario is a comma-separated list of kills made one after the other
# (each on a rerun of the same command), then a rerun to completion:
# `<point>:<n>` uses the test-only variable VLMQ_TEST_KILL_AT=<point>:<n>
# (the run pauses there and this script kills it with `kill -9`);
# `after:<s>` kills the run `s` seconds after its start, wherever it is.
# The defaults, for a 30-block model (one capture chunk per pass, four
# passes per block, true-sequential; seven layers; three state writes per
# block after one at open):
#   importance:15            the importance pass (VLMQ only)
#   capture:50               block 12's second capture pass
#   solve:100                block 14's second layer solve
#   file-half:41             half of block 13's state tensors written
#   dir-half:1,dir-swapped:1 half of model.safetensors; then, in the rerun,
#                            right after the checkpoint's swap
#   after:45                 a timed kill
# Prints one Markdown table row per scenario (also in $WORK/table.md).
set -euo pipefail
: "${VLMQ:?the vlmq binary (cargo build --release -p vlmq-cli)}"
: "${MODEL:?a .gguf file or a Hugging Face model directory}"
: "${TEXT:?a calibration text file}"
: "${WORK:?a scratch directory}"
METHOD=${METHOD:-vlmq}
DEFAULT_POINTS="capture:50 solve:100 file-half:41 dir-half:1,dir-swapped:1 after:45"
if [ "$METHOD" != gptq ] && [ "$METHOD" != rtn ]; then
    DEFAULT_POINTS="importance:15 $DEFAULT_POINTS"
fi
POINTS=${POINTS:-$DEFAULT_POINTS}
ARGS=(--method "$METHOD" --samples "${SAMPLES:-8}" --seq-len "${SEQ_LEN:-256}")
mkdir -p "$WORK"

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }'; }

# Starts a run into DIR/out with DIR/state in the background (stderr appended
# to DIR/log), with VLMQ_TEST_KILL_AT=POINT when a point is given; $pid is
# the vlmq process itself (env execs it), so `kill -9 $pid` kills vlmq.
start() { # DIR [POINT]
    mkdir -p "$1"
    env ${2:+VLMQ_TEST_KILL_AT=$2} "$VLMQ" quantize "$MODEL" --calib "$TEXT" "${ARGS[@]}" \
        --out "$1/out" --state-dir "$1/state" >/dev/null 2>>"$1/log" &
    pid=$!
}

# After a kill the output is absent or a complete checkpoint, never a part.
absent_or_complete() { # DIR
    [ -e "$1/out" ] || return 0
    [ "$(ls -A "$WORK/reference/out")" = "$(ls -A "$1/out")" ] || {
        echo "$1: a partial checkpoint after a kill: $(ls -A "$1/out")" >&2
        exit 1
    }
    for f in "$WORK/reference/out"/*; do cmp "$f" "$1/out/$(basename "$f")"; done
}

kill_one() { # DIR KILL: one kill (a point or after:<s>)
    local dir=$1 kill=$2 status
    if [[ $kill == after:* ]]; then
        start "$dir"
        sleep "${kill#after:}"
        kill -0 "$pid" 2>/dev/null || { echo "$dir: the run ended before $kill" >&2; exit 1; }
    else
        start "$dir" "$kill"
        until grep -q "kill point $kill reached" "$dir/log" 2>/dev/null; do
            kill -0 "$pid" 2>/dev/null || { echo "$dir: the run ended before $kill" >&2; exit 1; }
            sleep 0.2
        done
    fi
    kill -9 "$pid"
    wait "$pid" && status=0 || status=$?
    [ "$status" = 137 ] || { echo "$dir: exit status $status, not SIGKILL's 137" >&2; exit 1; }
    absent_or_complete "$dir"
}

scenario() { # KILLS (comma-separated)
    local kills=$1 dir="$WORK/${1//[:,]/-}" t0 killed resumed blocks
    rm -rf "$dir"
    t0=$(now)
    for k in ${kills//,/ }; do kill_one "$dir" "$k"; done
    killed=$(since "$t0")
    t0=$(now)
    "$VLMQ" quantize "$MODEL" --calib "$TEXT" "${ARGS[@]}" \
        --out "$dir/out" --state-dir "$dir/state" >/dev/null 2>>"$dir/log"
    resumed=$(since "$t0")
    blocks=$(grep -o 'resumed after [0-9]* blocks' "$dir/log" | tail -n 1 | grep -o '[0-9]*' || echo 0)
    [ "$(ls -A "$WORK/reference/out")" = "$(ls -A "$dir/out")" ]
    for f in "$WORK/reference/out"/*; do cmp "$f" "$dir/out/$(basename "$f")"; done
    echo "| $METHOD | \`${kills//,/\`, then \`}\` | $blocks | identical (every file, cmp) | $killed | $resumed |" |
        tee -a "$WORK/table.md"
}

rm -rf "$WORK/reference"
mkdir -p "$WORK/reference"
t0=$(now)
"$VLMQ" quantize "$MODEL" --calib "$TEXT" "${ARGS[@]}" \
    --out "$WORK/reference/out" --state-dir "$WORK/reference/state" >/dev/null 2>>"$WORK/reference/log"
echo "| $METHOD | none (uninterrupted) | - | reference: $(ls "$WORK/reference/out" | tr '\n' ' ')| $(since "$t0") | - |" |
    tee -a "$WORK/table.md"
for s in $POINTS; do scenario "$s"; done
