#!/usr/bin/env python3
"""Prints the Markdown tables of docs/RESULTS-REAL.md from the JSON lines the
examples write (`needle_qa --json`, `quantize --json`).

    python3 crates/vlmq-candle/scripts/results_tables.py needle results-needle.jsonl
    python3 crates/vlmq-candle/scripts/results_tables.py ppl results-real.jsonl
    python3 crates/vlmq-candle/scripts/results_tables.py gguf results-gguf.jsonl

Each table has one row per run, then one summary row per method and setting:
the mean over seeds, and for every method but GPTQ how many seeds it beat GPTQ
on (lower answer NLL, or lower perplexity) among the seeds both have. When a
setting was run more than once with the same method and seed, the last line
wins. Only the standard library is used.
"""

import json
import sys
from statistics import mean

ORDER = {"RTN": 0, "GPTQ": 1, "GPTAQ": 2, "VLMQ": 3, "VLMQ+GPTAQ": 4}


def load(path, keep):
    runs = {}
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if not line:
            continue
        d = json.loads(line)
        if keep(d):
            runs[(d["bits"], d["group"], d["method"], d["seed"])] = d
    return runs


def groups(runs):
    """Yields `(bits, group, method, rows)` in table order: settings by falling
    bit width, methods in ORDER, rows by seed."""
    settings = sorted({(b, g) for (b, g, _, _) in runs}, key=lambda s: (-s[0], s[1]))
    for b, g in settings:
        for m in sorted({k[2] for k in runs if k[:2] == (b, g)}, key=ORDER.get):
            yield b, g, m, [runs[k] for k in sorted(runs) if k[:3] == (b, g, m)]


def wins(runs, b, g, m, key):
    mine = {s: d for (bb, gg, mm, s), d in runs.items() if (bb, gg, mm) == (b, g, m)}
    ref = {s: d for (bb, gg, mm, s), d in runs.items() if (bb, gg, mm) == (b, g, "GPTQ")}
    common = sorted(set(mine) & set(ref))
    if m == "GPTQ" or not common:
        return ""
    better = sum(1 for s in common if mine[s][key] < ref[s][key])
    return f"{better}/{len(common)}"


def seconds(d):
    imp = d.get("importance_seconds") or 0.0
    return f"{d['quant_seconds']:.0f}" + (f" ({imp:.0f})" if imp > 1 else "")


def needle(path):
    runs = load(path, lambda d: d.get("task") == "needle_qa")
    any_run = next(iter(runs.values()))
    print(
        f"| method | bits | group | seed | answer NLL (fp {any_run['answer_nll_fp']:.3f}) "
        f"| exact match (fp {any_run['exact_match_fp']:.3f}) | text ppl (fp {any_run['ppl_fp']:.2f}) "
        "| KL vs fp | context share of H trace, uniform -> weighted | quantize s (importance s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for b, g, m, rows in groups(runs):
        for d in rows:
            cs = d.get("context_share_before")
            share = (
                "n/a (no statistics)"
                if cs is None or d["method"] == "RTN"
                else f"{cs:.3f} -> {d['context_share_after']:.3f}"
            )
            print(
                f"| {m} | W{b} | {g} | {d['seed']} | {d['answer_nll']:.3f} | {d['exact_match']:.3f} "
                f"| {d['ppl']:.2f} | {d['kl']:.3f} | {share} | {seconds(d)} |"
            )
        if len(rows) > 1:
            w = wins(runs, b, g, m, "answer_nll")
            print(
                f"| **{m} mean** | W{b} | {g} | {len(rows)} seeds "
                f"| **{mean(d['answer_nll'] for d in rows):.3f}** "
                f"| **{mean(d['exact_match'] for d in rows):.3f}** "
                f"| {mean(d['ppl'] for d in rows):.2f} | {mean(d['kl'] for d in rows):.3f} "
                f"| {'lower NLL than GPTQ on ' + w + ' seeds' if w else ''} | |"
            )


def ppl(path):
    runs = load(path, lambda d: "ppl" in d and d.get("task") is None)
    print(
        "| method | bits | group | seed | true-sequential | ppl (ref) | ppl | KL vs ref (nats/token) "
        "| quantize s (importance s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for b, g, m, rows in groups(runs):
        for d in rows:
            # Lines written before the flag was recorded come from runs
            # without --one-forward: true-sequential, the default.
            ts = d.get("true_sequential", True)
            print(
                f"| {m} | W{b} | {g} | {d['seed']} | {'yes' if ts else 'no'} "
                f"| {d['ppl_fp']:.3f} | {d['ppl']:.3f} | {d['kl']:.4f} | {seconds(d)} |"
            )
        if len(rows) > 1:
            w = wins(runs, b, g, m, "ppl")
            print(
                f"| **{m} mean** | W{b} | {g} | {len(rows)} seeds | | "
                f"| **{mean(d['ppl'] for d in rows):.3f}** | **{mean(d['kl'] for d in rows):.4f}** "
                f"| {'lower ppl than GPTQ on ' + w + ' seeds' if w else ''} |"
            )


def gguf(path):
    """The GGUF table (the `gguf_table` example): per block type, candle's
    round-to-nearest, then vlmq's methods seed by seed with their means and
    how many seeds beat round-to-nearest (and, for VLMQ, GPTQ) on KL."""
    runs = {}
    for line in open(path, encoding="utf-8"):
        if line.strip():
            d = json.loads(line)
            if "gguf_type" in d:
                runs[(d["gguf_type"], d["method"], d["seed"])] = d
    source = [d for (t, _, _), d in runs.items() if t == "source"]
    if source:
        d = source[-1]
        print(f"Source file through QMatMul: ppl {d['ppl']:.3f}, KL {d['kl']:.4f}, "
              f"{d['file_bytes']} bytes (f32 reference ppl {d['ppl_fp']:.3f})\n")
    print("| type | method | seed | file bytes | ppl (ref) | ppl | KL vs ref (nats/token) "
          "| quantize s | write s | lower KL than candle RTN / GPTQ |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    order = {"candle-rtn": 0, "GPTQ": 1, "GPTAQ": 2, "VLMQ": 3}
    for t in ["q4_0", "q4_1", "q4_k", "q6_k", "q5_0", "q8_0"]:
        methods = sorted({m for (tt, m, _) in runs if tt == t}, key=lambda m: order.get(m, 9))
        rtn = next((d for (tt, m, _), d in runs.items() if tt == t and m == "candle-rtn"), None)
        gptq = {s: d for (tt, m, s), d in runs.items() if tt == t and m == "GPTQ"}
        for m in methods:
            rows = [runs[k] for k in sorted(runs) if k[0] == t and k[1] == m]
            for d in rows:
                print(f"| {t} | {m} | {'-' if m == 'candle-rtn' else d['seed']} | {d['file_bytes']} "
                      f"| {d['ppl_fp']:.3f} | {d['ppl']:.3f} | {d['kl']:.4f} "
                      f"| {d['quant_seconds']:.0f} | {d['write_seconds']:.2f} | |")
            if m != "candle-rtn" and rows:
                vs_rtn = sum(1 for d in rows if rtn and d["kl"] < rtn["kl"])
                common = [d for d in rows if d["seed"] in gptq]
                vs_gptq = sum(1 for d in common if d["kl"] < gptq[d["seed"]]["kl"])
                extra = f" / {vs_gptq}/{len(common)}" if m != "GPTQ" and common else ""
                print(f"| {t} | **{m} mean** | {len(rows)} seeds | | "
                      f"| **{mean(d['ppl'] for d in rows):.3f}** | **{mean(d['kl'] for d in rows):.4f}** "
                      f"| | | {vs_rtn}/{len(rows)}{extra} |")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("needle", "ppl", "gguf"):
        sys.exit(__doc__)
    {"needle": needle, "ppl": ppl, "gguf": gguf}[sys.argv[1]](sys.argv[2])
