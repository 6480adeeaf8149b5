"""Time of the LoRA criterion on one decoder layer's seven projections: the reference form
(`criterion.lora_importance`, fresh temporaries) vs the in-place form the trainer uses
(`criterion.lora_member_scores`), alternating, in one process. Random weights of the given shapes
(default SmolLM2-135M: hidden 576, 9 query / 3 KV heads of 64, MLP 1536). Prints a table, writes JSON.

    python bench/criterion_speed.py --threads 1
    python bench/criterion_speed.py --hidden 4096 --heads 32 --kv_heads 8 --intermediate 14336 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loraprune_trainer.criteria import lora_importance, lora_member_scores, lora_parts
from loraprune_trainer.structure import discover_structure

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv_heads", type=int, default=3)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(HERE, "results", "criterion_speed.json"))
    opts = p.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)

    config = LlamaConfig(hidden_size=opts.hidden, num_attention_heads=opts.heads, num_key_value_heads=opts.kv_heads,
                         head_dim=opts.head_dim, intermediate_size=opts.intermediate, num_hidden_layers=1,
                         vocab_size=128)
    model = get_peft_model(LlamaForCausalLM(config).to(opts.device),
                           LoraConfig(r=opts.lora_r, lora_alpha=2 * opts.lora_r, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.grad = torch.randn_like(param)
    structure = discover_structure(model)
    members = [(g, m, structure.module(g, m)) for g in structure.groups() for m in g.members]
    workspace: dict = {}

    def sync():
        if opts.device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.no_grad()
    def reference():
        for group, member, module in members:
            a, b, s = lora_parts(module)
            w = module.get_base_layer().weight.float()
            imp = lora_importance(w, a.float(), b.float(), s, a.grad.float(), b.grad.float())
            imp.sum(dim=1 - member.dim).view(group.num_units, member.unit_size).sum(dim=1)

    def in_place():
        for group, member, module in members:
            lora_member_scores(module, member, group.num_units, "square", workspace)

    times = {"reference": [], "in_place": []}
    for fn in (reference, in_place):  # warm-up
        fn()
    for _ in range(opts.repeats):
        for name, fn in (("reference", reference), ("in_place", in_place)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"{'form':<12}{'ms per layer':>14}")
    for k, v in med.items():
        print(f"{k:<12}{v:>14.2f}")
    print(f"speed-up of the in-place form: {med['reference'] / med['in_place']:.2f}x")
    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump({"benchmark": "criterion_speed", "settings": vars(opts), "median_ms_per_layer": med,
                   "speedup": med["reference"] / med["in_place"], "times_s": times,
                   "threads": torch.get_num_threads(), "load_average": os.getloadavg()}, f, indent=2)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
