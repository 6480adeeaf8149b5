"""Do LoRA-guided and full-gradient (vanilla) one-shot masks agree? (the paper's Fig. 4)

Both criteria score the same model once on the same calibration samples of C4 (``lora``: one
backward pass through a fresh LoRA adapter, where ``lora_B = 0`` so ``G = gB A``; ``vanilla``: the
base weights' true gradients). From those scores, masks are grown to each ratio in 0.1..0.5 and
the pruned sets compared: IoU = |pruned_lora & pruned_vanilla| / |pruned_lora | pruned_vanilla|,
pooled over all layers, separately for MLP channels and attention units (``query_head`` units, the
finer GQA choice). For reference, two random subsets of the same size have expected IoU about
p / (2 - p) at ratio p. ``magnitude`` and ``wanda`` masks are compared with ``vanilla`` as well.

CPU default: SmolLM2-135M, 8 samples x 128 tokens. GPU: ``--samples 128 --max-length 512``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-gguf")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--criteria", nargs="+", default=["lora", "vanilla", "magnitude", "wanda"],
                   help="Compared with the reference (the first of --reference).")
    p.add_argument("--reference", default="vanilla")
    p.add_argument("--attention-unit", default="query_head", choices=["kv_group", "query_head"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "mask_agreement.json"))
    return p.parse_args(argv)


def pruned_sets(state, ratio: float) -> dict[str, set]:
    """``{"mlp": {(layer, unit)}, "attention": {...}}`` pruned at ``ratio`` from ``state``'s scores
    (a fresh copy of the masks, so one scoring serves every ratio)."""
    from loraprune_trainer.masks import PruningState
    from loraprune_trainer.oneshot import prune_by_scores

    fresh = PruningState(state.structure)
    fresh.scores = {k: v.clone() for k, v in state.scores.items()}
    prune_by_scores(fresh, ratio, ratio)
    out = {"mlp": set(), "attention": set()}
    for name, group in fresh.groups.items():
        for u in (~fresh.keep[name]).nonzero().flatten().tolist():
            out[group.kind].add((group.layer_idx, u))
    return out


def iou(a: set, b: set) -> float | None:
    union = a | b
    return len(a & b) / len(union) if union else None


def main(argv=None):
    args = parse_args(argv)
    import torch

    from loraprune_trainer.loading import load_model_and_tokenizer
    from loraprune_trainer.oneshot import oneshot_scores

    t_all = time.perf_counter()
    model, tok = load_model_and_tokenizer(args.model)
    if torch.cuda.is_available():
        model = model.cuda()
    calib = common.c4_texts(200, args.samples)
    criteria = [args.reference] + [c for c in args.criteria if c != args.reference]
    states, score_s = {}, {}
    for crit in criteria:
        t0 = time.perf_counter()
        scored = oneshot_scores(model, tok, calib, criterion=crit, attention_unit=args.attention_unit,
                                max_length=args.max_length, batch_size=args.batch, seed=args.seed)
        states[crit] = scored.state
        model = scored.release()
        score_s[crit] = time.perf_counter() - t0
        print(f"scored {crit} in {score_s[crit]:.1f}s", flush=True)

    rows = []
    for ratio in args.ratios:
        ref = pruned_sets(states[args.reference], ratio)
        row = {"ratio": ratio, "mlp_pruned_units": len(ref["mlp"]), "attn_pruned_units": len(ref["attention"]),
               "random_expected_iou": ratio / (2 - ratio)}
        for crit in criteria[1:]:
            other = pruned_sets(states[crit], ratio)
            row[f"{crit}_mlp_iou"] = iou(ref["mlp"], other["mlp"])
            row[f"{crit}_attn_iou"] = iou(ref["attention"], other["attention"])
        rows.append(row)
    cols = ["ratio", "mlp_pruned_units", "attn_pruned_units"] + [f"{c}_{k}_iou" for c in criteria[1:]
                                                                for k in ("mlp", "attn")] + ["random_expected_iou"]
    table = common.print_table(rows, cols, floatfmt="{:.3f}")
    common.write_json(args.out, {
        "benchmark": "mask agreement (Fig. 4)", "reference": args.reference, "rows": rows, "table": table,
        "score_s": score_s, "settings": vars(args), "machine": common.machine_info(), "command": common.command_line(),
        "wall_s": time.perf_counter() - t_all,
    })
    plot(rows, criteria[1:], args.reference, os.path.splitext(args.out)[0] + ".png")


def plot(rows, criteria, reference, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), sharey=True)
    ratios = [r["ratio"] for r in rows]
    for ax, kind, title in ((axes[0], "mlp", "MLP channels"), (axes[1], "attn", "attention heads")):
        for crit in criteria:
            ys = [r[f"{crit}_{kind}_iou"] for r in rows]
            ax.plot(ratios, [float("nan") if y is None else y for y in ys], marker="o", label=f"{crit} vs {reference}")
        ax.plot(ratios, [r["random_expected_iou"] for r in rows], ls="--", color="gray", label="random (expected)")
        ax.set_xlabel("pruning ratio (one-shot)")
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("IoU of pruned units")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
