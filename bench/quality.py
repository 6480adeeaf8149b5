"""Quality of pruned models (the paper's Table 2, on SmolLM2-135M at small settings).

Grid: dense; for each ratio, each criterion (lora, vanilla, magnitude, wanda, random) in two modes:

* ``iterative``: ``LoRAPruneTrainer`` prunes while LoRA fine-tunes (cubic schedule), then the
  masked units are cut and LoRA merged;
* ``oneshot``: score once on calibration samples of C4 (fresh LoRA for ``lora``), prune to the
  target, cut, then LoRA fine-tune the compact model with a plain ``SFTTrainer``.

Both modes train on the same C4 documents with the same steps, batch and ``max_length``: equal
training tokens (recorded). Perplexity on WikiText-2 (test) and PTB (validation) under the
``llm-pruner`` (128-token windows) and ``full-context`` (2048) protocols, on the first
``--windows`` / ``--full-windows`` windows (the same windows for every model, so comparisons are
paired). Every finished run writes ``bench/results/quality/<run>.json``; a rerun skips those (resume),
and the table, ``quality.json`` and ``quality.png`` are rebuilt from them.

CPU default (2 shared cores): a few minutes per run, 4 steps only (the cores were shared with
other jobs; see docs/results.md for the wall time). GPU: e.g. ``--steps 200 --batch 8 --max-length 256
--windows 0 --full-windows 0 --calib-samples 128 --full-context-on wikitext2 ptb`` (0 = all windows).
"""

from __future__ import annotations

import argparse
import copy
import gc
import glob
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

# Criterion variants: name -> LoRAPruneConfig fields. `lora-authors` is the authors' code: |G * W'| with
# each matrix's unit scores L2-normalised before the group sum.
VARIANTS = {
    "lora": dict(pruning_criterion="lora"),
    "lora-authors": dict(pruning_criterion="lora", score_form="abs", normalize_scores=True),
    "taylor_gate": dict(pruning_criterion="taylor_gate"),
    "vanilla": dict(pruning_criterion="vanilla"),
    "wanda": dict(pruning_criterion="wanda"),
    "magnitude": dict(pruning_criterion="magnitude"),
    "random": dict(pruning_criterion="random"),
}
CRITERIA = list(VARIANTS)
EVALS = [("wikitext2", "wikitext-2-raw/wiki.test.raw"), ("ptb", "ptb/ptb.valid.txt")]
PROTOCOLS = ["llm-pruner", "full-context"]

logger = logging.getLogger("bench.quality")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-gguf", help="Model for load_model_and_tokenizer.")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.2],
                   help="pruning_ratio of each run (attention units and MLP channels per layer).")
    p.add_argument("--attention-ratio", type=float, default=None,
                   help="attention_pruning_ratio for every run (e.g. 0: MLP channels only).")
    p.add_argument("--mlp-ratio", type=float, default=None, help="mlp_pruning_ratio for every run.")
    p.add_argument("--param-ratio", type=float, default=None,
                   help="param_pruning_ratio (share of decoder parameters) for every iterative run; --ratios then "
                        "only names the runs.")
    p.add_argument("--attention-unit", default="kv_group", choices=["kv_group", "query_head"])
    p.add_argument("--distill-alpha", type=float, default=0.0)
    p.add_argument("--distill-temperature", type=float, default=1.0)
    p.add_argument("--distill-teacher", default="base", choices=["base", "dense"])
    p.add_argument("--tag", default="", help="Suffix of every run id (to keep series apart in one folder).")
    p.add_argument("--criteria", nargs="+", default=["lora", "vanilla", "magnitude", "wanda", "random"],
                   choices=CRITERIA)
    p.add_argument("--train-file", default="c4/c4_demo.jsonl",
                   help="JSONL of {\"text\"} documents under the data folder; training uses documents 0..199 of "
                        "c4_demo.jsonl (200.. calibrate) or every document of any other file.")
    p.add_argument("--protocols", nargs="+", default=PROTOCOLS, choices=PROTOCOLS)
    p.add_argument("--modes", nargs="+", default=["iterative", "oneshot"], choices=["iterative", "oneshot"])
    p.add_argument("--steps", type=int, default=4, help="Optimizer steps of every fine-tune (both modes).")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64, help="Tokens per training sample (truncated).")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--prune-freq", type=int, default=1)
    p.add_argument("--calib-samples", type=int, default=4, help="C4 documents for one-shot scoring.")
    p.add_argument("--windows", type=int, default=4, help="llm-pruner windows per dataset (0 = all).")
    p.add_argument("--full-windows", type=int, default=1, help="full-context windows per dataset (0 = all).")
    p.add_argument("--full-context-on", nargs="+", default=["wikitext2"], choices=[n for n, _ in EVALS],
                   help="Datasets evaluated under full-context (2048-token windows cost the most on a CPU).")
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "quality"))
    p.add_argument("--report-only", action="store_true", help="Only rebuild table/JSON/PNG from finished runs.")
    return p.parse_args(argv)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def train_kwargs(args, output_dir):
    return dict(
        output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0,
        logging_steps=max(1, args.steps // 4), save_strategy="no", report_to="none", use_cpu=not _cuda(),
        bf16=False, max_length=args.max_length, packing=False, gradient_checkpointing=False, seed=args.seed,
        include_num_input_tokens_seen=True, dataset_text_field="text", disable_tqdm=True,
    )


def _cuda():
    import torch

    return torch.cuda.is_available()


def evaluate(model, tok, texts, args) -> dict:
    from loraprune_trainer.evaluation import perplexity

    out = {}
    for name, (text, meta) in texts.items():
        for protocol in args.protocols:
            if protocol == "full-context" and name not in args.full_context_on:
                continue
            limit = args.windows if protocol == "llm-pruner" else args.full_windows
            r = perplexity(model, tok, text, protocol=protocol, batch_size=args.eval_batch,
                           max_windows=limit or None, show_progress=False, metadata=meta)
            out[f"{name}/{protocol}"] = {"perplexity": r["perplexity"], "num_tokens_scored": r["num_tokens_scored"],
                                         "num_windows": r["num_windows"], "protocol": r["protocol"]}
            logger.info("  %s %s: %.3f (%d tokens)", name, protocol, r["perplexity"], r["num_tokens_scored"])
    return out


def n_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def run_iterative(base, tok, train_ds, criterion, ratio, args, tmp):
    from loraprune_trainer import LoRAPruneConfig, LoRAPruneTrainer
    from loraprune_trainer.oneshot import compact_model

    cfg = LoRAPruneConfig(**train_kwargs(args, tmp), pruning_ratio=ratio, prune_freq=args.prune_freq,
                          attention_pruning_ratio=args.attention_ratio, mlp_pruning_ratio=args.mlp_ratio,
                          param_pruning_ratio=args.param_ratio, attention_unit=args.attention_unit,
                          distill_alpha=args.distill_alpha, distill_temperature=args.distill_temperature,
                          distill_teacher=args.distill_teacher, **VARIANTS[criterion])
    trainer = LoRAPruneTrainer(copy.deepcopy(base), cfg, train_dataset=train_ds, processing_class=tok,
                               peft_config=lora_config())
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    model, _ = compact_model(trainer.model, trainer.pruning_state)
    info = {"train_s": train_s, "tokens_trained": int(trainer.state.num_input_tokens_seen),
            "steps": trainer.state.global_step, "target": trainer.target_summary(),
            "final_loss": _last_loss(trainer), "log_history": trainer.state.log_history}
    del trainer
    return model, info


def run_oneshot(base, tok, train_ds, calib, criterion, ratio, args, tmp):
    from trl import SFTConfig

    from loraprune_trainer.oneshot import finetune_compact, oneshot_prune

    t0 = time.perf_counter()
    variant = VARIANTS[criterion]
    result = oneshot_prune(copy.deepcopy(base), tok, calib, criterion=variant["pruning_criterion"],
                           pruning_ratio=ratio, attention_ratio=args.attention_ratio, mlp_ratio=args.mlp_ratio,
                           score_form=variant.get("score_form", "square"),
                           normalize_scores=variant.get("normalize_scores", False),
                           max_length=args.max_length, batch_size=args.batch, seed=args.seed)
    score_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, trainer = finetune_compact(result.model, tok, train_ds, SFTConfig(**train_kwargs(args, tmp)),
                                      lora_config=lora_config())
    info = {"score_s": score_s, "train_s": time.perf_counter() - t0,
            "tokens_trained": int(trainer.state.num_input_tokens_seen), "steps": trainer.state.global_step,
            "oneshot": result.report, "final_loss": _last_loss(trainer)}
    del trainer
    return model.eval(), info


def _last_loss(trainer):
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses[-1] if losses else None


def run_id(mode, criterion=None, ratio=None, tag=""):
    return "dense" if mode == "dense" else f"{mode}-{criterion}-r{ratio:g}{tag}"


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.makedirs(args.out, exist_ok=True)
    if not args.report_only:
        run_grid(args)
    report(args)


def run_grid(args):
    import torch
    from datasets import Dataset

    from loraprune_trainer.evaluation import load_text
    from loraprune_trainer.loading import load_model_and_tokenizer

    torch.manual_seed(args.seed)
    base, tok = load_model_and_tokenizer(args.model)
    if _cuda():
        base = base.cuda()
    texts = {name: load_text(common.data_file(rel)) for name, rel in EVALS}
    # Training text: C4 documents 0..199 of the demo file, or a whole other file; calibration: documents
    # 200.. of the demo file (disjoint from both).
    if args.train_file == "c4/c4_demo.jsonl":
        train_texts = common.c4_texts(0, 200)
    else:
        train_texts = common.jsonl_texts(args.train_file)
    train_ds = Dataset.from_list([{"text": t} for t in train_texts])
    calib = common.c4_texts(200, args.calib_samples)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "report_only")}
    from loraprune_trainer.structure import decoder_parameters, discover_structure

    base_decoder = decoder_parameters(discover_structure(base))

    # Mode-major within a ratio: every criterion's iterative run (the paper's comparison) comes before
    # the one-shot runs, so a grid cut short by the clock still answers the main question.
    plan = [("dense", None, None)] + [(m, c, r) for r in args.ratios for m in args.modes for c in args.criteria]
    for mode, criterion, ratio in plan:
        rid = run_id(mode, criterion, ratio, args.tag)
        path = os.path.join(args.out, f"{rid}.json")
        if os.path.exists(path):
            logger.info("skip %s (done)", rid)
            continue
        logger.info("run %s", rid)
        machine = common.machine_info()  # load average at the start of this run
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            if mode == "dense":
                model, info = base, {}
            elif mode == "iterative":
                model, info = run_iterative(base, tok, train_ds, criterion, ratio, args, tmp)
            else:
                model, info = run_oneshot(base, tok, train_ds, calib, criterion, ratio, args, tmp)
        t1 = time.perf_counter()
        metrics = evaluate(model, tok, texts, args)
        record = {"run": rid, "mode": mode, "criterion": criterion, "ratio": ratio, "parameters": n_params(model),
                  "base_decoder_parameters": base_decoder,
                  "metrics": metrics, **info, "eval_s": time.perf_counter() - t1,
                  "wall_s": time.perf_counter() - t0, "settings": settings, "machine": machine,
                  "load_average_at_end": common.load_average(), "command": common.command_line()}
        common.write_json(path, record)
        logger.info("done %s in %.0fs", rid, record["wall_s"])
        if model is not base:
            del model
        gc.collect()


def report(args):
    paths = sorted(glob.glob(os.path.join(args.out, "*.json")), key=os.path.getmtime)
    runs = [common.read_json(p) for p in paths]
    if not runs:
        print("no finished runs yet")
        return
    latest = runs[-1]  # the command/settings/machine of the most recent invocation
    order = {c: i for i, c in enumerate(CRITERIA)}
    runs.sort(key=lambda r: (r["ratio"] or 0, r["mode"] != "dense", order.get(r["criterion"], -1), r["mode"]))
    dense = next((r for r in runs if r["mode"] == "dense"), None)
    rows = []
    for r in runs:
        row = {"ratio": r["ratio"] or 0.0, "criterion": r["criterion"] or "-", "mode": r["mode"],
               "params_M": r["parameters"] / 1e6,
               "params_%": 100.0 * r["parameters"] / dense["parameters"] if dense else None,
               "tokens": r.get("tokens_trained"), "wall_s": r["wall_s"]}
        for key, v in r["metrics"].items():
            row[key] = v["perplexity"]
        rows.append(row)
    metric_cols = [f"{d}/{p}" for d, _ in EVALS for p in PROTOCOLS]
    table = common.print_table(rows, ["ratio", "criterion", "mode", "params_M", "params_%", "tokens", *metric_cols,
                                      "wall_s"], floatfmt="{:.2f}")
    verdict = beats_baselines(runs)
    for line in verdict["lines"]:
        print(line)
    summary_path = args.out.rstrip("/") + ".json"  # bench/results/quality/ -> bench/results/quality.json
    common.write_json(summary_path, {
        "benchmark": "quality (Table 2)", "rows": rows, "table": table, "verdict": verdict,
        "runs": runs, "command": latest.get("command"), "settings": latest.get("settings"),
        "machine": latest.get("machine"), "total_wall_s": sum(r["wall_s"] for r in runs),
    })
    plot(runs, dense, args.out.rstrip("/") + ".png")


def beats_baselines(runs) -> dict:
    """Per ratio, mode and metric: does ``lora`` have the lowest perplexity among the criteria run?"""
    lines, cells = [], []
    for ratio in sorted({r["ratio"] for r in runs if r["ratio"]}):
        for mode in ("iterative", "oneshot"):
            group = {r["criterion"]: r for r in runs if r["ratio"] == ratio and r["mode"] == mode}
            if "lora" not in group or len(group) < 2:
                continue
            for metric in group["lora"]["metrics"]:
                ppl = {c: r["metrics"][metric]["perplexity"] for c, r in group.items() if metric in r["metrics"]}
                best = min(ppl, key=ppl.get)
                cells.append({"ratio": ratio, "mode": mode, "metric": metric, "best": best, "lora": ppl["lora"],
                              "others": {c: v for c, v in ppl.items() if c != "lora"}})
                lines.append(f"ratio {ratio:g} {mode:9s} {metric:24s} best={best:9s} lora={ppl['lora']:.2f} "
                             + " ".join(f"{c}={v:.2f}" for c, v in ppl.items() if c != "lora"))
    wins = sum(c["best"] == "lora" for c in cells)
    lines.append(f"lora is best in {wins} of {len(cells)} (ratio, mode, metric) cells")
    return {"lines": lines, "cells": cells, "lora_best": wins, "cells_total": len(cells)}


def plot(runs, dense, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in runs if r["ratio"]})
    if not ratios:
        return
    metric = "wikitext2/llm-pruner"
    fig, axes = plt.subplots(1, len(ratios), figsize=(5.5 * len(ratios), 4), squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        for k, mode in enumerate(("iterative", "oneshot")):
            xs, ys = [], []
            for i, c in enumerate(CRITERIA):
                r = next((r for r in runs if r["ratio"] == ratio and r["mode"] == mode and r["criterion"] == c), None)
                if r and metric in r["metrics"]:
                    xs.append(i + (k - 0.5) * 0.38)
                    ys.append(r["metrics"][metric]["perplexity"])
            ax.bar(xs, ys, width=0.38, label="prune while fine-tuning" if mode == "iterative" else
                   "one-shot, then fine-tune")
        if dense:
            ax.axhline(dense["metrics"][metric]["perplexity"], color="k", ls="--", lw=1, label="dense")
        ax.set_xticks(range(len(CRITERIA)), CRITERIA)
        ax.set_yscale("log")
        ax.set_title(f"pruning ratio {ratio:g}")
        ax.set_ylabel(f"perplexity ({metric})")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: criterion and mode at equal training tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
