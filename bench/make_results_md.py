"""Write ``docs/results.md`` from the JSON files in ``bench/results/`` (run after the benchmarks).

    python bench/make_results_md.py

Every number in the page comes from those files; sections whose JSON is missing say so.
"""

from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import quality  # noqa: E402
from rerun import compare as compare_rerun  # noqa: E402
from loraprune_trainer.evaluation import PAPER_METRICS, PAPER_TASKS, paper_accuracy, paper_mean  # noqa: E402

OUT = os.path.join(common.REPO_ROOT, "docs", "results.md")
# Grid reruns on a CPU of another kind (same core count, older cores), kept apart from grid_rerun/,
# whose machines reproduced most grid runs float for float.
OTHER_CPU_RERUNS = "grid_rerun_avx2"


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
    extra = f"; 1-minute load average at start {load_avg[0]:.1f}" if load_avg else ""
    return f"{dev}, torch {m.get('torch')}, Python {m.get('python')}, commit {m.get('git_commit')}{extra}"


def section_quality(parts):
    q = load("quality.json")
    parts.append("## Superseded: the first quality grid (512 training tokens, shared cores)\n")
    parts.append("Kept for the record; the grid at the top of this page replaces it. Every run here trained on 4 "
                 "steps (512 tokens), so nothing recovered, and several runs shared the 2 cores at once.\n")
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


def _quiet_line(d) -> str:
    """The load averages a timing bench recorded, and whether it was forced on a busy machine."""
    busy = (" **Forced on a busy machine (`--allow-busy`): the timings are marked busy and are not comparisons.**"
            if d.get("busy") else " Below the 1.5 threshold both times: nothing else heavy ran.")
    return (f"1-minute load average at start / end: {_load(d.get('load_average_at_start'))} / "
            f"{_load(d.get('load_average_at_end'))}.{busy}")


def section_cost(parts):
    c = load("criterion_cost.json")
    parts.append("## Criterion cost: LoRA-guided vs full gradient (paper Table 4)\n")
    if not c:
        parts.append("_Not run yet (`python bench/criterion_cost.py`)._\n")
        return
    s = c["settings"]
    parts.append(
        f"Command: `{c['command']}`; wall time {c['wall_s'] / 60:.1f} min.  \nMachine: {machine_line(c['machine'])}.  \n"
        f"{_quiet_line(c)}\n")
    parts.append(
        f"Settings: SmolLM2-135M, batch {s['batch']} x {s['max_length']} tokens, {s['steps']} steps (first "
        f"{s['skip']} untimed, median of the rest), every step scores; gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}; each criterion in its own process, one after another. "
        f"Memory: `{c['memory_metric']}` (on CPU the peak resident set, which includes the float32 weights; "
        "`above_ready_MiB` is the growth after the trainer was built). `none` = plain LoRA SFT without pruning.\n")
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
                     f"{lo['score_s']:.2f} s vs {va['score_s']:.2f} s per step. Where the costs sit: `lora` builds "
                     "G = gB A + B gA - gB gA (rank-8 products, independent of the tokens per step), `vanilla` pays "
                     "an extra [out, in] gradient matmul in every backward (proportional to the tokens per step), "
                     "`taylor_gate` one multiply per gated layer.\n")
    parts.append("![criterion cost](../bench/results/criterion_cost.png)\n")


def _runs(folder: str) -> list[dict]:
    """Every finished run JSON of a ``bench/quality.py --out bench/results/<folder>`` series, in name order."""
    path = os.path.join(common.RESULTS_DIR, folder)
    return [common.read_json(os.path.join(path, f"{rid}.json")) for rid in common.run_ids(path)]


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
    """Dense SmolLM2 on the local zero-shot tasks (``python -m loraprune_trainer.eval ... --out``, and the grid's
    dense run for HellaSwag)."""
    parts.append("## Zero-shot accuracy of the dense model (local files)\n")
    found = [(name, load(name)) for name in ("zeroshot_dense_full.json", "zeroshot_dense_limit250.json")]
    found = [(n, d) for n, d in found if d]
    grid_dense = next((r for r in _runs("grid") if r["mode"] == "dense"), None)
    for key in ("zeroshot_full", "zeroshot"):  # the grid's dense run adds HellaSwag, full set where scored
        zs = (grid_dense or {}).get(key)
        if zs and "hellaswag" in zs["tasks"]:
            found.append((f"grid/dense.json ({'full set' if key == 'zeroshot_full' else 'limit ' + str(zs['limit'])})",
                          {"zero_shot": {"tasks": {"hellaswag": zs["tasks"]["hellaswag"]}}}))
            break
    if not found:
        parts.append("_Not run yet (`python -m loraprune_trainer.eval --model smollm2-gguf --tasks ... --out ...`)._\n")
        return
    parts.append(
        "lm-eval 0.4.13 with the official task definitions, reading the upstream files of `zeroshot/` (0-shot). "
        "SmolLM2-135M-Instruct here is the Q4_1 GGUF de-quantized to float32, not the bf16 Hub weights. `limit` = "
        "first N items of each task (not a random sample). `paper mean`: the headline of the LoRAPrune / LLM-Pruner "
        "table, over PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c and OBQA with LLM-Pruner's metrics (`acc` for PIQA, "
        "WinoGrande, ARC-e; `acc_norm` for HellaSwag, ARC-c, OBQA); BoolQ is reported beside it, not in it.\n")
    rows = []
    for name, d in found:
        for task, r in d["zero_shot"]["tasks"].items():
            rows.append({"file": name, "task": task, "items": f"{r['num_samples']} / {r['num_samples_total']}",
                         "acc": 100 * r["acc"], "acc_stderr": 100 * r["acc_stderr"],
                         "acc_norm": 100 * r["acc_norm"] if r.get("acc_norm") is not None else None,
                         "acc_norm_stderr": 100 * r["acc_norm_stderr"] if r.get("acc_norm_stderr") is not None else None,
                         "paper metric": PAPER_METRICS.get(task)})
    parts.append(md_table(rows, ["file", "task", "items", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr",
                                 "paper metric"], fmt="{:.1f}") + "\n")
    tasks = {}
    for _, d in reversed(found):  # the full sets win over a limited run of the same task
        tasks.update(d["zero_shot"]["tasks"])
    table = paper_mean(tasks)
    if table["mean"] is not None:
        limits = sorted({str(t.get("num_samples")) for n, t in tasks.items() if n in PAPER_TASKS})
        parts.append(f"Paper mean of the dense model: **{100 * table['mean']:.1f}** (± {100 * table['stderr']:.1f}; "
                     f"items per task: {', '.join(limits)}).\n")
    rows = []
    for task, metric, value, model, source in PUBLISHED_ZEROSHOT:
        entry = tasks.get(task, {})
        ours = entry.get(metric)
        rows.append({"task": task, "metric": metric, "here": 100 * ours if ours is not None else None,
                     "items here": entry.get("num_samples"), "published": value,
                     "gap": 100 * ours - value if ours is not None else None, "published model": model,
                     "source": source})
    parts.append("Against published lm-eval 0-shot figures (third-party runs on the bf16 Hub weights; no "
                 "official lm-eval numbers for SmolLM2-135M-Instruct on these tasks were found):\n")
    parts.append(md_table(rows, ["task", "metric", "here", "items here", "published", "gap", "published model",
                                 "source"], fmt="{:.1f}") + "\n")
    parts.append(
        "On the tasks with a published SmolLM2-135M-Instruct figure this model scores a little lower, which the Q4_1 "
        "quantization of the GGUF (4-bit weights, de-quantized here) plausibly explains; HellaSwag also differs from "
        "the Hub task by the case of one word per item (the local file joins ctx_a and ctx_b without lm-eval's "
        "capitalisation), and is scored on the items the table says. WinoGrande, OBQA and BoolQ compare with related "
        "models only. BoolQ at 41.3% is below the 62.2% a constant \"yes\" would score: the model "
        "answers \" no\" to most questions under lm-eval's prompt. That is what other models this small do "
        "too (SmolLM2-70M: 39.7%), and the labels were checked (2,033 true of 3,270, mapped to \"yes\" as the "
        "Hub's 1). BoolQ therefore says little at this scale, which is one reason it stays outside the paper mean.\n")


# (task, metric, published value in %, model it was measured on, source). Third-party lm-eval 0-shot runs.
PUBLISHED_ZEROSHOT = [
    ("piqa", "acc_norm", 66.92, "SmolLM2-135M-Instruct",
     "hf.co/lldois/SmolLM2-135M-Reasoning-SLERP-Champion (baseline column)"),
    ("arc_easy", "acc", 54.12, "SmolLM2-135M-Instruct", "same card"),
    ("hellaswag", "acc_norm", 42.99, "SmolLM2-135M-Instruct", "same card"),
    ("arc_challenge", "acc_norm", 27.73, "SmolLM2-135M-Instruct", "same card"),
    ("openbookqa", "acc_norm", 32.8, "SmolLM2-135M (base)", "hf.co/HuggingFaceTB/SmolLM2-135M discussions (full test)"),
    ("winogrande", "acc", 50.04, "SmolLM2-70M (smaller, same family)", "hf.co/codelion/SmolLM2-70M (lm-eval 0.4.11)"),
    ("boolq", "acc", 39.66, "SmolLM2-70M (smaller, same family)", "hf.co/codelion/SmolLM2-70M (lm-eval 0.4.11)"),
]


# The paper's six in its order, then BoolQ as an extra column outside the mean.
TASK_COLUMNS = [("piqa", "PIQA"), ("hellaswag", "HellaS"), ("winogrande", "WinoG"), ("arc_easy", "ARC-e"),
                ("arc_challenge", "ARC-c"), ("openbookqa", "OBQA"), ("boolq", "BoolQ")]
FIVE = [t for t in PAPER_TASKS if t != "hellaswag"]  # what the runs scored before HellaSwag was in the suite
PPL_COLUMNS = [("wikitext2/llm-pruner", "WikiText-2"), ("ptb/llm-pruner", "PTB"), ("c4/llm-pruner", "C4 val")]


_distill = quality.distill_alpha


_comp = quality.compensation


def _method(run) -> str:
    if run["mode"] == "dense":
        return "dense"
    name = run["criterion"] + (" one-shot, then tune" if run["mode"] == "oneshot" else "")
    name += f" + {_comp(run)} refit" if _comp(run) != "none" else ""
    return name + (f" + KD {_distill(run):g}" if _distill(run) else "")


def _grid_row(run, dense, key="zeroshot") -> dict:
    row = {"budget": f"{run['ratio']:.0%}" if run["ratio"] else "0%", "method": _method(run),
           "params_M": run["parameters"] / 1e6}
    for metric, col in PPL_COLUMNS:
        if metric in run["metrics"]:
            row[col] = run["metrics"][metric]["perplexity"]
    zs = run.get(key)
    if zs:
        tasks = zs["tasks"]
        for task, col in TASK_COLUMNS:
            if task in tasks:
                row[col] = 100 * paper_accuracy(task, tasks[task])
        table = paper_mean(tasks)
        if table["mean"] is not None:
            row["paper mean"] = 100 * table["mean"]
            row["± mean"] = 100 * table["stderr"] if table["stderr"] is not None else None
        five = [paper_accuracy(t, tasks[t]) for t in FIVE if t in tasks]
        if len(five) == len(FIVE):  # comparable across every run, HellaSwag scored or not
            row["mean of 5"] = 100 * sum(five) / len(five)
            errors = [tasks[t].get(f"{PAPER_METRICS[t]}_stderr") for t in FIVE]
            if None not in errors:
                row["± 5"] = 100 * sum(e * e for e in errors) ** 0.5 / len(errors)
        row["items/task"] = zs["limit"] or "all"
        taken = (run.get("tasks_from_rerun") or {}).get(key)
        if taken:
            names = dict(TASK_COLUMNS)
            row["items/task"] = f"{row['items/task']} ({', '.join(names.get(t, t) for t in taken)}: rerun)"
    return row


def _full_hellaswag_gaps(runs: list[dict]) -> str:
    """Why a row of the full-sets table has no HellaSwag (``runs`` as the grid table has them: tasks taken from
    same-model reruns already in). "" when none lacks it."""
    missing = [r for r in runs if r.get("zeroshot_full") and "hellaswag" not in r["zeroshot_full"]["tasks"]]
    if not missing:
        return ""
    names = ", ".join(f"`{_method(r)}` {r['ratio']:.0%}" for r in missing)
    return (f"No full HellaSwag yet for {names}: the run's saved model was gone before HellaSwag joined the suite, "
            "and only a rerun that reproduces the model (`same model` in the rerun table) may fill the cell, with "
            "`python bench/quality_zeroshot.py --out bench/results/grid_rerun --models .bench_models/grid_rerun "
            "--runs <run> --tasks hellaswag --limit 0`.\n")


def _with_rerun_tasks(runs: list[dict], reruns: list[dict] | None = None) -> list[dict]:
    """The grid's runs, each completed with the zero-shot tasks it lacks from its rerun
    (``bench/results/grid_rerun/``, ``bench/rerun.py``) where the rerun is the same model: the same parameter
    count and every perplexity within ``rerun.SAME_MODEL_RTOL`` of the first run's, at the same item limit.
    The first runs' saved weights were gone before HellaSwag joined the suite; the reruns' were kept. A
    completed run (a copy) lists what it took under ``tasks_from_rerun``: ``{result key: [task, ...]}``."""
    reruns = {r["run"]: r for r in (_runs("grid_rerun") if reruns is None else reruns)}
    out = []
    for run in runs:
        again = reruns.get(run["run"])
        if again is None or run["mode"] == "dense" or not compare_rerun(run, again)["same_model"]:
            out.append(run)
            continue
        run, taken = copy.deepcopy(run), {}
        for key in ("zeroshot", "zeroshot_full"):
            theirs = again.get(key)
            if not theirs:
                continue
            mine = run.get(key)
            if mine is None:
                run[key], taken[key] = copy.deepcopy(theirs), sorted(theirs["tasks"])
            elif mine.get("limit") == theirs.get("limit"):
                missing = [t for t in theirs["tasks"] if t not in mine["tasks"]]
                mine["tasks"].update({t: theirs["tasks"][t] for t in missing})
                if missing:
                    taken[key] = missing
        if taken:
            run["tasks_from_rerun"] = taken
        out.append(run)
    return out


def _other_model_reruns(runs: list[dict], reruns: list[dict] | None = None) -> list[dict]:
    """Reruns that are not the same model as their grid run (``compare_rerun``: another parameter count or a
    perplexity moved by more than ``rerun.SAME_MODEL_RTOL``, as when the first run was recorded on a CPU whose
    float reductions differ) but scored the HellaSwag the grid run lacks. Their tasks cannot complete the grid
    run's row, so each is shown as a row of its own, every number from the rerun's model; a copy marked
    ``rerun_of``."""
    reruns = {r["run"]: r for r in (_runs("grid_rerun") if reruns is None else reruns)}
    out = []
    for run in runs:
        again = reruns.get(run["run"])
        if again is None or run["mode"] == "dense" or compare_rerun(run, again)["same_model"]:
            continue
        has = (run.get("zeroshot") or {}).get("tasks") or {}
        if "hellaswag" not in has and "hellaswag" in ((again.get("zeroshot") or {}).get("tasks") or {}):
            out.append(dict(copy.deepcopy(again), rerun_of=run["run"]))
    return out


def section_grid(parts):
    """The paper-style table of ``bench/results/grid/`` (issue: every criterion at equal tokens)."""
    runs = _with_rerun_tasks(_runs("grid"))
    own_rows = _other_model_reruns(runs)
    parts.append("## Quality at equal tokens: every criterion at 20%, the best at 50% (paper Tables 1-2)\n")
    if not runs:
        parts.append("_Not run yet (`python bench/quality.py --out bench/results/grid ...`)._\n")
        return
    dense = next((r for r in runs if r["mode"] == "dense"), None)
    order = {"taylor_gate": 0, "lora": 1, "vanilla": 2, "wanda": 3, "random": 4}
    runs.sort(key=lambda r: (r["ratio"] or 0, r["mode"] == "oneshot", order.get(r["criterion"], -1),
                             _comp(r) != "none", _comp(r), _distill(r)))  # compensated runs after the plain ones
    pruned = [r for r in runs if r["mode"] != "dense"]
    s = pruned[0]["settings"] if pruned else runs[0]["settings"]
    tokens = sorted({r.get("tokens_trained") for r in pruned})
    parts.append(
        f"SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized to float32), LoRA r 8 on all seven projections. Every pruned "
        f"model trained {s['steps']} steps x {s['batch']} x {s['max_length']} tokens of `c4/c4_train_sample.jsonl` "
        f"(lr {s['lr']}, linear decay; {', '.join(str(t) for t in tokens)} tokens counted by the trainer), then "
        "was cut and merged. Budget = share of decoder-layer parameters removed (`param_pruning_ratio`), all of it "
        "from MLP channels (`attention_pruning_ratio=0`: the recovery section found attention cuts costlier on this "
        f"model). Iterative = LoRAPrune (cubic schedule, masks every {s['prune_freq']} steps); one-shot = scored "
        f"once on {s['calib_samples']} other C4 documents, cut, then the same fine-tune (plain LoRA, no distillation). "
        "KD = self-distillation from the unpruned base (alpha 0.5, T 1). Perplexity: `llm-pruner` protocol "
        f"(128-token windows), first {s['windows']} windows of WikiText-2 test, PTB validation and the first "
        f"{s['c4_docs']} documents of the C4 validation sample (never trained on). Zero-shot: lm-eval, official "
        "task definitions on the local files, 0-shot, first N items of each task as the `items/task` column says "
        "(a 500-item accuracy has a standard error of about 2.2 points), each task under the metric of the "
        "LoRAPrune / LLM-Pruner table (`acc` for PIQA, WinoGrande, ARC-e and BoolQ; `acc_norm` for HellaSwag, "
        "ARC-c and OBQA). `paper mean` is that table's headline, over its six tasks (BoolQ outside); `mean of 5` "
        "leaves HellaSwag out too, so that runs whose saved models were gone before HellaSwag joined the suite "
        "still compare (their `paper mean` is blank rather than a mean over fewer tasks).\n")
    commands = sorted({r["command"] for r in runs})
    common_part = os.path.commonprefix(commands).rsplit(" --", 1)[0] if len(commands) > 1 else ""
    parts.append("Commands (one JSON per run in `bench/results/grid/`; zero-shot added by "
                 "`bench/quality_zeroshot.py` from the saved models):\n")
    if common_part:
        parts.append(f"`{common_part}` followed by, one invocation each:\n")
        parts.extend(f"- `{c[len(common_part):].strip()}`" for c in commands)
    else:
        parts.extend(f"- `{c}`" for c in commands)
    zs_commands = sorted({(r.get(k) or {}).get("command") for r in runs for k in ("zeroshot", "zeroshot_full")} - {None})
    parts.extend(f"- `{c}`" for c in zs_commands)
    parts.append("")
    rows = []
    for r in runs:
        rows.append(_grid_row(r, dense))
        rows.extend(dict(_grid_row(again, dense), method=_method(again) + " (rerun)")
                    for again in own_rows if again["rerun_of"] == r["run"])
    spread = run_to_run_spread()
    limit = max(v for v in (spread["max_rel"], spread["demo_rel"]) if v is not None) if (
        spread["max_rel"] is not None or spread["demo_rel"] is not None) else None
    for budget in {row["budget"] for row in rows if row["budget"] != "0%"}:
        group = [row for row in rows if row["budget"] == budget and row.get("WikiText-2")]
        best = min(row["WikiText-2"] for row in group)
        for row in group:
            gap = 100 * (row["WikiText-2"] / best - 1)
            row["WikiText-2 vs best"] = (f"+{gap:.1f}%" + (" (in spread)" if limit is not None and 0 < gap <= limit
                                                         else "")) if gap else "best"
    cols = ["budget", "method", "params_M", *[c for _, c in PPL_COLUMNS], *[c for _, c in TASK_COLUMNS], "paper mean",
            "± mean", "mean of 5", "± 5", "items/task"]
    parts.append(md_table(rows, cols[:6] + ["WikiText-2 vs best"] + cols[6:], fmt="{:.1f}") + "\n")
    from_rerun = [r for r in runs if r.get("tasks_from_rerun")]
    if from_rerun:
        parts.append(f"Where `items/task` names a task with \"rerun\" ({len(from_rerun)} of {len(pruned)} pruned "
                     "runs), that task was scored on the model of a rerun of the same command (`bench/rerun.py`, "
                     "models kept), because this run's saved model was gone before the task joined the suite; the "
                     "rerun kept the same parameter count and its perplexities match this run's within 0.01% (next "
                     "section), so it is the same model up to "
                     "float rounding.\n")
    if own_rows:
        first = {r["run"]: r for r in runs}
        before = []  # the dense model's perplexity before any step, as each machine computed it
        for again in own_rows:
            a, b = (first[again["rerun_of"]].get("curve") or [{}])[0], (again.get("curve") or [{}])[0]
            if a.get("step") == b.get("step") == 0 and a.get("perplexity") != b.get("perplexity"):
                before.append(f"`{again['rerun_of']}` {a['perplexity']:.8f} / {b['perplexity']:.8f}")
        parts.append("A row marked \"(rerun)\" is a rerun of the row above it, the same command and settings, that "
                     "did not reproduce its model (a perplexity moved by more than 0.01%). Every number in it is the "
                     "rerun model's own, HellaSwag included; the row above keeps its first-run numbers without "
                     "HellaSwag. The gap between the two rows is one more measure of run-to-run spread"
                     + ((". The two machines computed even the dense model's perplexity before the first step "
                         "differently (" + "; ".join(before) + "): their float reductions differ, and a close mask "
                         "choice later tipped") if before else "") + ".\n")
    if limit is not None:
        parts.append(f"`WikiText-2 vs best`: the gap to the best run at the same budget; \"in spread\" marks a gap no "
                     f"larger than {limit:.1f}%, the largest run-to-run change measured for one command (next section), "
                     "so one run cannot tell those settings apart.\n")
    full = [_grid_row(r, dense, "zeroshot_full") for r in runs if r.get("zeroshot_full")]
    if full:
        parts.append("Full task sets (every item) for the dense model and the best 20% models: `taylor_gate` by "
                     "perplexity and `wanda` by zero-shot accuracy on 500 items:\n")
        parts.append(md_table(full, cols, fmt="{:.1f}") + "\n")
        parts.append(_full_hellaswag_gaps(runs))
    # Distillation's effect, criterion by criterion at the same budget.
    kd_rows = []
    for r in pruned:
        if _distill(r) or _comp(r) != "none":
            continue
        twin = next((t for t in pruned if t["criterion"] == r["criterion"] and t["ratio"] == r["ratio"]
                     and t["mode"] == r["mode"] and _distill(t) and _comp(t) == "none"), None)
        if twin is None:
            continue
        row = {"budget": f"{r['ratio']:.0%}", "criterion": r["criterion"]}
        for metric, col in PPL_COLUMNS[:3]:
            if metric in r["metrics"] and metric in twin["metrics"]:
                row[f"{col} without / with"] = (f"{r['metrics'][metric]['perplexity']:.1f} / "
                                                f"{twin['metrics'][metric]['perplexity']:.1f}")
        if r.get("zeroshot") and twin.get("zeroshot"):
            a, b = _grid_row(r, None), _grid_row(twin, None)
            if a.get("mean of 5") is not None and b.get("mean of 5") is not None:
                row["mean of 5 without / with"] = f"{a['mean of 5']:.1f} / {b['mean of 5']:.1f}"
        kd_rows.append(row)
    if kd_rows:
        parts.append("Distillation, criterion by criterion (same budget, same tokens):\n")
        parts.append(md_table(kd_rows, list(dict.fromkeys(k for row in kd_rows for k in row))) + "\n")
    # Cost and the machine, per run.
    cost = [{"run": r["run"], "tokens": r.get("tokens_trained"),
             "train_min": r["train_s"] / 60 if r.get("train_s") else None,
             "eval_min": r["eval_s"] / 60 if r.get("eval_s") else None,
             "load_start/end": f"{_load(r['machine'].get('load_average_at_start'))} / "
                               f"{_load(r.get('load_average_at_end'))}",
             "zero-shot load start/end": (f"{_load(r['zeroshot'].get('load_average_at_start'))} / "
                                          f"{_load(r['zeroshot'].get('load_average_at_end'))}") if r.get("zeroshot") else None}
            for r in runs]
    parts.append("Per run: training tokens, wall times and the 1-minute load average at start and end (each run "
                 "alone on the 2 cores with 2 torch threads, so about 2 is the run's own load). These minutes record what a "
                 "run cost on this machine; they are not speed comparisons (for those, see the quiet 1-thread tables: "
                 "inference speed, criterion cost, step overhead):\n")
    parts.append(md_table(cost, ["run", "tokens", "train_min", "eval_min", "load_start/end",
                                 "zero-shot load start/end"]) + "\n")
    parts.append(grid_reading(runs, own_rows))
    parts.append("![recovery curves](../bench/results/grid.curve.png)\n")
    parts.append("![WikiText-2 by criterion](../bench/results/grid.png)\n")


def _ppl(run, metric):
    return run["metrics"][metric]["perplexity"] if metric in run["metrics"] else None


def _boolq_yes_share(limit: int | None) -> float | None:
    """Share (%) of gold "yes" answers among the first ``limit`` BoolQ validation questions (all if None), read
    from the local task file; None where the data folder is not at hand."""
    import json

    try:
        path = common.data_file(os.path.join("zeroshot", "boolq", "val.jsonl"))
        with open(path, encoding="utf-8") as f:
            labels = [str(json.loads(line)["label"]).lower() == "true" for line in f if line.strip()]
    except (FileNotFoundError, KeyError):
        return None
    labels = labels[:limit] if limit else labels
    return 100 * sum(labels) / len(labels) if labels else None


def grid_reading(runs, own_rows=()) -> str:
    """What the grid shows, in sentences computed from the runs (so a rerun cannot leave stale numbers).
    ``own_rows``: reruns shown as rows of their own (``_other_model_reruns``), each marked ``rerun_of``."""
    dense = next((r for r in runs if r["mode"] == "dense"), None)
    twenty = [r for r in runs if r["ratio"] == 0.2 and r["mode"] == "iterative"]
    plain = {r["criterion"]: r for r in twenty if not _distill(r) and _comp(r) == "none"}
    out = []
    if twenty:
        winners = []
        for metric, col in PPL_COLUMNS:
            scored = [(r, _ppl(r, metric)) for r in twenty if _ppl(r, metric) is not None]
            if scored:
                best, value = min(scored, key=lambda x: x[1])
                runner_up = sorted(v for _, v in scored)[1] if len(scored) > 1 else None
                margin = f", {100 * (runner_up / value - 1):.1f}% ahead of the next" if runner_up else ""
                winners.append(f"{col} {_method(best)} ({value:.1f}{margin})")
        zs = [(r, _grid_row(r, None)) for r in twenty if r.get("zeroshot")]
        for col in ("paper mean", "mean of 5"):
            scored = [(r, row[col]) for r, row in zs if row.get(col) is not None]
            if len(scored) > 1:  # a winner of one is no comparison
                best, value = max(scored, key=lambda x: x[1])
                winners.append(f"zero-shot {col} {_method(best)} ({value:.1f}; {len(scored)} of {len(twenty)} runs "
                               "evaluated)")
        line = "**Winners at 20%** (lowest perplexity, highest accuracy): " + "; ".join(winners) + "."
        useful = [(r, row) for r, row in zs if r["criterion"] != "random" and row.get("mean of 5") is not None]
        if len(useful) > 1:
            values = [row["mean of 5"] for _, row in useful]
            se = max(row.get("± 5") or 0 for _, row in useful)
            line += (f" On the five paper tasks every run has (HellaSwag aside), the {len(useful)} non-random runs span "
                     f"{min(values):.1f}-{max(values):.1f} ({max(values) - min(values):.1f} points), against a standard "
                     f"error of up to {se:.1f} points for one such mean: zero-shot accuracy separates random masks "
                     "from the rest, not the criteria from each other; perplexity does, at least for gaps as large "
                     "as `lora`'s.")
        six = [(r, row) for r, row in zs if row.get("paper mean") is not None and row.get("HellaS") is not None]
        others = [row for r, row in six if r["criterion"] != "random"]
        randoms = [row for r, row in six if r["criterion"] == "random"]
        if len(others) > 1 and randoms:
            def span(rows, col):
                values = [row[col] for row in rows]
                return f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"

            hs_se = max(100 * (r["zeroshot"]["tasks"]["hellaswag"].get("acc_norm_stderr") or 0) for r, _ in six)
            gap = min(row["HellaS"] for row in others) - max(row["HellaS"] for row in randoms)
            line += (f" With HellaSwag in (the paper's six), the {len(others)} non-random runs span "
                     f"{span(others, 'paper mean')} and random masks {span(randoms, 'paper mean')}; HellaSwag alone "
                     f"spans {span(others, 'HellaS')} against random's {span(randoms, 'HellaS')}, with a standard "
                     f"error of about {hs_se:.1f} points per figure"
                     + (": at this size HellaSwag alone does not set the worst criterion apart from random masks."
                        if gap < 2 * hs_se else "."))
        out.append(line)
    if "taylor_gate" in plain:
        ref = plain["taylor_gate"]
        gaps = []
        for crit in ("lora", "vanilla", "wanda", "random"):
            if crit in plain:
                cells = [f"{col} {100 * (_ppl(plain[crit], m) / _ppl(ref, m) - 1):+.1f}%"
                         for m, col in PPL_COLUMNS if _ppl(plain[crit], m) and _ppl(ref, m)]
                gaps.append(f"`{crit}` " + ", ".join(cells))
        line = "**Perplexity against `taylor_gate`** (same budget and tokens, no distillation): " + "; ".join(gaps) + "."
        metrics = [m for m, _ in PPL_COLUMNS if all(_ppl(r, m) for r in plain.values())]

        def worse_everywhere(a, b):  # does criterion a leave a higher perplexity than b on every set?
            return a in plain and b in plain and metrics and all(_ppl(plain[a], m) > _ppl(plain[b], m) for m in metrics)

        beaten_by = [f"`{c}`" for c in ("taylor_gate", "vanilla", "wanda") if worse_everywhere("lora", c)]
        if beaten_by:
            line += (" The paper's LoRA-guided criterion (`lora`) loses here: its masks leave a higher perplexity "
                     f"on every set than {' and '.join([', '.join(beaten_by[:-1]), beaten_by[-1]] if len(beaten_by) > 1 else beaten_by)}"
                     + (", including the full-gradient score it approximates (`vanilla`)" if "`vanilla`" in beaten_by
                        else "") + ".")
        if "random" in plain and metrics:
            factor = min(_ppl(plain["random"], m) / _ppl(ref, m) for m in metrics)
            line += f" Random masks are at least {factor:.1f}x worse than `taylor_gate` on every set."
        out.append(line)
    kd = []
    for crit, r in plain.items():
        twin = next((t for t in twenty if t["criterion"] == crit and _distill(t) and _comp(t) == "none"), None)
        if twin:
            kd.append(f"`{crit}` " + ", ".join(f"{col} {100 * (_ppl(twin, m) / _ppl(r, m) - 1):+.1f}%"
                                              for m, col in PPL_COLUMNS if _ppl(r, m) and _ppl(twin, m)))
    if kd:
        out.append("**Distillation** (alpha 0.5, T 1; change in perplexity, negative = better): " + "; ".join(kd)
                   + ". It helps only where the pruned model is far from its teacher (random masks); for the "
                   "useful criteria it trades a little WikiText-2 for a little PTB and leaves C4 unchanged, while "
                   "a step costs 1.21x a plain `lora` step (step cost table: `bench/overhead.py`, measured alone on 1 "
                   "thread; the grid's own train_min say about the same but ran at 2 threads). At these budgets it is "
                   "not worth turning on.")
    if dense and "taylor_gate" in plain:
        best = plain["taylor_gate"]
        ratios = ", ".join(f"{col} {_ppl(best, m) / _ppl(dense, m):.2f}x" for m, col in PPL_COLUMNS
                           if _ppl(best, m) and _ppl(dense, m))
        line = (f"**Best 20% model against dense** (`taylor_gate`, {best['parameters'] / 1e6:.1f}M vs "
                f"{dense['parameters'] / 1e6:.1f}M parameters): perplexity {ratios}")
        if best.get("zeroshot") and dense.get("zeroshot"):
            b, d = _grid_row(best, None), _grid_row(dense, None)
            col = "paper mean" if b.get("paper mean") is not None and d.get("paper mean") is not None else "mean of 5"
            if b.get(col) is not None and d.get(col) is not None:
                line += (f"; zero-shot {col} {b[col]:.1f} vs {d[col]:.1f} ({b[col] - d[col]:+.1f} points; BoolQ, outside "
                         f"the mean, goes from {d['BoolQ']:.1f} to {b['BoolQ']:.1f}")
                yes = _boolq_yes_share(best["zeroshot"]["limit"])
                if yes is not None:
                    line += (f", and the gold answer of {yes:.1f}% of the questions scored is \"yes\" (always \"no\" "
                             f"would score {100 - yes:.1f}): the dense model answers mostly \"no\", the pruned one "
                             "almost always \"yes\", a change of bias rather than of reading, which is why BoolQ "
                             "stays out of the headline")
                line += ")"
        out.append(line + ".")
    full = [r for r in runs if r.get("zeroshot_full") and r["mode"] != "dense"]
    if dense and dense.get("zeroshot_full") and full:
        d = _grid_row(dense, None, "zeroshot_full")
        cells = []
        for r in full:
            b = _grid_row(r, None, "zeroshot_full")
            cell = f"{_method(r)} {r['ratio']:.0%}:"
            for col in ("paper mean", "mean of 5"):
                if b.get(col) is not None and d.get(col) is not None:
                    cell += f" {col} {b[col]:.1f} ({b[col] - d[col]:+.1f}),"
            cells.append(cell + f" BoolQ {b['BoolQ']:.1f}")
        dense_cell = ", ".join(f"{col} {d[col]:.1f} (± {d['± mean' if col == 'paper mean' else '± 5']:.1f})"
                               for col in ("paper mean", "mean of 5") if d.get(col) is not None)
        out.append(f"**On the full task sets** (every item; dense: {dense_cell}, BoolQ {d['BoolQ']:.1f}): "
                   + "; ".join(cells) + ".")
    fifty = {(_method(r)): r for r in runs if r["ratio"] == 0.5}
    if fifty:
        again = {r["rerun_of"]: r for r in own_rows}

        def means(r):
            row = _grid_row(r, None)
            if row.get("paper mean") is not None:
                return f", zero-shot paper mean {row['paper mean']:.1f} (mean of 5 {row['mean of 5']:.1f})"
            return f", zero-shot mean of 5 {row['mean of 5']:.1f}" if row.get("mean of 5") is not None else ""

        def zs_cell(r):
            other = again.get(r["run"])
            if means(r) or other is None:
                return means(r)
            return (" (its rerun, another model: " + " / ".join(f"{_ppl(other, m):.1f}" for m, _ in PPL_COLUMNS
                                                                 if _ppl(other, m)) + means(other) + ")")

        cells = [f"{name}: " + " / ".join(f"{_ppl(r, m):.1f}" for m, _ in PPL_COLUMNS if _ppl(r, m)) + zs_cell(r)
                 for name, r in fifty.items()]
        d = _grid_row(dense, None) if dense and dense.get("zeroshot") else {}
        reference = (f" (dense: zero-shot paper mean {d['paper mean']:.1f}, mean of 5 {d['mean of 5']:.1f})"
                     if d.get("paper mean") is not None else
                     f" (dense: zero-shot mean of 5 {d['mean of 5']:.1f})" if d.get("mean of 5") is not None else "")
        line = "**50%** (WikiText-2 / PTB / C4 perplexity): " + "; ".join(cells) + reference + "."
        oneshot = next((r for r in runs if r["ratio"] == 0.5 and r["mode"] == "oneshot"), None)
        iterative = [r for r in runs if r["ratio"] == 0.5 and r["mode"] == "iterative"
                     and oneshot is not None and r["criterion"] == oneshot["criterion"]]
        for r in iterative:
            ratios = " / ".join(f"{_ppl(oneshot, m) / _ppl(r, m):.1f}x" for m, _ in PPL_COLUMNS
                                if _ppl(oneshot, m) and _ppl(r, m))
            like_for_like = "; like for like, as the one-shot fine-tune has no distillation either" if not _distill(r) else ""
            line += (f" With `{r['criterion']}`, pruning while fine-tuning ({_method(r)}{like_for_like}) left "
                     f"perplexities {ratios} lower than pruning once and then fine-tuning on the same tokens.")
        target = next((r.get("target") for r in runs if r["ratio"] == 0.5 and r.get("target")), None) or {}
        if target.get("mlp_channels_pruned_per_layer") is not None and target.get("mlp_channels_per_layer"):
            line += (f" At this budget {target['mlp_channels_pruned_per_layer']:,} of every layer's "
                     f"{target['mlp_channels_per_layer']:,} MLP channels go, and 51k tokens recover little: a budget for a "
                     "longer (GPU) run, not for this CPU.")
        out.append(line)
    covered = {r["rerun_of"] for r in own_rows if _hellaswag(r.get("zeroshot"))}
    lacking = [r for r in runs if r["mode"] != "dense" and not _hellaswag(r.get("zeroshot")) and r["run"] not in covered]
    hellaswag_caveat = ("HellaSwag only for the runs whose models were still at hand when it joined the suite (or "
                        "were trained again)" if lacking else
                        "HellaSwag scored on models trained again with the same commands, the first runs' models "
                        "being gone (where a rerun tipped to another model, that model has a row of its own)")
    out.append(
        "What the grid cannot show: one seed per cell (differences of a few percent between `taylor_gate`, "
        "`vanilla` and `wanda` are within what a second seed could move); 51k training tokens, far below the paper's "
        "budget, so these are early-recovery numbers; a 135M model whose MLPs are the only thing cut; zero-shot on "
        "500 items per task (about 2.2 points of standard error each); " + hellaswag_caveat + "; and BoolQ, where "
        "this model is below the majority class, carries little signal.")
    return "\n\n".join(out) + "\n"


def run_to_run_spread() -> dict:
    """How far one run of the same command moves: per perplexity set, the largest relative difference between
    a grid run and its rerun (``bench/results/grid_rerun/``, and ``OTHER_CPU_RERUNS`` for reruns on a slower
    CPU, their run ids marked "(other CPU)"), and the demo's perplexity range over seeds relative to its mean.
    ``{"pairs": [...], "max_rel": float or None, "demo_rel": float or None}``."""
    original = {r["run"]: r for r in _runs("grid")}
    pairs = []
    # Dense first, then by budget; the other CPU's reruns last.
    reruns = sorted([(r, "") for r in _runs("grid_rerun")] + [(r, " (other CPU)") for r in _runs(OTHER_CPU_RERUNS)],
                    key=lambda pair: (pair[1], pair[0]["mode"] != "dense", pair[0].get("ratio") or 0, pair[0]["run"]))
    for r, suffix in reruns:
        o = original.get(r["run"])
        if o is None:
            continue
        row = {"run": r["run"] + suffix, "method": _method(r)}
        for metric, col in PPL_COLUMNS:
            a, b = _ppl(o, metric), _ppl(r, metric)
            if a and b:
                row[f"{col} first / rerun"] = f"{a:.1f} / {b:.1f}"
                row[f"{col} change %"] = 100 * (b / a - 1)
        for key, label in (("zeroshot", "mean of 5 first / rerun"),):
            if o.get(key) and r.get(key):
                a, b = _grid_row(o, None).get("mean of 5"), _grid_row(r, None).get("mean of 5")
                if a is not None and b is not None:
                    row[label] = f"{a:.1f} / {b:.1f}"
        row["same model"] = "yes" if compare_rerun(o, r)["same_model"] else "no"
        hellaswag = _grid_row(r, None).get("HellaS")
        if hellaswag is not None:
            row["rerun HellaSwag"] = hellaswag
            # the first run's row as the grid table shows it: tasks it lacks taken from a same-model rerun
            row["paper mean"] = _grid_row(_with_rerun_tasks([o], [r])[0], None).get("paper mean")
        pairs.append(row)
    changes = [abs(v) for row in pairs for k, v in row.items() if k.endswith("change %")]
    demo = (load("demo_seeds.json") or {}).get("seed_spread") or []
    demo_rel = None
    if demo and demo[0].get("ppl_after_mean"):
        d = demo[0]
        demo_rel = 100 * (d["ppl_after_max"] - d["ppl_after_min"]) / d["ppl_after_mean"]
    return {"pairs": pairs, "max_rel": max(changes) if changes else None, "demo_rel": demo_rel}


def section_spread(parts):
    """Run-to-run spread: the demo over three seeds, and grid runs repeated on another machine."""
    parts.append("## How far one run moves: demo seeds and grid reruns\n")
    demo = load("demo_seeds.json")
    if demo and demo.get("rows"):
        runs = demo["runs"]
        parts.append(
            "The README's demo command (`configs/smollm2_demo.yaml`: 20% of decoder parameters from MLP channels, "
            "`taylor_gate`, 160 steps of 4 x 128 tokens; as it was then: lr 3e-4, exact MLP widths) with `--seed 0`, "
            "`1` and `2`, one after another on the "
            "2-core CPU, data from the shipped `data/` folder (no `LORAPRUNE_DATA_DIR`). Command: "
            f"`python bench/demo_budgets.py --steps 160 --seeds 0 1 2 --out bench/results/demo_seeds`. Wall time "
            "is the whole command (model loading, both perplexity passes, export and reload); "
            "`train_s_per_step` is training alone. Load = 1-minute load average at start / end (2 torch threads "
            "make about 2).\n")
        rows = [dict(r, load=f"{_load(run.get('load_average_at_start'))} / {_load(run.get('load_average_at_end'))}")
                for r, run in zip(demo["rows"], runs)]
        parts.append(md_table(rows, ["steps", "seed", "tokens", "wall_min", "train_s_per_step", "ppl_before",
                                     "ppl_after", "ppl_ratio", "decoder_params_ratio", "load"]) + "\n")
        for sp in demo.get("seed_spread") or []:
            parts.append(
                f"Over {sp['seeds']} seeds: WikiText-2 perplexity {sp['ppl_after_mean']:.2f} (range "
                f"{sp['ppl_after_min']:.2f}-{sp['ppl_after_max']:.2f}, {sp['ppl_ratio_mean']:.2f}x dense, range "
                f"{sp['ppl_ratio_min']:.2f}-{sp['ppl_ratio_max']:.2f}); whole command {sp['wall_min_min']:.1f}-"
                f"{sp['wall_min_max']:.1f} min; training {sp['train_s_per_step_min']:.2f}-"
                f"{sp['train_s_per_step_max']:.2f} s per step.\n")
    else:
        parts.append("_Demo seeds not run yet (`python bench/demo_budgets.py --steps 160 --seeds 0 1 2 --out "
                     "bench/results/demo_seeds`)._\n")
    spread = run_to_run_spread()
    if spread["pairs"]:
        parts.append(
            "Grid runs repeated with their recorded command on another machine of the same kind (`bench/results/"
            "grid_rerun/`, models saved to `.bench_models/grid_rerun`; options added to `quality.py` since a run "
            "are pinned to the behaviour it had). The first run's saved models were gone, so "
            "a rerun is the way to fill their HellaSwag column: `python bench/rerun.py --of bench/results/grid --out "
            "bench/results/grid_rerun --save-models .bench_models/grid_rerun --runs <run>`, then `python "
            "bench/quality_zeroshot.py --out bench/results/grid_rerun --models .bench_models/grid_rerun --tasks "
            "hellaswag --limit 500 --cache .bench_models/zeroshot_cache` (not run yet where the grid table has no "
            "paper mean). `same model`: the same parameter count and every perplexity within 0.01%; only then "
            "does the grid table take the rerun's HellaSwag, and `paper mean` is the first run's five tasks with it.\n")
        cols = list(dict.fromkeys(k for row in spread["pairs"] for k in row))
        parts.append(md_table(spread["pairs"], cols, fmt="{:.1f}") + "\n")
        original = {r["run"] for r in _runs("grid")}
        other = [r for r in _runs(OTHER_CPU_RERUNS) if r["run"] in original and r["mode"] != "dense"]
        if other:
            parts.append(
                "Rows marked \"(other CPU)\" ran the same command on a 2-core machine with another CPU: "
                + "; ".join(f"`{r['run']}` on {r['machine'].get('cpu') or 'an unrecorded CPU'}, torch kernels "
                            f"{r['machine'].get('cpu_capability') or '?'}" for r in other)
                + f". Command: `python bench/rerun.py --of bench/results/grid --out bench/results/{OTHER_CPU_RERUNS} "
                  "--save-models .bench_models/grid_rerun --runs <run>`. Such a machine gives another model from "
                  "the same command (its float reductions differ), so a task scored there fills no grid cell.\n")
        parts.append(
            ("The same command moved perplexity by less than 0.01% between machines (the same model)"
             if spread["max_rel"] < 0.01 else
             f"The same command moved perplexity by up to {spread['max_rel']:.1f}% between machines")
            + (f", and the demo's WikiText-2 perplexity spans {spread['demo_rel']:.1f}% of its mean over three seeds"
               if spread["demo_rel"] is not None else "")
            + ". A gap between two settings smaller than that is inside the spread of a single run; the grid table "
              "marks such gaps.\n")
    else:
        parts.append("_Grid reruns not run yet (the grid commands with `--out bench/results/grid_rerun`)._\n")


def section_compensation(parts):
    """Compensated cuts (``compensation``): one-shot without training, and pruning while fine-tuning."""
    parts.append("## Cuts that keep the signal: compensation\n")
    oneshot = [r for r in _runs("compensation_oneshot") if r["mode"] == "oneshot"]
    dense = next((r for r in _runs("compensation_oneshot") if r["mode"] == "dense"), None)
    if not oneshot:
        parts.append("_Not run yet (`python bench/quality.py --modes oneshot --steps 0 --compensation ...`)._\n")
    else:
        s = oneshot[0]["settings"]
        parts.append(
            f"One-shot, no fine-tuning: `taylor_gate` scored once on {s['calib_samples']} C4 documents (the same "
            "documents give the compensation's statistics, through the dense model), MLP channels cut to the "
            "budget (`--param-ratio`, attention whole), then the consumer (`down_proj`) refitted: `none` = plain "
            "deletion, `bias` = the removed channels' mean contribution as a bias (FLAP), `lstsq` = ridge least "
            f"squares on the kept columns (lambda {s['compensation_lambda']} of the mean diagonal). Perplexity: "
            f"`llm-pruner` protocol, first {s['windows']} windows of WikiText-2 and PTB, first {s['c4_docs']} C4 "
            "validation documents. Command: `python bench/quality.py --modes oneshot --steps 0 --batch 4 "
            "--max-length 128 --calib-samples 64 --windows 256 --protocols llm-pruner --eval-sets wikitext2 ptb c4 "
            "--attention-ratio 0 --criteria taylor_gate --out bench/results/compensation_oneshot` with `--ratios R "
            "--param-ratio R` and `--compensation C --tag=-C`.\n")
        rows = []
        for r in sorted(oneshot, key=lambda r: (r["ratio"], ["none", "bias", "lstsq"].index(_comp(r)))):
            none = next((o for o in oneshot if o["ratio"] == r["ratio"] and _comp(o) == "none"), None)
            row = {"budget": f"{r['ratio']:.0%}", "compensation": _comp(r), "params_M": r["parameters"] / 1e6}
            for metric, col in PPL_COLUMNS:
                if _ppl(r, metric):
                    row[col] = _ppl(r, metric)
                    if none is not None and _ppl(none, metric):
                        row[f"{col} vs none"] = f"{_ppl(r, metric) / _ppl(none, metric):.2f}x"
            rows.append(row)
        if dense:
            rows.insert(0, {"budget": "0%", "compensation": "dense", "params_M": dense["parameters"] / 1e6,
                            **{col: _ppl(dense, m) for m, col in PPL_COLUMNS if _ppl(dense, m)}})
        parts.append(md_table(rows, list(dict.fromkeys(k for row in rows for k in row)), fmt="{:.1f}") + "\n")
    grid = [r for r in _runs("grid") if r["mode"] == "iterative" and r["criterion"] == "taylor_gate"
            and not _distill(r)]
    comp = [r for r in grid if _comp(r) != "none"]
    if comp:
        parts.append(
            "Pruning while fine-tuning, equal tokens (the grid's command and budget, "
            f"{comp[0].get('tokens_trained'):,} training tokens), with and without the refit at every mask update "
            "(`--compensation lstsq`, statistics from the last 8 micro-batches before each update). The \"(grid)\" "
            "rows are the grid's own runs; under each, where it exists, its rerun with the same command on another "
            "machine (`bench/rerun.py`), as the measure of run-to-run spread.\n")
        rows = []
        rerun = {r["run"]: r for r in _runs("grid_rerun")}
        for r in sorted(grid, key=lambda r: (r["ratio"], _comp(r) != "none", _comp(r))):
            rows.append({"budget": f"{r['ratio']:.0%}", "run": _method(r) + " (grid)",
                         **{col: _ppl(r, m) for m, col in PPL_COLUMNS if _ppl(r, m)}})
            if r["run"] in rerun:
                x = rerun[r["run"]]
                rows.append({"budget": f"{x['ratio']:.0%}", "run": _method(x) + " (rerun)",
                             **{col: _ppl(x, m) for m, col in PPL_COLUMNS if _ppl(x, m)}})
        parts.append(md_table(rows, ["budget", "run", *[c for _, c in PPL_COLUMNS]], fmt="{:.1f}") + "\n")
        lines = []
        for r in comp:
            base = [b for b in grid if b["ratio"] == r["ratio"] and _comp(b) == "none"]
            base += [x for x in rerun.values() if x["mode"] == "iterative" and x["ratio"] == r["ratio"]
                     and x["criterion"] == "taylor_gate" and not _distill(x) and _comp(x) == "none"]
            if not base:
                continue
            cells, again = [], rerun.get(r["run"])
            for m, col in PPL_COLUMNS:
                values = [_ppl(b, m) for b in base if _ppl(b, m)]
                if values and _ppl(r, m):
                    cell = f"{col} {100 * (_ppl(r, m) / min(values) - 1):+.1f}%"
                    if again is not None and _ppl(again, m):
                        cell += f" (rerun {100 * (_ppl(again, m) / min(values) - 1):+.1f}%)"
                    cells.append(cell + f" vs the best `none` run ({min(values):.1f})")
            lines.append(f"At {r['ratio']:.0%}, `{_comp(r)}`: " + ", ".join(cells) + ".")
        parts.append(" ".join(lines) + " The recovery curves of these runs are in the grid's curve plot (dash-dot: "
                     "with the refit).\n")
        parts.append(
            "Reading: the refit removes most of the damage of a cut when nothing trains afterwards (one-shot table), "
            "but fine-tuning recovers much of the same damage by itself. At 20%, pruning while fine-tuning with the "
            "refit ends where it ends without it (within a few percent either way, one run each), so the demo and "
            "the default keep `compensation=\"none\"`. At 50%, where each update removes far more, the refitted "
            "run stays about a fifth lower in perplexity on all three sets after the same tokens: use "
            "`compensation=\"lstsq\"` for large budgets (one run per cell: a second seed at 50% would firm this up). "
            "The rerun of the plain 20% command on this session's machine reproduced the earlier session's run to "
            "every printed digit; the seed table below measures how far a run moves when the seed changes.\n")
    cost = load("overhead_compensation.json")
    if cost and cost.get("rows"):
        s = cost["settings"]
        busy = " **Busy machine: timings marked busy.**" if cost.get("busy") else ""
        parts.append(
            f"Cost (`python bench/overhead.py --threads 1 --variants {' '.join(s['variants'])} --steps {s['steps']} "
            f"--prune_freq {s['prune_freq']}`; {s['batch']} x {s['seq']} tokens per step; every step inside a "
            "statistics window, the worst case; load at start/end "
            f"{_load(cost.get('load_average_at_start'))} / {_load(cost.get('load_average_at_end'))}).{busy} "
            "`pruning_s_mean` averages the callback's time over all steps, mask updates and refits included:\n")
        parts.append(md_table(cost["rows"], [c for c in ("variant", "step_s", "peak_rss_mib", "step_time_ratio",
                                                          "peak_memory_ratio", "pruning_s_per_step", "pruning_s_mean")
                                             if any(c in r for r in cost["rows"])], fmt="{:.3f}") + "\n")


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
                 "`taylor_gate`'s cost sits in the backward pass instead (`gate_probe`: the gate is an identity in "
                 "the forward, one product and a sum per gated layer in the backward), so only the step-time ratio "
                 "shows it. `+kd` adds a teacher forward without gradient. Step time per round:\n")
    round_rows = [{"variant": v, **{f"round {i + 1}": r["median_step_s"] for i, r in enumerate(rs)}}
                  for v, rs in o.get("runs", {}).items()]
    if round_rows:
        parts.append(md_table(round_rows, list(round_rows[0]), fmt="{:.3f}") + "\n")
    prof = load("overhead_profile_cpu.json")
    if prof and prof.get("profile_diff"):
        first = prof["settings"]["variants"][0]
        parts.append(f"Where the time goes (`python bench/overhead.py --threads 1 --variants "
                     f"{' '.join(prof['settings']['variants'])} --rounds {prof['settings']['rounds']} --steps "
                     f"{prof['settings']['steps']} --warmup {prof['settings']['warmup']} --profile`; torch.profiler "
                     f"self CPU time per step, each variant minus `{first}`, the largest differences; the profiler "
                     "slows every op, and single large ops such as `aten::mm` move by tens of ms between runs, so "
                     "only ops that exist in one variant alone are attributable):\n")
        rows = []
        for variant, diffs in prof["profile_diff"].items():
            rows += [{"variant": variant, "op": op, "ms_per_step": ms} for op, ms in list(diffs.items())[:10]]
        parts.append(md_table(rows, ["variant", "op", "ms_per_step"], fmt="{:+.1f}") + "\n")


def section_scale(parts):
    parts.append("## Cost at Llama-3-8B layer shapes (paper Table 4)\n")
    found = [(name, load(name)) for name in ("scale_cpu.json", "scale_cpu_int8.json", "scale_cpu_nf4.json",
                                             "scale_cuda.json", "scale_cuda_nf4.json")]
    found = [(n, d) for n, d in found if d and "rows" in d]
    if not found:
        parts.append("_Not run yet (`python bench/scale.py --threads 1`)._\n")
        return
    parts.append("A random-initialised Llama with the 8B model's layer shapes (hidden 4096, MLP 14336, 32 query "
                 "heads over 8 KV heads, head dim 128) and a few decoder layers; SmolLM2's 49,152-token vocabulary "
                 "(the 8B model has 128,256), tied embeddings. Each variant is timed in its own process at equal "
                 "batch and steps (`bench/overhead.py`); step time and peak memory are fitted as "
                 "`fixed + per_layer x layers` through the measured layer counts, and the 32-layer columns "
                 "extrapolate that line. `per_layer` holds what grows with depth (projections, LoRA, activations, "
                 "each criterion's per-layer work); `fixed` the embeddings, head, loss and process. Ratios "
                 "`step_x_first_Nl` are measured against plain LoRA SFT (`sft`) at N layers in the same run; "
                 "`step_x_first_32l` comes from the fitted lines. The fit takes differences of step times that "
                 "move by a few percent between rounds, so a variant whose real per-layer cost equals `sft`'s can "
                 "land several percent away at 32 layers: read the measured columns first, and the op profile "
                 "below for what a criterion really adds per layer.\n")
    for name, d in found:
        measured = [f"step_x_first_{n}l" for n in d["runs"]]
        cols = ["variant", *measured, "step_s_fixed", "step_s_per_layer", "step_s_32_layers", "step_x_first_32l",
                "mem_mib_fixed", "mem_mib_per_layer", "mem_mib_32_layers", "mem_x_first_32l"]
        st = d["settings"]
        busy = " **Busy machine: timings marked busy.**" if d.get("busy") else ""
        loads = [r.get("load_average_at_start") for r in d.get("runs", {}).values()]
        parts.append(f"`{d.get('command', 'python bench/scale.py')}`: {st['dtype']}"
                     f"{', ' + st['quant'] + ' base' if st.get('quant', 'none') != 'none' else ''}, layers "
                     f"{st['layers']}, batch {st['batch']} x {st['seq']} tokens, {st['steps']} measured steps, "
                     f"{st.get('threads') or 'default'} torch thread(s); load at start of each layer count "
                     f"{', '.join(_load(x) for x in loads)}; {d['wall_s'] / 60:.0f} min.{busy}\n")
        parts.append(md_table(d["rows"], [c for c in cols if any(c in r for r in d["rows"])]) + "\n")
        t4 = d.get("table4")
        if t4:
            parts.append(f"`lora` against `vanilla` at 32 layers: {t4['memory_saving_%']:.1f}% less peak memory and "
                         f"{t4['speedup_%']:.1f}% faster steps; the paper's Table 4 (LLaMA-7B, GPU): "
                         f"{t4['paper']['memory_saving_%']}% and {t4['paper']['speedup_%']}%.\n")
    prof = load("scale_cpu_profile.json")
    if prof and prof.get("runs"):
        rows = []
        for layers, run in sorted(prof["runs"].items(), key=lambda kv: int(kv[0])):
            for variant, diffs in (run.get("profile_diff") or {}).items():
                own = [r.get("profile_own_functions_total_ms_per_step", {}) for r in run["runs"][variant]]
                # The backward's engine entry includes the function's own entry: count the outer one only.
                totals = [o.get("_GateProbe", 0.0) + o.get("autograd::engine::evaluate_function: _GateProbeBackward",
                                                            o.get("_GateProbeBackward", 0.0)) for o in own]
                rows.append({"layers": int(layers), "variant": variant,
                             "gate_probe_ms": sum(totals) / max(len(totals), 1),
                             "top_ops": ", ".join(f"{op} {ms:+.0f}" for op, ms in list(diffs.items())[:4])})
        if rows:
            parts.append(f"Op profile at these shapes (`{prof.get('command', 'python bench/scale.py --profile')}`): "
                         "self CPU ms per step that a variant adds to `sft` (profiled runs, so slower than the "
                         "table's; `gate_probe_ms` is the gate's autograd functions with "
                         "the ops they call, the rest are the largest differences of shared ops, whose times move "
                         "between runs):\n")
            parts.append(md_table(rows, ["layers", "variant", "gate_probe_ms", "top_ops"], fmt="{:.1f}") + "\n")
            by_layers = {r["layers"]: r["gate_probe_ms"] for r in rows if r["variant"] == "taylor_gate"}
            if len(by_layers) >= 2:
                lo, hi = min(by_layers), max(by_layers)
                per_layer = (by_layers[hi] - by_layers[lo]) / (hi - lo)
                f32 = load("scale_cpu.json") or {}
                sft_layer = next((r["step_s_per_layer"] for r in f32.get("rows", []) if r["variant"] == "sft"), None)
                if sft_layer:
                    parts.append(f"The gate probes cost about {per_layer:.1f} ms per layer per step here, "
                                 f"{100 * per_layer / 1000 / sft_layer:.2f}% of plain LoRA's fitted {sft_layer:.2f} s "
                                 "per layer above, and their share stays there at 32 layers: `taylor_gate`'s fitted "
                                 "32-layer step ratio above is the fit's noise, not its cost.\n")


def section_widths(parts):
    parts.append("## Aligned widths (`width_multiple`)\n")
    mlp, demo = load("width_speed.json"), load("width_multiple.speed.json")
    if not mlp and not demo:
        parts.append("_Not run yet (`python bench/width_speed.py --threads 1`)._\n")
        return
    if mlp:
        parts.append(f"One MLP's up + down projection on `[{mlp['settings']['tokens']}, {mlp['settings']['hidden']}]` "
                     f"inputs at each kept width (`{mlp['command']}`, median of {mlp['settings']['repeats']}); "
                     f"{_quiet_line(mlp)} `per_channel_vs_full` = time per channel against the full "
                     f"{mlp['settings']['full']}-channel MLP (above 1: the width runs slower than its FLOPs say).\n")
        parts.append(md_table(mlp["rows"], ["width", "multiple_of", "ms", "ms_min", "ms_max", "time_vs_full",
                                            "ideal_vs_full", "per_channel_vs_full"], fmt="{:.3f}") + "\n")
    if demo:
        kept = {}
        for name, rep in (demo.get("pruned_reports") or {}).items():
            widths = {layer.get("mlp_channels_kept") for layer in (rep.get("layers") or [])
                      if isinstance(layer, dict)} - {None}
            if widths:
                kept[name] = "/".join(str(w) for w in sorted(widths))
        parts.append(f"The demo's export at the default `width_multiple` 8 (`demo`) and with 1 (`width1`, exact "
                     f"counts), both from `bench/recipe.py` (`recipe/demo-seed-0`, `recipe/width1-seed-0`), against "
                     f"dense in one run (`{demo['command']}`); {_quiet_line(demo)}\n")
        rows = [r for r in demo["rows"] if r["model"] != "dense"]
        for r in rows:
            r["gap_to_ideal_%"] = 100 * (r["measured_speedup"] / r["ideal_speedup"] - 1)
            r["mlp_kept"] = kept.get(r["model"])
        parts.append(md_table(rows, [c for c in ("kind", "model", "mlp_kept", "batch", "seq", "params_M",
                                                  "measured_speedup", "ideal_speedup", "gap_to_ideal_%")
                                     if c != "mlp_kept" or kept]) + "\n")


def section_speed(parts):
    sp = load("inference_speed.json")
    parts.append("## Inference speed of the exported models (paper Table 3)\n")
    if not sp:
        parts.append("_Not run yet (`python bench/inference_speed.py`)._\n")
        return
    s = sp["settings"]
    parts.append(
        f"Command: `{sp['command']}`; wall time {sp['wall_s'] / 60:.1f} min.  \nMachine: {machine_line(sp['machine'])}."
        f"  \n{_quiet_line(sp)}\n")
    parts.append(
        f"Median of {s['repeats']} interleaved repeats. Forward: one `[batch, seq]` prefill without KV cache. "
        f"Generate: greedy, prompt {s['prompt_len']}, {s['new_tokens']} new tokens. `time_vs_dense_%` > 0 means "
        "slower than dense. `ideal_speedup` = dense FLOPs / model FLOPs. `pruned-r+lora`: the same compact model "
        "with its rank-8 adapter left unmerged; `lora_penalty_%` is its extra time over the merged model. The pruned "
        "models here are cut at ratio r of attention KV groups and MLP channels per layer (one-shot `magnitude`: "
        "speed depends on how many units go, not which).\n")
    cols = ["kind", "model", "batch", "seq", "params_M", "latency_ms", "tokens_per_s", "time_vs_dense_%",
            "measured_speedup", "ideal_speedup", "lora_penalty_%"]
    parts.append(md_table(sp["rows"], [c for c in cols + ["busy"] if any(c in r for r in sp["rows"])]) + "\n")
    for r in sp["rows"]:
        if r["model"] != "dense" and not r["model"].endswith("+lora"):
            parts.append(f"- {r['kind']} b{r['batch']} s{r['seq']}, {r['model']}: {r['measured_speedup']:.2f}x "
                         f"measured vs {r['ideal_speedup']:.2f}x ideal (FLOPs)")
    parts.append("")
    parts.append("![inference speed](../bench/results/inference_speed.png)\n")


def _recipe_runs_section(parts, name: str):
    """The table of a ``bench/recipe.py`` folder (``<name>.json``): one row per run, dense first; returns the
    summary or None."""
    data = load(name + ".json")
    if not data:
        return None
    dense = data.get("dense")
    rows = data["rows"]
    dense_row = {"setting": "dense"}
    if dense:
        dense_row.update({k.split("/")[0]: v["perplexity"] for k, v in dense["eval"].items()})
        zs = dense.get("zeroshot") or {}
        dense_row.update(paper_mean=zs.get("paper_mean"),
                         boolq=((zs.get("tasks") or {}).get("boolq") or {}).get("acc"))
    return data, dense_row, rows


def _fmt_load(v):
    return "?" if v is None else f"{v:.1f}"


def _pct(v):
    return None if v is None else 100 * v


def section_depth(parts):
    parts.append("## Depth as well as width: whole decoder layers under one 20% budget\n")
    got = _recipe_runs_section(parts, "depth")
    if got is None:
        parts.append("_Not run yet (`python bench/recipe.py --out bench/results/depth --settings demo depth2 depth4 "
                     "depth6 bi6 last6`)._\n")
        return
    data, dense_row, rows = got
    runs = data["runs"]
    parts.append(
        "Every run is the demo config (`configs/smollm2_demo.yaml`: 20% of decoder parameters, `taylor_gate`, 160 "
        "steps of 4 x 128 C4 tokens = 81,920 training tokens, LoRA r 8, lr 3e-4 and exact MLP widths: these runs "
        "predate `width_multiple`'s default of 8 and the demo's move to lr 1e-3) with depth flags added: `demo` cuts MLP "
        "channels only; `depthK` removes K of the 30 decoder layers (`layer_pruning_ratio`, layer gates along the "
        "cubic schedule) and MLP channels of the kept layers make up the rest of the budget (none for K = 6); "
        "`bi6` / `last6` remove 6 layers chosen one-shot by block influence (ShortGPT) / as the layers before the "
        "final one, at the first mask update (step 16), then the same fine-tune. Perplexity on the first 256 "
        "`llm-pruner` windows of WikiText-2 / PTB / C4 (validation, first 256 documents); zero-shot: first 500 "
        "items of each task, paper mean over PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA (BoolQ outside). "
        "One seed each: the demo's own spread over seeds is several percent (see the spread section).\n")
    cols = ["setting", "layers", "removed_layers", "mlp_channels", "decoder_params_ratio", "wikitext2", "ptb", "c4", "paper_mean",
            "boolq", "gen_b1_speedup", "gen_b16_speedup", "fwd_b1_speedup", "fwd_b16_speedup"]
    table_rows = [dense_row] + rows
    for r in table_rows:
        r["paper_mean_%"] = _pct(r.get("paper_mean"))
        r["boolq_%"] = _pct(r.get("boolq"))
    cols = [c if c not in ("paper_mean", "boolq") else c + "_%" for c in cols]
    parts.append(md_table(table_rows, cols) + "\n")
    parts.append("Speed-ups are the exported models against dense in one run (`bench/inference_speed.py --saved`, "
                 "quiet machine, 1 thread): greedy generation of 32 new tokens after a 32-token prompt at batch 1 "
                 "and 16, forward of 1 x 128 and 16 x 512 tokens (`fwd_b1` / `fwd_b16`). Training wall times are in the "
                 "run JSONs but not published: the runs used both cores (load about 2) and some overlapped other "
                 "jobs. `removed_layers` are the original indices (0-29).\n")
    speed = load("depth.speed.json")
    if speed:
        parts.append(f"Speed command: `{speed['command']}`; {_quiet_line(speed)}\n")
    parts.append("Commands (one JSON per run in `bench/results/depth/`; all of them: `python bench/recipe.py --out "
                 "bench/results/depth --settings demo depth6 depth4 depth2 bi6 last6 --seeds 0 --save-models "
                 ".bench_models/depth`):\n")
    parts.extend(f"- `{r['setting']}`: `{r['command']}`" for r in runs)
    parts.append("")
    if os.path.exists(os.path.join(common.RESULTS_DIR, "depth.speed.png")):
        parts.append("![perplexity vs batch-1 generation speed-up](../bench/results/depth.speed.png)\n")
    if os.path.exists(os.path.join(common.RESULTS_DIR, "depth.curve.png")):
        parts.append("![recovery curves](../bench/results/depth.curve.png)\n")


def _hellaswag(zs: dict | None) -> dict | None:
    return ((zs or {}).get("tasks") or {}).get("hellaswag")


def _recipe_full_hellaswag(runs: list[dict], dense: dict | None = None) -> str | None:
    """A line per recipe run scored on all of HellaSwag (``quality_zeroshot.py --limit 0 --tasks hellaswag``),
    against the dense model's own full pass (the grid's dense run: the same base model) and against the first
    500 items, which is what the table's paper mean uses."""
    scored = [r for r in runs if _hellaswag(r.get("zeroshot_full"))]
    if not scored:
        return None
    dense = dense or next((r for r in _runs("grid") if r["mode"] == "dense"), None)
    dense_full, dense_500 = _hellaswag((dense or {}).get("zeroshot_full")), _hellaswag((dense or {}).get("zeroshot"))
    cells = []
    for run in scored:
        full, first = _hellaswag(run["zeroshot_full"]), _hellaswag(run.get("zeroshot"))
        cell = (f"`{run['run']}` {100 * full['acc_norm']:.1f} (± {100 * full['acc_norm_stderr']:.1f}; acc "
                f"{100 * full['acc']:.1f})")
        if dense_full:
            cell += f", {100 * (full['acc_norm'] - dense_full['acc_norm']):+.1f} points from dense"
        if first and dense_500:
            cell += (f" (on the first 500 items: {100 * first['acc_norm']:.1f}, "
                     f"{100 * (first['acc_norm'] - dense_500['acc_norm']):+.1f} from dense)")
        cell += f"; command `{run['zeroshot_full']['command']}`"
        cells.append(cell)
    reference = (f"dense SmolLM2 {100 * dense_full['acc_norm']:.1f} (± {100 * dense_full['acc_norm_stderr']:.1f}; "
                 f"acc {100 * dense_full['acc']:.1f}; `grid/dense.json`)" if dense_full else "dense: not scored")
    n = _hellaswag(scored[0]["zeroshot_full"]).get("num_samples")
    items = f"{n:,} items" if n else "every item"
    return f"**HellaSwag on the full set** ({items}; acc_norm in %; {reference}): " + "; ".join(cells) + "."


def section_recipe(parts):
    parts.append("## Recipe study at the demo's budget\n")
    got = _recipe_runs_section(parts, "recipe")
    if got is None:
        parts.append("_Not run yet (`python bench/recipe.py --settings demo r32 lr1e-3 ...`)._\n")
        return
    data, dense_row, rows = got
    parts.append(
        "The study's base with one knob changed (`bench/recipe.py`, settings named in its `SETTINGS`; the base, "
        "`bench/recipe_base.yaml`, is the demo config as it was before the study: LoRA r 8 / alpha 16, lr 3e-4 "
        "linear, `prune_freq` 5, EMA 0.9, cooldown 0.2; setting `demo`), 81,920 training tokens each unless the "
        "`tokens` column says otherwise; perplexity on the first 256 `llm-pruner` windows of WikiText-2 / PTB / C4. "
        "Training rows are each C4 document's first 128 tokens, except in `packed` runs: consecutive 128-token "
        "chunks of the concatenated documents (TRL's `wrapped` packing), so that 500k tokens are one pass over "
        "distinct text (the sample holds 722k tokens packed, 163k as first-128-token openings). Zero-shot, where "
        "scored: first 500 items of each task, `paper_mean` over PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA "
        "(BoolQ beside it). A "
        "setting is called better than `demo` only when its range over seeds does not overlap demo's "
        "(`verdict_vs_demo`); with one seed the verdict says so. `threads` is torch's thread count (1-thread "
        "and 2-thread runs reduce floats in different orders, one source of the run-to-run spread).\n")
    threads = {run["run"]: (run.get("machine") or {}).get("torch_threads") for run in data["runs"]}
    for r in rows:
        r["threads"] = threads.get(f"{r['setting']}-seed-{r['seed']}")
        r["load_start/end"] = f"{_fmt_load(r.get('load'))} / {_fmt_load(r.get('load_end'))}"
    zeroshot_cols = []
    if any(r.get("paper_mean") is not None for r in [dense_row] + rows):
        for r in [dense_row] + rows:
            r["paper_mean_%"], r["boolq_%"] = _pct(r.get("paper_mean")), _pct(r.get("boolq"))
        zeroshot_cols = ["paper_mean_%", "boolq_%"]
    parts.append(md_table([dense_row] + rows, ["setting", "knob", "seed", "wikitext2", "ptb", "c4",
                                              "wikitext2_x_dense", *zeroshot_cols, "tokens", "load_start/end",
                                              "threads"]) + "\n")
    parts.append("Training times are in the run JSONs but not published: every run used both cores (load about 2), "
                 "and a time counts here only from a run alone at 1 thread.\n")
    full_hellaswag = _recipe_full_hellaswag(data["runs"])
    if full_hellaswag:
        parts.append(full_hellaswag + "\n")
    parts.append("Per setting, mean (min-max) over seeds:\n")
    spread_rows = []
    for g in data["spread"]:
        row = {"setting": g["setting"], "knob": next((r.get("knob") for r in rows if r["setting"] == g["setting"]), ""),
               "seeds": g["seeds"], "verdict_vs_demo": g.get("verdict_vs_demo")}
        for key in ("wikitext2", "ptb", "c4", "wikitext2_x_dense", "train_min"):
            if g.get(f"{key}_mean") is not None:
                fmt = "{:.2f}" if key != "train_min" else "{:.1f}"
                row[key] = (fmt.format(g[f"{key}_mean"]) if g["seeds"] == 1 else
                            f"{fmt.format(g[f'{key}_mean'])} ({fmt.format(g[f'{key}_min'])}-{fmt.format(g[f'{key}_max'])})")
        spread_rows.append(row)
    parts.append(md_table(spread_rows, ["setting", "knob", "seeds", "wikitext2", "ptb", "c4", "wikitext2_x_dense",
                                        "verdict_vs_demo"]) + "\n")
    parts.append("The demo config (`configs/smollm2_demo.yaml`) is the setting `lr1e-3+packed` since it held "
                 "below both the base and `lr1e-3` on every set over three seeds; the other knobs stay as the "
                 "base has them (`tests/test_bench_recipe.py` keeps the two files in step).\n")
    parts.append("Commands (one JSON per run in `bench/results/recipe/`):\n")
    parts.extend(f"- `{r['run']}`: `{r['command']}`" for r in data["runs"])
    parts.append("")
    if os.path.exists(os.path.join(common.RESULTS_DIR, "recipe.curve.png")):
        parts.append("![recipe curves](../bench/results/recipe.curve.png)\n")
    if os.path.exists(os.path.join(common.RESULTS_DIR, "recipe.tokens.png")):
        parts.append("What tokens buy: the recovery curve of each token-budget run against training tokens, beside "
                     "the same recipe at the study's budget (dashed):\n")
        parts.append("![what tokens buy](../bench/results/recipe.tokens.png)\n")


def main():
    parts = ["# Results: LoRAPrune vs baselines on SmolLM2-135M\n",
             "Generated by `python bench/make_results_md.py` from `bench/results/*.json`; do not edit by hand. "
             "All runs are small CPU settings (2 cores) unless the machine line says otherwise: they check that the "
             "pipeline works end to end and show trends on a 135M model, not the paper's LLaMA-7B numbers. Each "
             "script has flags to scale up on a GPU (see its `--help`). Every table names the command that made it "
             "and the machine's load while it ran.\n"]
    section_grid(parts)
    section_depth(parts)
    section_recipe(parts)
    section_compensation(parts)
    section_spread(parts)
    section_zeroshot(parts)
    section_speed(parts)
    section_widths(parts)
    section_cost(parts)
    section_overhead(parts)
    section_scale(parts)
    section_criteria_check(parts)
    section_recovery(parts)
    section_mask_agreement(parts)
    section_quality(parts)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(parts))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
