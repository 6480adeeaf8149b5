"""Write ``docs/results.md`` from the JSON files in ``bench/results/`` (run after the benchmarks).

    python bench/make_results_md.py

Every number in the page comes from those files; sections whose JSON is missing say so.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

OUT = os.path.join(common.REPO_ROOT, "docs", "results.md")


def md_table(rows, columns, fmt="{:.2f}") -> str:
    def cell(v):
        if isinstance(v, float):
            return fmt.format(v)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def load(name):
    path = os.path.join(common.RESULTS_DIR, name)
    return common.read_json(path) if os.path.exists(path) else None


def machine_line(m) -> str:
    if not m:
        return "unknown"
    dev = m.get("cuda") or f"CPU ({m.get('processor')}, {m.get('cpu_count')} cores, {m.get('torch_threads')} torch threads)"
    load_avg = m.get("load_average_at_start")
    extra = f"; load average at start {load_avg[0]:.1f} (the cores are shared with other jobs)" if load_avg else ""
    return f"{dev}, torch {m.get('torch')}, Python {m.get('python')}, commit {m.get('git_commit')}{extra}"


def section_quality(parts):
    q = load("quality.json")
    parts.append("## Quality: criteria and modes at equal training tokens (paper Table 2)\n")
    if not q:
        parts.append("_Not run yet (`python bench/quality.py`)._\n")
        return
    s = q["settings"] or {}
    parts.append(
        f"Command: `{q['command']}` (resumable; one JSON per run in `bench/results/quality/`).  \n"
        f"Machine: {machine_line(q['machine'])}.  \n"
        f"Total wall time of the {len(q['runs'])} runs: {q['total_wall_s'] / 60:.1f} min.\n")
    parts.append(
        f"Settings: SmolLM2-135M-Instruct (GGUF Q4_1 de-quantized to float32); LoRA r=8, alpha=16, dropout 0.05 on "
        f"all seven projections; {s.get('steps')} optimizer steps x batch {s.get('batch')} x {s.get('max_length')} "
        f"tokens of C4 (documents 0-199, truncated) for *both* modes, lr {s.get('lr')} linear decay; iterative: cubic "
        f"schedule, masks every {s.get('prune_freq')} steps, KV-group attention units; one-shot: scores from "
        f"{s.get('calib_samples')} other C4 documents (200+), then the same fine-tune on the compact model. "
        f"Perplexity: first {s.get('windows')} windows (`llm-pruner`, 128 tokens) and first {s.get('full_windows')} "
        f"window(s) (`full-context`, 2048 tokens) of WikiText-2 test / PTB validation; the same windows for every "
        "model, so differences are paired, but the samples are small: read differences of a few percent as noise.\n")
    parts.append(
        "SmolLM2 has 3 KV heads of 3 query heads each, so the attention ratio rounds: 0.2 prunes 1 of 3 KV groups "
        "(33% of heads), 0.5 prunes 2 of 3 (67%); MLP ratios are exact. `params_%` is the real share of parameters "
        "kept (embeddings included).\n")
    cols = ["ratio", "criterion", "mode", "params_M", "params_%", "tokens"] + \
        [c for c in q["rows"][0] if "/" in c] + ["wall_s"]
    parts.append(md_table(q["rows"], cols) + "\n")
    done = {r["run"] for r in q["runs"]}
    planned = [f"{m}-{c}-r{r:g}" for r in s.get("ratios", []) for m in s.get("modes", []) for c in s.get("criteria", [])]
    missing = [p for p in planned if p not in done]
    if missing:
        parts.append(f"Not finished before the deadline (the grid resumes where it stopped): {', '.join(missing)}.\n")
    parts.append("Does `lora` beat every baseline? Per ratio, mode and metric (lowest perplexity wins):\n")
    parts.append("```\n" + "\n".join(q["verdict"]["lines"]) + "\n```\n")
    for ratio in sorted({r["ratio"] for r in q["runs"] if r["ratio"]}):
        for mode in ("iterative", "oneshot"):
            group = {r["criterion"]: r["metrics"]["wikitext2/llm-pruner"]["perplexity"] for r in q["runs"]
                     if r["ratio"] == ratio and r["mode"] == mode}
            if "lora" in group and len(group) > 1:
                ranked = sorted(group, key=group.get)
                parts.append(f"- ratio {ratio:g}, {mode}: WikiText-2 (llm-pruner) ranking "
                             + " < ".join(f"{c} ({group[c]:.0f})" for c in ranked)
                             + f"; `lora` ranks {ranked.index('lora') + 1} of {len(ranked)}.")
    from collections import Counter

    pairs = []
    for r in q["runs"]:
        if r["mode"] == "iterative":
            o = next((x for x in q["runs"] if x["mode"] == "oneshot" and x["criterion"] == r["criterion"]
                      and x["ratio"] == r["ratio"]), None)
            if o:
                pairs.append(o["metrics"]["wikitext2/llm-pruner"]["perplexity"]
                             < r["metrics"]["wikitext2/llm-pruner"]["perplexity"])
    if pairs:
        parts.append(f"- Prune-then-fine-tune (one-shot) vs prune-while-fine-tuning (iterative) at equal tokens: "
                     f"one-shot has the lower WikiText-2 (llm-pruner) perplexity in {sum(pairs)} of {len(pairs)} "
                     "(criterion, ratio) pairs. With 4 steps the iterative schedule scores from 1-4 steps of a "
                     "model whose masks change every step, while one-shot scores the intact model.")

    counts = Counter(c["best"] for c in q["verdict"]["cells"])
    best_counts = ", ".join(f"`{k}` {v}" for k, v in counts.most_common())
    parts.append("")
    parts.append(
        "Reading these numbers. With 4 optimizer steps (512 training tokens) there is next to no recovery: every "
        "pruned model is far from dense, and the table mostly ranks how well each criterion picks units from a few "
        f"hundred tokens of evidence. Best criterion per finished cell: {best_counts}; `lora` is best in "
        f"{q['verdict']['lora_best']} of {q['verdict']['cells_total']}, so in this regime it does "
        f"{'not ' if q['verdict']['lora_best'] < q['verdict']['cells_total'] else ''}beat every baseline. "
        "This is consistent with how the estimate is "
        "built: at the start of training `lora_B = 0`, so G = gB A is the true gradient projected onto LoRA's random "
        "rank-8 input subspace, a noisy proxy that the paper's criterion averages over many steps (EMA) while B "
        "grows. Whether `lora` closes the gap with hundreds of steps and GPU-sized batches is what the GPU flags "
        "of `bench/quality.py` are for; these CPU runs cannot say.\n")
    parts.append("![quality](../bench/results/quality.png)\n")


def section_cost(parts):
    c = load("criterion_cost.json")
    parts.append("## Criterion cost: LoRA-guided vs full gradient (paper Table 4)\n")
    if not c:
        parts.append("_Not run yet (`python bench/criterion_cost.py`)._\n")
        return
    s = c["settings"]
    parts.append(
        f"Command: `{c['command']}`; wall time {c['wall_s'] / 60:.1f} min.  \nMachine: {machine_line(c['machine'])}.\n")
    parts.append(
        f"Settings: SmolLM2-135M, batch {s['batch']} x {s['max_length']} tokens, {s['steps']} steps (first "
        f"{s['skip']} untimed), every step scores; gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}; "
        f"each criterion in its own process. Memory: `{c['memory_metric']}` (on CPU the peak resident set, which "
        "includes the float32 weights; `above_ready_MiB` is the growth after the trainer was built). `none` = plain "
        "LoRA SFT without pruning.\n")
    parts.append(md_table(c["rows"], ["criterion", "peak_MiB", "above_ready_MiB", "step_s", "tokens/s", "score_s",
                                      "mem_vs_vanilla_%", "throughput_vs_vanilla_%"]) + "\n")
    by = {r["criterion"]: r for r in c["rows"]}
    if "lora" in by and "vanilla" in by:
        lo, va = by["lora"], by["vanilla"]
        parts.append(f"- Peak memory: `lora` {lo['peak_MiB']:.0f} MiB vs `vanilla` {va['peak_MiB']:.0f} MiB "
                     f"({100 * (lo['peak_MiB'] / va['peak_MiB'] - 1):+.1f}%); memory growth during training "
                     f"{lo['above_ready_MiB']:.0f} vs {va['above_ready_MiB']:.0f} MiB "
                     f"({100 * (lo['above_ready_MiB'] / va['above_ready_MiB'] - 1):+.1f}%). The difference is the "
                     "float32 gradient of every projection's base weight (about 106 M weights, 405 MiB, in SmolLM2) "
                     "plus autograd's transient copy of it.")
        parts.append(f"- Throughput: `lora` {lo['tokens/s']:.2f} vs `vanilla` {va['tokens/s']:.2f} tokens/s "
                     f"({100 * (lo['tokens/s'] / va['tokens/s'] - 1):+.1f}%); scoring alone takes "
                     f"{lo['score_s']:.2f} s vs {va['score_s']:.2f} s per step. On this shared CPU, step times "
                     "swing by several x with other jobs' load (see `step_s_all` in the JSON): treat the "
                     "throughput ratio as unreliable; the memory numbers are not affected.\n")
    first = load("criterion_cost_run1.json")
    if first:
        parts.append(f"An earlier run (`{first['command']}`, 4 steps, 1 untimed, with a `none` row; kept in "
                     "`bench/results/criterion_cost_run1.json`; its `step_s` is the mean, not the median) measured:\n")
        parts.append(md_table(first["rows"], ["criterion", "peak_MiB", "above_ready_MiB", "step_s", "tokens/s",
                                              "score_s", "mem_vs_vanilla_%", "throughput_vs_vanilla_%"]) + "\n")
        parts.append("Same memory picture; the throughput order flipped between the two runs, which is the load of "
                     "other jobs, not the criteria. Where LoRA's scoring cost sits: it builds G = gB A + B gA - gB gA "
                     "(rank-8 products, independent of the tokens per step), while `vanilla` pays an extra "
                     "[out, in] gradient matmul in every backward (proportional to the tokens per step). At the "
                     "128 tokens per step used here the two are of similar size; the paper's throughput gain needs "
                     "GPU-sized batches.\n")
    parts.append("![criterion cost](../bench/results/criterion_cost.png)\n")


def _runs(folder: str) -> list[dict]:
    """Every finished run JSON of a ``bench/quality.py --out bench/results/<folder>`` series, oldest first."""
    import glob

    paths = sorted(glob.glob(os.path.join(common.RESULTS_DIR, folder, "*.json")), key=os.path.getmtime)
    return [common.read_json(p) for p in paths]


def _load(values) -> str:
    return f"{values[0]:.1f}" if values else "?"


def _run_rows(runs: list[dict]) -> list[dict]:
    """One table row per run: parameters, settings that vary, perplexities and their ratio to dense."""
    dense = next((r for r in runs if r["mode"] == "dense"), None)
    decoder = next((r["base_decoder_parameters"] for r in runs if r.get("base_decoder_parameters")), None)
    rows = []
    for r in runs:
        s, target = r["settings"], r.get("target") or {}
        removed = (dense["parameters"] - r["parameters"]) / decoder if dense and decoder and r is not dense else None
        row = {"run": r["run"], "params_M": r["parameters"] / 1e6,
               "decoder_removed_%": 100 * removed if removed is not None else None,
               "attn_unit": target.get("attention_unit"), "attn_pruned": target.get("attention_units_pruned_per_layer"),
               "mlp_pruned": target.get("mlp_channels_pruned_per_layer"),
               "distill": s.get("distill_alpha", 0.0) if r["mode"] != "dense" else None,
               "tokens": r.get("tokens_trained"), "train_min": r["train_s"] / 60 if r.get("train_s") else None,
               "load_start/end": f"{_load(r['machine'].get('load_average_at_start'))} / "
                                 f"{_load(r.get('load_average_at_end'))}"}
        for key, v in r["metrics"].items():
            name = key.split("/")[0]
            row[name] = v["perplexity"]
            if dense and key in dense["metrics"]:
                row[f"{name} x dense"] = v["perplexity"] / dense["metrics"][key]["perplexity"]
        rows.append(row)
    return rows


def _series_section(parts, folder: str, title: str, intro: str, missing: str) -> list[dict]:
    parts.append(f"## {title}\n")
    runs = _runs(folder)
    if not runs:
        parts.append(f"_Not run yet ({missing})._\n")
        return []
    commands = sorted({r["command"] for r in runs})
    parts.append(intro + "\n")
    parts.append("Commands (one JSON per run in `bench/results/" + folder + "/`):\n")
    parts.extend(f"- `{c}`" for c in commands)
    parts.append("")
    rows = _run_rows(runs)
    metric_cols = [c for c in ("wikitext2", "wikitext2 x dense", "ptb", "ptb x dense") if any(c in r for r in rows)]
    parts.append(md_table(rows, ["run", "params_M", "decoder_removed_%", "attn_unit", "attn_pruned", "mlp_pruned",
                                 "distill", *metric_cols, "tokens", "train_min", "load_start/end"]) + "\n")
    return rows


def section_criteria_check(parts):
    rows = _series_section(
        parts, "quick_check", "Which units to cut: criteria on the real model (MLP channels only)",
        "SmolLM2-135M, 27% of MLP channels in every layer (20.3% of decoder parameters), attention whole; "
        "LoRAPrune iterative (cubic schedule, masks every 5 steps), 60 steps x 4 x 128 tokens of "
        "`c4/c4_train_sample.jsonl`, lr 3e-4; perplexity `llm-pruner` on the first 128 windows of WikiText-2 and "
        "PTB. `lora-authors` is the authors' code variant (`score_form=abs`, `normalize_scores`). Training times "
        "are wall times on the 2-core CPU with the load shown (other work shared the machine: the times are "
        "indicative only; the perplexities do not depend on load).",
        "`python bench/quality.py --out bench/results/quick_check ...`")
    if rows:
        ranked = sorted((r for r in rows if r["run"] != "dense"), key=lambda r: r.get("wikitext2", 1e9))
        parts.append("Ranked by WikiText-2: " + ", ".join(f"{r['run'].split('-', 1)[1]} {r['wikitext2']:.1f}"
                                                          for r in ranked) + ".\n")
        parts.append(
            "What it shows: at equal tokens and one seed, the exact group Taylor score (`taylor_gate`) left the best "
            "model, the element-wise full-gradient score (`vanilla`) came second, and the paper's LoRA-guided score "
            "(`lora`) and the authors' variant trailed. What it cannot show: whether the order holds over seeds, "
            "longer runs or other budgets (one run each, 30k training tokens), or on larger models.\n")


def section_recovery(parts):
    rows = _series_section(
        parts, "recovery", "Recovery: parameter budgets, attention units and distillation",
        "Same training and evaluation settings as the criterion check above (60 steps x 4 x 128 tokens, "
        "`taylor_gate` criterion), varying the budget (`param_pruning_ratio` or per-kind ratios), the GQA attention "
        "unit and self-distillation from the base model (`distill_alpha`, T = 1).",
        "`python bench/quality.py --out bench/results/recovery ...`")
    if rows:
        parts.append(
            "The curve below is the masked model's perplexity (16 WikiText-2 windows) every 10 steps: it rises as units "
            "go and, in 60 steps, barely comes back. On SmolLM2 (3 KV groups of 3 query heads) every attention cut "
            "costs more than the same parameters taken from MLP channels, and removing one query head per KV group "
            "cost more than removing one whole KV group (the K/V heads it keeps make the MLPs give up more channels). "
            "Distillation from the base model (alpha 0.5, T 1) against its twin without: `r0.27-mlp-kd0.5` against "
            "`taylor_gate-r0.27` of the criterion check (same settings), and `p0.35-mlp-kd0.5` against `p0.35-mlp`. "
            "A distillation step costs about 1.2x a plain one (step cost table), so at equal wall time the run "
            "without it gets about 20% more steps.\n")
        parts.append("![recovery curve](../bench/results/recovery.curve.png)\n")


def section_mask_agreement(parts):
    m = load("mask_agreement.json")
    parts.append("## Mask agreement with the exact group-Taylor reference\n")
    if not m or "columns" not in m:
        parts.append("_Not run yet (`python bench/mask_agreement.py`)._\n")
        return
    parts.append(f"Command: `{m['command']}`; wall time {m['wall_s'] / 60:.1f} min; load at start/end "
                 f"{_load(m['machine'].get('load_average_at_start'))} / {_load(m.get('load_average_at_end'))}.\n")
    parts.append(
        f"Reference: `taylor_gate` scored once on {m['reference_docs']} C4 documents (the first-order loss change of "
        "removing each unit, from true gradients). Every criterion is scored once, with a fresh LoRA adapter as at "
        "the start of training (so `lora` sees `G = gB A`), on `budget_docs` *other* documents. `*_spearman`: rank "
        "correlation with the reference's scores within each layer, averaged over the 30 layers; `*_iou@p`: overlap "
        "of the units pruned at ratio p, pooled over layers (attention: query heads, pruned evenly per KV group, so "
        "0.1 rounds to none).\n")
    parts.append(md_table(m["rows"], m["columns"], fmt="{:.3f}") + "\n")
    parts.append(
        "What it shows: on a few thousand tokens, every criterion's MLP-channel ranking is only weakly related to the "
        "reference's (per-layer rank correlation 0.1-0.25; pruned-set overlap barely above random at 10-20%), and "
        "that includes `taylor_gate` itself scored on fewer documents: single-batch channel scores are mostly noise, "
        "and the moving average over many training steps is what gives a criterion its signal. For attention "
        "(query heads) `taylor_gate` agrees with the reference clearly more than the weight-based scores. What it "
        "cannot show: which ranking leaves the better model after recovery; that is the quality tables' job.\n")
    parts.append("![mask agreement](../bench/results/mask_agreement.png)\n")


def section_zeroshot(parts):
    """Dense SmolLM2 on the six local zero-shot tasks (``python -m loraprune_trainer.eval ... --out``)."""
    parts.append("## Zero-shot accuracy of the dense model (six tasks, local files)\n")
    found = [(name, load(name)) for name in ("zeroshot_dense_full.json", "zeroshot_dense_limit250.json")]
    found = [(n, d) for n, d in found if d]
    if not found:
        parts.append("_Not run yet (`python -m loraprune_trainer.eval --model smollm2-gguf --tasks ... --out ...`)._\n")
        return
    parts.append(
        "lm-eval 0.4.13 with the official task definitions, reading the upstream files of `zeroshot/` (0-shot; "
        "`acc_norm` where the task defines it). SmolLM2-135M-Instruct here is the Q4_1 GGUF de-quantized to float32, "
        "not the bf16 Hub weights. `limit` = first N items of each task (not a random sample).\n")
    rows = []
    for name, d in found:
        for task, r in d["zero_shot"]["tasks"].items():
            rows.append({"file": name, "task": task, "items": f"{r['num_samples']} / {r['num_samples_total']}",
                         "acc": 100 * r["acc"], "acc_stderr": 100 * r["acc_stderr"],
                         "acc_norm": 100 * r["acc_norm"] if r.get("acc_norm") is not None else None,
                         "acc_norm_stderr": 100 * r["acc_norm_stderr"] if r.get("acc_norm_stderr") is not None else None})
        accs = [100 * r["acc"] for r in d["zero_shot"]["tasks"].values()]
        rows.append({"file": name, "task": "mean (acc)", "acc": sum(accs) / len(accs)})
    parts.append(md_table(rows, ["file", "task", "items", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"],
                          fmt="{:.1f}") + "\n")


def section_overhead(parts):
    o = load("overhead_cpu.json")
    parts.append("## Step cost: criteria and distillation against plain LoRA fine-tuning\n")
    if not o or "rows" not in o:
        parts.append("_Not run yet (`python bench/overhead.py --variants ...`)._\n")
        return
    s = o["settings"]
    busy = " **Busy machine: timings marked busy.**" if o.get("busy") else ""
    parts.append(f"`python bench/overhead.py` with {s['variants']}, {s['rounds']} rounds, {s['steps']} measured steps "
                 f"of {s['batch']} x {s['seq']} tokens, {s.get('threads') or 'default'} torch thread(s); load at "
                 f"start/end {_load(o.get('load_average_at_start'))} / {_load(o.get('load_average_at_end'))}.{busy}\n")
    parts.append(md_table(o["rows"], [c for c in ("variant", "step_s", "peak_rss_mib", "peak_cuda_mib", "step_time_ratio",
                                                  "peak_memory_ratio", "pruning_s_per_step", "pruning_fraction_in_run")
                                      if any(c in r for r in o["rows"])], fmt="{:.3f}") + "\n")
    parts.append("`pruning_s_per_step` is the callback's own time (scoring and mask updates) inside the same steps; "
                 "`taylor_gate`'s cost sits in the forward and backward passes instead (one multiply per gated "
                 "layer), so only the step-time ratio shows it. `+kd` adds a teacher forward without gradient.\n")


def section_speed(parts):
    sp = load("inference_speed.json")
    parts.append("## Inference speed of the exported models (paper Table 3)\n")
    if not sp:
        parts.append("_Not run yet (`python bench/inference_speed.py`)._\n")
        return
    s = sp["settings"]
    parts.append(
        f"Command: `{sp['command']}`; wall time {sp['wall_s'] / 60:.1f} min.  \nMachine: {machine_line(sp['machine'])}.\n")
    parts.append(
        f"Median of {s['repeats']} interleaved repeats. Forward: one `[batch, seq]` prefill without KV cache. "
        f"Generate: greedy, prompt {s['prompt_len']}, {s['new_tokens']} new tokens. `time_vs_dense_%` > 0 means "
        "slower than dense. `ideal_speedup` = dense FLOPs / model FLOPs. On a shared CPU the latencies are noisy.\n")
    parts.append(md_table(sp["rows"], ["kind", "model", "batch", "seq", "params_M", "latency_ms", "tokens_per_s",
                                       "time_vs_dense_%", "measured_speedup", "ideal_speedup"]) + "\n")
    for r in sp["rows"]:
        if r["kind"] == "forward" and r["model"] != "dense":
            parts.append(f"- forward b{r['batch']} s{r['seq']}, {r['model']}: {r['measured_speedup']:.2f}x measured vs "
                         f"{r['ideal_speedup']:.2f}x ideal (FLOPs)")
    parts.append("\nThe absolute latencies (seconds for a 128-token forward of a 135M model) show how loaded the shared "
                 "CPU was; only the interleaved ratios carry information, and those are noisy too.\n")
    parts.append("![inference speed](../bench/results/inference_speed.png)\n")


def main():
    parts = ["# Results: LoRAPrune vs baselines on SmolLM2-135M\n",
             "Generated by `python bench/make_results_md.py` from `bench/results/*.json`; do not edit by hand. "
             "All runs are small CPU settings (2 shared cores) unless the machine line says otherwise: they check "
             "that the pipeline works end to end and show trends, not the paper's LLaMA-7B numbers. Each script has "
             "flags to scale up on a GPU (see its `--help`).\n"]
    section_criteria_check(parts)
    section_recovery(parts)
    section_mask_agreement(parts)
    section_overhead(parts)
    section_zeroshot(parts)
    section_quality(parts)
    section_cost(parts)
    section_speed(parts)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(parts))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
