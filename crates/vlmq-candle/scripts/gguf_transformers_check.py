#!/usr/bin/env python3
"""Scores a GGUF file written by vlmq with Hugging Face transformers' own GGUF
loader (every tensor dequantized by the `gguf` package, llama.cpp's q/k row
order undone by transformers), on the token windows the `gguf_table` example
wrote beside it, and compares the perplexity with vlmq's f32 score of the same
file (`ppl_dequantized` of the example's JSON line).

    gguf_table --model SRC.gguf --calib TEXT --gguf q4_k --method gptq --work DIR --keep \
        --json line.jsonl
    python crates/vlmq-candle/scripts/gguf_transformers_check.py \
        --gguf DIR/GPTQ-seed0-q4_k.gguf --windows DIR/eval-windows.json --json line.jsonl

Needs torch, transformers and gguf (a venv outside the repository).
"""

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def perplexity(model, windows):
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logits = model(ids).logits[0, :-1].double()
            lp = torch.log_softmax(logits, dim=-1)
            nll -= lp.gather(1, ids[0, 1:, None]).sum().item()
            count += len(w) - 1
    return math.exp(nll / count)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True, type=Path)
    p.add_argument("--windows", required=True, type=Path)
    p.add_argument("--json", type=Path, help="the example's JSON lines: the line of this file's type and method")
    a = p.parse_args()
    windows = json.loads(a.windows.read_text())
    model = AutoModelForCausalLM.from_pretrained(
        str(a.gguf.parent), gguf_file=a.gguf.name, torch_dtype=torch.float32
    )
    ppl = perplexity(model, windows)
    out = {"gguf": str(a.gguf), "transformers_ppl": ppl}
    if a.json:
        ty = a.gguf.stem.rsplit("-", 1)[-1]
        for line in a.json.read_text().splitlines():
            d = json.loads(line)
            if d.get("gguf_type") == ty and d.get("ppl_dequantized") is not None and (
                a.gguf.stem.startswith(d["method"]) or d["method"] == "candle-rtn" and "candle-rtn" in a.gguf.stem
            ):
                out["vlmq_ppl_dequantized"] = d["ppl_dequantized"]
                out["relative_difference"] = abs(ppl - d["ppl_dequantized"]) / d["ppl_dequantized"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
