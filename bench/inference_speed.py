"""Inference speed of exported pruned models (the paper's Table 3).

Models, all built from the same base in one process and timed side by side (repeats interleave
the models, so load from other processes hits all of them alike; the median is reported):

* ``dense``: the unpruned model;
* ``pruned-<r>``: the compact model exported at ratio ``r`` (units physically removed, LoRA merged;
  the masks come from one-shot ``magnitude`` scores, which need no data: speed does not depend on
  which units are removed, only how many);
* ``pruned-<r>+lora``: the same compact model with a LoRA adapter (r = 8, all projections) left
  unmerged, i.e. what a pipeline that never merges would run.

Measured: forward latency of a ``[batch, seq]`` prefill, and greedy generation throughput
(new tokens / s). Also the ideal speed-up from FLOP counts: linear layers ``2 * in * out`` per token
(LoRA's two small matmuls included) plus causal attention ``2 * 2 * n_heads * head_dim * T(T+1)/2``
per layer and sequence (for generation, over the ``prompt + new - 1`` positions fed to the model).
``lora_penalty_%`` on the ``+lora`` rows is the cost of leaving the adapter unmerged: time vs the
merged ``pruned-<r>`` model at the same setting.

Timings are written only if the machine was quiet (see ``bench/quiet.py``: ``--max-load``,
``--allow-busy``); the load averages at start and end are in the JSON.

CPU default: batch 1,4 x seq 128, generation batch 1 (32 new tokens), 3 repeats.
Issue-9 grid (CPU): ``--batches 1 16 --seqs 128 512 --gen-batches 1 16`` (add ``2048`` to ``--seqs``
where time allows).
Full grid (GPU): ``--batches 1 4 16 --seqs 128 512 2048 --gen-batches 1 4 16 --repeats 10``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import quiet  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-gguf")
    p.add_argument("--ratios", type=float, nargs="*", default=[0.2, 0.5])
    p.add_argument("--saved", nargs="*", default=[], metavar="NAME=PATH",
                   help="Exported models (e.g. from recipe.py --save-models) timed next to dense under NAME.")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--seqs", type=int, nargs="+", default=[128])
    p.add_argument("--shapes", nargs="+", default=None, metavar="BxS",
                   help="Forward shapes to time instead of every --batches x --seqs pair (e.g. 1x128 16x512).")
    p.add_argument("--gen-batches", type=int, nargs="+", default=[1])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-lora", action="store_true", help="Skip the unmerged-LoRA variants.")
    p.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "inference_speed.json"))
    quiet.add_arguments(p)
    return p.parse_args(argv)


def linear_macs_per_token(model) -> int:
    """Sum of ``in * out`` over every ``nn.Linear`` (LoRA's A and B included; tied lm_head once)."""
    from torch import nn

    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def forward_flops(model, batch: int, seq: int) -> float:
    """FLOPs of one causal forward over ``[batch, seq]``: linear layers plus attention scores/values."""
    cfg = model.config
    attn = 2 * 2 * cfg.num_attention_heads * cfg.head_dim * seq * (seq + 1) / 2 * cfg.num_hidden_layers
    return batch * (2 * linear_macs_per_token(model) * seq + attn)


def build_models(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraprune_trainer.loading import load_model_and_tokenizer
    from loraprune_trainer.oneshot import oneshot_prune

    base, tok = load_model_and_tokenizer(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {"dense": base}
    reports = {}
    for r in args.ratios:
        result = oneshot_prune(base, tok, None, criterion="magnitude", pruning_ratio=r)
        models[f"pruned-{r:g}"] = result.model
        reports[f"pruned-{r:g}"] = result.report
        if not args.no_lora:
            import copy

            torch.manual_seed(0)
            lora = get_peft_model(copy.deepcopy(result.model),
                                  LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
            models[f"pruned-{r:g}+lora"] = lora
    for spec in args.saved:
        name, _, path = spec.partition("=")
        models[name] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        report_path = os.path.join(path, "pruning_report.json")
        if os.path.isfile(report_path):
            reports[name] = {k: v for k, v in common.read_json(report_path).items() if k != "settings"}
    models = {k: m.to(device).eval() for k, m in models.items()}
    return models, reports, tok, device


def time_forward(model, ids) -> float:
    import torch

    with torch.no_grad():
        if ids.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if ids.is_cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - t


def time_generate(model, ids, new_tokens: int, pad_id: int) -> float:
    import torch

    with torch.no_grad():
        if ids.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
        if ids.is_cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None):
    args = parse_args(argv)
    bad = [s for s in args.saved if "=" not in s or not os.path.isfile(os.path.join(s.partition("=")[2], "config.json"))]
    if bad:
        raise SystemExit(f"--saved needs NAME=PATH with an exported model folder at PATH; not usable: {bad}")
    load_at_start = quiet.check_start(args)  # before loading anything: a busy machine refuses in seconds
    import torch

    t_all = time.perf_counter()
    models, reports, tok, device = build_models(args)
    names = list(models)
    g = torch.Generator().manual_seed(0)
    vocab = models["dense"].config.vocab_size
    rows = []
    shapes = ([tuple(int(v) for v in shape.lower().split("x")) for shape in args.shapes] if args.shapes
              else [(b, s) for b in args.batches for s in args.seqs])
    for b, s in shapes:
        ids = torch.randint(0, vocab, (b, s), generator=g).to(device)
        samples = {n: [] for n in names}
        for n in names:  # warm-up
            time_forward(models[n], ids)
        for _ in range(args.repeats):
            for n in names:
                samples[n].append(time_forward(models[n], ids))
        for n in names:
            rows.append({"kind": "forward", "model": n, "batch": b, "seq": s,
                         "latency_ms": 1000 * statistics.median(samples[n]), "samples_s": samples[n],
                         "flops": forward_flops(models[n], b, s)})
        print(f"forward batch {b} seq {s} done", flush=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for b in args.gen_batches:
        ids = torch.randint(0, vocab, (b, args.prompt_len), generator=g).to(device)
        samples = {n: [] for n in names}
        for n in names:
            time_generate(models[n], ids, 2, pad)  # warm-up
        for _ in range(args.repeats):
            for n in names:
                samples[n].append(time_generate(models[n], ids, args.new_tokens, pad))
        for n in names:
            med = statistics.median(samples[n])
            rows.append({"kind": "generate", "model": n, "batch": b, "seq": args.prompt_len,
                         "new_tokens": args.new_tokens, "tokens_per_s": b * args.new_tokens / med,
                         "samples_s": samples[n],
                         # With a KV cache, generation computes what one causal forward over every
                         # position fed to the model would (the last new token is never fed back).
                         "flops": forward_flops(models[n], b, args.prompt_len + args.new_tokens - 1)})
        print(f"generate batch {b} done", flush=True)

    # Ratios against dense at the same setting.
    dense = {(r["kind"], r["batch"], r["seq"]): r for r in rows if r["model"] == "dense"}
    for r in rows:
        d = dense[(r["kind"], r["batch"], r["seq"])]
        if r["kind"] == "forward":
            r["time_vs_dense_%"] = 100.0 * (r["latency_ms"] / d["latency_ms"] - 1)
            r["ideal_speedup"] = d["flops"] / r["flops"]
            r["measured_speedup"] = d["latency_ms"] / r["latency_ms"]
        else:
            r["time_vs_dense_%"] = 100.0 * (d["tokens_per_s"] / r["tokens_per_s"] - 1)
            r["ideal_speedup"] = d["flops"] / r["flops"]
            r["measured_speedup"] = r["tokens_per_s"] / d["tokens_per_s"]
    # Unmerged LoRA's penalty: the same compact model with the adapter merged (pruned-<r>) vs not (+lora).
    merged = {(r["kind"], r["model"], r["batch"], r["seq"]): r for r in rows}
    for r in rows:
        if r["model"].endswith("+lora"):
            m = merged[(r["kind"], r["model"][:-len("+lora")], r["batch"], r["seq"])]
            # Both speed-ups are against the same dense timing, so their ratio is the time ratio.
            r["lora_penalty_%"] = 100.0 * (m["measured_speedup"] / r["measured_speedup"] - 1)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    for r in rows:
        r["params_M"] = params[r["model"]] / 1e6
    load_fields = quiet.check_end(args, load_at_start, rows)  # refuses (writes nothing) on a busy machine
    table = common.print_table(rows, ["kind", "model", "batch", "seq", "params_M", "latency_ms", "tokens_per_s",
                                      "time_vs_dense_%", "measured_speedup", "ideal_speedup", "lora_penalty_%"]
                               + (["busy"] if load_fields["busy"] else []), floatfmt="{:.2f}")
    common.write_json(args.out, {
        "benchmark": "inference speed (Table 3)", "rows": rows, "table": table, "parameters": params,
        "pruned_reports": reports, "device": device, "settings": vars(args),
        "machine": quiet.with_start_load(common.machine_info(), load_fields),
        "command": common.command_line(), "wall_s": time.perf_counter() - t_all, **load_fields,
    })
    plot(rows, names, os.path.splitext(args.out)[0] + ".png")


def plot(rows, names, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["kind"], r["batch"], r["seq"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(settings)), 3.8))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ys = []
        for s in settings:
            r = next(r for r in rows if (r["kind"], r["batch"], r["seq"]) == s and r["model"] == n)
            ys.append(r["measured_speedup"])
        ax.bar([k + (i - (len(names) - 1) / 2) * width for k in range(len(settings))], ys, width=width, label=n)
    ax.axhline(1.0, color="k", lw=1)
    ax.set_xticks(range(len(settings)), [f"{k}\nb{b} s{s}" for k, b, s in settings], fontsize=8)
    ax.set_ylabel("speed-up vs dense (measured)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
