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
# SEQ_LEN (256), AFTER (seconds before the timed kill, 60).
# The points use the test-only variable VLMQ_TEST_KILL_AT=<point>:<n>: the
# run pauses there and this script kills it with `kill -9`.
set -euo pipefail
: "${VLMQ:?the vlmq binary (cargo build --release -p vlmq-cli)}"
: "${MODEL:?a .gguf file or a Hugging Face model directory}"
: "${TEXT:?a calibration text file}"
: "${WORK:?a scratch directory}"
ARGS=(--method "${METHOD:-vlmq}" --samples "${SAMPLES:-8}" --seq-len "${SEQ_LEN:-256}")
mkdir -p "$WORK"

run() { # DIR: runs into DIR/out with DIR/state, stderr appended to DIR/log
    "$VLMQ" quantize "$MODEL" --calib "$TEXT" "${ARGS[@]}" \
        --out "$1/out" --state-dir "$1/state" 2>>"$1/log"
}

kill_at() { # DIR POINT: runs until the point, then kill -9
    local dir=$1 point=$2 pid
    mkdir -p "$dir"
    VLMQ_TEST_KILL_AT=$point run "$dir" &
    pid=$!
    until grep -q "kill point $point reached" "$dir/log" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$dir: the run ended before $point" >&2
            exit 1
        fi
        sleep 0.2
    done
    kill -9 "$pid"
    wait "$pid" || echo "$(basename "$dir"): killed at $point (status $?)"
}

kill_after() { # DIR SECONDS: kill -9 at an arbitrary moment
    local dir=$1 pid
    mkdir -p "$dir"
    run "$dir" &
    pid=$!
    sleep "$2"
    kill -9 "$pid"
    wait "$pid" || echo "$(basename "$dir"): killed after $2 s (status $?)"
}

finish() { # DIR: resumes to completion and compares with the reference
    local dir=$1
    run "$dir"
    tail -n 1 "$dir/log"
    for f in "$WORK/reference/out"/*; do
        cmp "$f" "$dir/out/$(basename "$f")"
    done
    [ "$(ls "$WORK/reference/out")" = "$(ls "$dir/out")" ]
    echo "$(basename "$dir"): identical to the uninterrupted run"
}

mkdir -p "$WORK/reference"
start=$(date +%s)
run "$WORK/reference"
echo "reference: $(tail -n 1 "$WORK/reference/log") ($(($(date +%s) - start)) s wall)"

kill_at "$WORK/importance" importance:15
finish "$WORK/importance"

# Block 12's second capture pass (4 passes per block, true-sequential).
kill_at "$WORK/mid-block" capture:50
finish "$WORK/mid-block"

# Half of block 13's state tensors written (state writes: the manifest at
# open, then per block its tensors, its reports and the manifest).
kill_at "$WORK/state-file" file-half:41
finish "$WORK/state-file"

# Half of model.safetensors written, then a second kill in the resumed
# run right after its checkpoint swap.
kill_at "$WORK/checkpoint" dir-half:1
kill_at "$WORK/checkpoint" dir-swapped:1
finish "$WORK/checkpoint"

kill_after "$WORK/timed" "${AFTER:-60}"
finish "$WORK/timed"
