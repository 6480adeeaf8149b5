"""How well does each criterion pick the units that matter? Masks and scores against an exact reference.

Reference: the group Taylor score with true gradients over many calibration tokens, ``(dL/dm_u)^2``
with ``dL/dm_u`` the gradient of the loss on ``--ref-samples`` C4 documents with respect to a gate on
unit ``u`` (``taylor_gate`` scored once on all of them): the first-order change of the calibration
loss when the unit is removed.

Candidates are scored once (one-shot, a fresh LoRA adapter as at the start of training, so for
``lora`` ``B = 0`` and ``G = gB A``) on fewer tokens, the budget they see during training, drawn from
*other* documents: ``--budgets`` documents each. Reported per budget and criterion, separately for MLP
channels and attention units (``query_head``, the finer GQA unit):

* IoU of the pruned sets with the reference's at each ``--ratios`` (pooled over layers; two random
  masks of the same size share p / (2 - p));
* Spearman rank correlation of the scores with the reference's, per layer (pruning ranks units
  within a layer), averaged over layers.

Criteria: ``lora`` (the paper's square), ``lora-authors`` (``abs`` + per-matrix L2 normalisation, the
authors' code), ``taylor_gate``, ``vanilla`` (element-wise Taylor with the true weight gradients),
``wanda``, ``magnitude``.

CPU default: SmolLM2-135M, reference 64 documents, budgets of 4 and 16 documents, 128 tokens each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

VARIANTS = {  # name -> (criterion, score_form, normalize_scores)
    "lora": ("lora", "square", False),
    "lora-authors": ("lora", "abs", True),
    "taylor_gate": ("taylor_gate", "square", False),
    "vanilla": ("vanilla", "square", False),
    "wanda": ("wanda", "square", False),
    "magnitude": ("magnitude", "square", False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-gguf")
    p.add_argument("--train-file", default="c4/c4_train_sample.jsonl", help="C4 documents (JSONL) under the data folder.")
    p.add_argument("--ref-samples", type=int, default=64, help="Documents the reference is scored on (0..N-1).")
    p.add_argument("--budgets", type=int, nargs="+", default=[4, 16],
                   help="Documents each candidate is scored on (taken after the reference's).")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.5])
    p.add_argument("--criteria", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
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


def spearman(a, b) -> float:
    """Spearman rank correlation of two 1-D tensors (ties broken by position)."""
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def mean_layer_spearman(state, ref_state, kind: str) -> float:
    values = [spearman(state.scores[n], ref_state.scores[n]) for n, g in ref_state.groups.items() if g.kind == kind]
    return sum(values) / len(values)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from loraprune_trainer.loading import load_model_and_tokenizer
    from loraprune_trainer.oneshot import oneshot_scores

    t_all = time.perf_counter()
    machine = common.machine_info()
    model, tok = load_model_and_tokenizer(args.model)
    if torch.cuda.is_available():
        model = model.cuda()
    docs = common.jsonl_texts(args.train_file)
    need = args.ref_samples + max(args.budgets)
    if need > len(docs):
        raise SystemExit(f"{args.train_file} has {len(docs)} documents; the reference and the largest budget need {need}.")

    def score(variant, texts):
        nonlocal model
        crit, form, normalize = VARIANTS[variant]
        t0 = time.perf_counter()
        scored = oneshot_scores(model, tok, texts, criterion=crit, attention_unit=args.attention_unit,
                                max_length=args.max_length, batch_size=args.batch, score_form=form,
                                normalize_scores=normalize, seed=args.seed)
        model = scored.release()
        print(f"scored {variant} on {len(texts)} documents in {time.perf_counter() - t0:.1f}s", flush=True)
        return scored.state, time.perf_counter() - t0

    reference, ref_s = score("taylor_gate", docs[:args.ref_samples])
    ref_sets = {ratio: pruned_sets(reference, ratio) for ratio in args.ratios}
    rows, score_s = [], {"reference": ref_s}
    for budget in args.budgets:
        texts = docs[args.ref_samples:args.ref_samples + budget]
        for variant in args.criteria:
            state, seconds = score(variant, texts)
            score_s[f"{variant}@{budget}"] = seconds
            row = {"budget_docs": budget, "criterion": variant,
                   "mlp_spearman": mean_layer_spearman(state, reference, "mlp"),
                   "attn_spearman": mean_layer_spearman(state, reference, "attention")}
            for ratio in args.ratios:
                mine = pruned_sets(state, ratio)
                row[f"mlp_iou@{ratio:g}"] = iou(ref_sets[ratio]["mlp"], mine["mlp"])
                row[f"attn_iou@{ratio:g}"] = iou(ref_sets[ratio]["attention"], mine["attention"])
            rows.append(row)
    random_row = {"budget_docs": None, "criterion": "random (expected)", "mlp_spearman": 0.0, "attn_spearman": 0.0}
    for ratio in args.ratios:
        random_row[f"mlp_iou@{ratio:g}"] = ratio / (2 - ratio)
    rows.append(random_row)
    cols = ["budget_docs", "criterion", "mlp_spearman", "attn_spearman"] + [
        f"{k}_iou@{r:g}" for k in ("mlp", "attn") for r in args.ratios]
    table = common.print_table(rows, cols, floatfmt="{:.3f}")
    common.write_json(args.out, {
        "benchmark": "mask agreement with the exact group-Taylor reference", "reference": "taylor_gate",
        "reference_docs": args.ref_samples, "rows": rows, "columns": cols, "table": table, "score_s": score_s,
        "settings": vars(args), "machine": machine, "load_average_at_end": common.load_average(),
        "command": common.command_line(), "wall_s": time.perf_counter() - t_all,
    })
    plot(rows, args, os.path.splitext(args.out)[0] + ".png")


def plot(rows, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = max(args.budgets)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, kind, title in ((axes[0], "mlp", "MLP channels"), (axes[1], "attn", "attention (query heads)")):
        for r in rows:
            if r["budget_docs"] != budget:
                continue
            ys = [r.get(f"{kind}_iou@{p:g}") for p in args.ratios]
            ax.plot(args.ratios, [float("nan") if y is None else y for y in ys], marker="o",
                    label=f"{r['criterion']} (rho {r[f'{kind}_spearman']:.2f})")
        ax.plot(args.ratios, [p / (2 - p) for p in args.ratios], ls="--", color="gray", label="random (expected)")
        ax.set_xlabel("pruning ratio")
        ax.set_title(f"{title}, scored on {budget} docs")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"IoU with the exact reference ({args.ref_samples} docs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
