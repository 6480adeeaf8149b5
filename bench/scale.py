"""Cost at Llama-3-8B layer shapes: plain LoRA SFT vs LoRAPrune's criteria, per decoder layer and
extrapolated to 32 layers (the paper's Table 4 compares the LoRA-guided and full-gradient criteria on
LLaMA-7B: 52.6% less memory, 64.6% faster).

A random-initialised Llama with the 8B model's layer shapes (hidden 4096, MLP 14336, 32 query heads
over 8 key/value heads, head dim 128) is built for each ``--layers`` count, with the SmolLM2 tokenizer's
49,152-token vocabulary (the 8B model's is 128,256; embeddings are tied, so the head costs what one
embedding does) and timed by ``bench/overhead.py``: every variant in its own subprocess, at equal batch,
same steps. Step time and peak memory are fitted as ``fixed + per_layer * layers`` from the layer counts
(two counts give the line exactly): ``per_layer`` is what grows with depth (projections, their LoRA
adapters, activations, the criteria's per-layer work), ``fixed`` what does not (embeddings, LM head,
loss, optimizer bookkeeping, the process itself). The 32-layer column is the extrapolation.

    python bench/scale.py --threads 1                        # CPU, float32, 1 and 2 layers, ~10 min
    python bench/scale.py --device cuda --dtype bfloat16 --layers 2 4 --seq 1024 --batch 4
    python bench/scale.py --device cuda --quant nf4 --layers 2 4

Writes ``bench/results/scale_<device>[_<quant>].json`` (rows per variant, the fit and every overhead.py
run) only on a quiet machine (``--max-load``, ``--allow-busy``, checked by overhead.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

LLAMA3_8B_LAYER = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=8192,
                       rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
FULL_DEPTH = 32
# LLaMA-7B, paper Table 4 (LoRA-guided vs full-gradient criterion): memory and training time
PAPER_TABLE4 = {"memory_saving_%": 52.6, "speedup_%": 64.6}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--variants", nargs="+", default=["sft", "lora", "taylor_gate", "vanilla"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="runs per variant and layer count (medians; order rotates)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quant", default="none", choices=["none", "int8", "nf4"])
    p.add_argument("--tokenizer", default="smollm2-gguf", help="Where the tokenizer (and vocabulary size) come from.")
    p.add_argument("--dataset", default=None, help="Training text for overhead.py (default: its C4 sample).")
    p.add_argument("--out", default=None)
    p.add_argument("--profile", action="store_true",
                   help="Pass --profile to overhead.py: the ops each variant adds to the first, per layer count.")
    p.add_argument("--allow-busy", action="store_true")
    p.add_argument("--max-load", type=float, default=None)
    return p.parse_args(argv)


def build_model(layers: int, tokenizer, folder: str) -> None:
    """Save a random Llama with 8B layer shapes and ``layers`` decoder layers (float32) plus the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=layers, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **LLAMA3_8B_LAYER)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def fit(points: dict[int, float]) -> tuple[float, float]:
    """``(fixed, per_layer)`` of the line through the two extreme layer counts."""
    lo, hi = min(points), max(points)
    per_layer = (points[hi] - points[lo]) / (hi - lo)
    return points[lo] - per_layer * lo, per_layer


def main(argv=None):
    args = parse_args(argv)
    import overhead
    from transformers import AutoTokenizer

    from loraprune_trainer.loading import resolve_model_source

    if len(set(args.layers)) < 2:
        raise SystemExit("--layers needs two or more different counts to separate per-layer from fixed costs.")
    source, gguf = resolve_model_source(args.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}))
    suffix = f"_{args.quant}" if args.quant != "none" else ""
    out = args.out or os.path.join(common.RESULTS_DIR, f"scale_{args.device}{suffix}.json")
    work = tempfile.mkdtemp(prefix="scale-")
    started = time.time()
    runs = {}
    try:
        for layers in sorted(set(args.layers)):
            folder = os.path.join(work, f"llama3-8b-shapes-{layers}l")
            build_model(layers, tokenizer, folder)
            result_path = os.path.join(work, f"overhead-{layers}.json")
            cmd = ["--model", folder, "--variants", *args.variants, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", str(args.rounds), "--threads",
                   str(args.threads), "--device", args.device, "--dtype", args.dtype, "--quant", args.quant,
                   "--out", result_path]
            if args.dataset:
                cmd += ["--dataset", args.dataset]
            if args.allow_busy:
                cmd.append("--allow-busy")
            if args.profile:
                cmd.append("--profile")
            if args.max_load is not None:
                cmd += ["--max-load", str(args.max_load)]
            overhead.main(cmd)
            with open(result_path) as f:
                runs[layers] = json.load(f)
            # The model and result files were temporary: record what they were, not where.
            runs[layers]["settings"].update(model=f"llama3-8b-shapes-{layers}l (random, built by bench/scale.py)",
                                            out=None)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mem_key = "peak_cuda_mib" if args.device == "cuda" else "peak_rss_mib"
    rows = []
    for variant in args.variants:
        step = {n: next(r for r in runs[n]["rows"] if r["variant"] == variant)["step_s"] for n in runs}
        mem = {n: next(r for r in runs[n]["rows"] if r["variant"] == variant)[mem_key] for n in runs}
        step_fixed, step_layer = fit(step)
        mem_fixed, mem_layer = fit(mem)
        rows.append({"variant": variant, "step_s_fixed": step_fixed, "step_s_per_layer": step_layer,
                     f"step_s_{FULL_DEPTH}_layers": step_fixed + FULL_DEPTH * step_layer,
                     "mem_mib_fixed": mem_fixed, "mem_mib_per_layer": mem_layer,
                     f"mem_mib_{FULL_DEPTH}_layers": mem_fixed + FULL_DEPTH * mem_layer,
                     **{f"step_s_{n}l": step[n] for n in step}, **{f"mem_mib_{n}l": mem[n] for n in mem}})
    base = rows[0]
    for r in rows:
        for n in runs:  # measured directly, side by side: steadier than the fitted extrapolation
            r[f"step_x_first_{n}l"] = r[f"step_s_{n}l"] / base[f"step_s_{n}l"]
        r["step_x_first_32l"] = r[f"step_s_{FULL_DEPTH}_layers"] / base[f"step_s_{FULL_DEPTH}_layers"]
        r["mem_x_first_32l"] = r[f"mem_mib_{FULL_DEPTH}_layers"] / base[f"mem_mib_{FULL_DEPTH}_layers"]
    by = {r["variant"]: r for r in rows}
    table4 = None
    if "lora" in by and "vanilla" in by:
        lo, va = by["lora"], by["vanilla"]
        table4 = {"memory_saving_%": 100 * (1 - lo[f"mem_mib_{FULL_DEPTH}_layers"] / va[f"mem_mib_{FULL_DEPTH}_layers"]),
                  "speedup_%": 100 * (va[f"step_s_{FULL_DEPTH}_layers"] / lo[f"step_s_{FULL_DEPTH}_layers"] - 1),
                  "paper": PAPER_TABLE4}
    table = common.print_table(rows, ["variant", "step_s_fixed", "step_s_per_layer", f"step_s_{FULL_DEPTH}_layers",
                                      "step_x_first_32l", "mem_mib_fixed", "mem_mib_per_layer",
                                      f"mem_mib_{FULL_DEPTH}_layers", "mem_x_first_32l"], floatfmt="{:.2f}")
    if table4:
        print(f"lora vs vanilla at {FULL_DEPTH} layers: {table4['memory_saving_%']:.1f}% less memory, "
              f"{table4['speedup_%']:.1f}% faster (paper, LLaMA-7B: {PAPER_TABLE4['memory_saving_%']}%, "
              f"{PAPER_TABLE4['speedup_%']}%)")
    busy = any(r.get("busy") for r in runs.values())
    common.write_json(out, {"benchmark": "cost at Llama-3-8B layer shapes", "rows": rows, "table": table,
                            "table4": table4, "shapes": LLAMA3_8B_LAYER, "vocab_size": len(tokenizer),
                            "settings": vars(args), "runs": {str(k): v for k, v in runs.items()}, "busy": busy,
                            "command": common.command_line(), "wall_s": time.time() - started,
                            "machine": common.machine_info()})


if __name__ == "__main__":
    main()
