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

Optional measurements (all off by default, so the default run records what it always did):

* ``--eval-sets ... c4``: C4 validation perplexity: the first ``--c4-docs`` documents of
  ``c4/c4_validation_sample.jsonl`` joined with ``"\n\n"``, tokenized once and cut into the same
  windows as the other sets (``llm-pruner`` / ``full-context``). This is *not* the SparseGPT/Wanda
  C4 protocol (256 random 2048-token segments of separate documents); the record says so.
* ``--zeroshot-tasks``: zero-shot accuracy of the final model (lm-eval through
  ``loraprune_trainer.evaluation.zero_shot``), read offline from ``$LORAPRUNE_ZEROSHOT_DIR`` or
  ``<data dir>/zeroshot``, the first ``--zeroshot-limit`` items per task; stored under ``"zeroshot"``.
* ``--curve-every K``: a recovery curve for iterative runs: the masked model's perplexity on the first
  ``--curve-windows`` ``llm-pruner`` windows of WikiText-2 at step 0, every K optimizer steps and at the
  end, stored under ``"curve"`` and drawn by ``report()`` into ``<out>.curve.png``.

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
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from loraprune_trainer.data import portable_path  # noqa: E402

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
EVALS = [("wikitext2", "wikitext-2-raw/wiki.test.raw"), ("ptb", "ptb/ptb.valid.txt"),
         ("c4", "c4/c4_validation_sample.jsonl")]
DEFAULT_EVAL_SETS = ["wikitext2", "ptb"]  # c4 is opt-in: the series started before it existed stay comparable
PROTOCOLS = ["llm-pruner", "full-context"]
# The offline commonsense suite (loraprune_trainer.evaluation.ZEROSHOT_TASKS), spelled out so that --help
# does not import torch; test_bench_quality checks that the two lists agree.
ZEROSHOT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
ZEROSHOT_DIR_ENV = "LORAPRUNE_ZEROSHOT_DIR"
C4_PROTOCOL_NOTE = ("C4 validation perplexity over the first `num_docs` documents of the file, their \"text\" "
                    "joined with \\n\\n and tokenized once, then cut into the protocol's non-overlapping "
                    "windows across document boundaries (the llm-pruner windows, as for WikiText-2/PTB). Not the "
                    "SparseGPT/Wanda C4 protocol (256 random 2048-token segments, one per document).")

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
                   help="param_pruning_ratio (share of decoder parameters) for every run; --ratios then only names "
                        "the runs. One-shot runs prune the same per-layer counts as the trainer would.")
    p.add_argument("--attention-unit", default="kv_group", choices=["kv_group", "query_head"])
    p.add_argument("--width-multiple", type=int, default=8,
                   help="width_multiple (kept MLP channels rounded down to a multiple of it) for every run; 1 keeps "
                        "exact counts (what runs before it became the library's default of 8 used).")
    p.add_argument("--distill-alpha", type=float, default=0.0)
    p.add_argument("--distill-temperature", type=float, default=1.0)
    p.add_argument("--distill-teacher", default="base", choices=["base", "dense"])
    p.add_argument("--compensation", default="none", choices=["none", "bias", "lstsq"],
                   help="Refit what the removed units fed, at every mask update (iterative) or after the cut "
                        "(one-shot, statistics from the calibration documents); see LoRAPruneConfig.compensation.")
    p.add_argument("--compensation-lambda", type=float, default=0.1)
    p.add_argument("--compensation-batches", type=int, default=8)
    p.add_argument("--tag", default="", help="Suffix of every run id (to keep series apart in one folder).")
    p.add_argument("--criteria", nargs="+", default=["lora", "vanilla", "magnitude", "wanda", "random"],
                   choices=CRITERIA)
    p.add_argument("--train-file", default="c4/c4_demo.jsonl",
                   help="JSONL of {\"text\"} documents under the data folder; training uses documents 0..199 of "
                        "c4_demo.jsonl (200.. calibrate) or every document of any other file.")
    p.add_argument("--protocols", nargs="+", default=PROTOCOLS, choices=PROTOCOLS)
    p.add_argument("--modes", nargs="+", default=["iterative", "oneshot"], choices=["iterative", "oneshot"])
    p.add_argument("--steps", type=int, default=4, help="Optimizer steps of every fine-tune (both modes; 0 with "
                                                        "--modes oneshot: cut and evaluate, no fine-tune).")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64, help="Tokens per training sample (truncated).")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--prune-freq", type=int, default=1)
    p.add_argument("--calib-samples", type=int, default=4, help="C4 documents for one-shot scoring.")
    p.add_argument("--windows", type=int, default=4, help="llm-pruner windows per dataset (0 = all).")
    p.add_argument("--full-windows", type=int, default=1, help="full-context windows per dataset (0 = all).")
    p.add_argument("--full-context-on", nargs="+", default=["wikitext2"], choices=[n for n, _ in EVALS],
                   help="Datasets evaluated under full-context (2048-token windows cost the most on a CPU).")
    p.add_argument("--eval-sets", nargs="+", default=DEFAULT_EVAL_SETS, choices=[n for n, _ in EVALS],
                   help="Perplexity datasets: wikitext2 (test), ptb (validation), c4 (validation sample).")
    p.add_argument("--c4-docs", type=int, default=256,
                   help="First N documents of c4/c4_validation_sample.jsonl for C4 perplexity (0 = all 2,000).")
    p.add_argument("--zeroshot-tasks", nargs="+", default=[], choices=ZEROSHOT_TASKS, metavar="TASK",
                   help=f"Zero-shot accuracy of every run's final model on these tasks ({', '.join(ZEROSHOT_TASKS)}), "
                        f"read offline from ${ZEROSHOT_DIR_ENV} or <data dir>/zeroshot. Default: none.")
    p.add_argument("--zeroshot-limit", type=int, default=100,
                   help="First N items of each zero-shot task (0 = the full sets; recorded with the result).")
    p.add_argument("--curve-every", type=int, default=0,
                   help="Iterative runs: perplexity of the masked model every K optimizer steps (and at step 0 and "
                        "the end) on --curve-windows WikiText-2 windows (0 = no curve).")
    p.add_argument("--curve-windows", type=int, default=16, help="llm-pruner windows of WikiText-2 for the curve.")
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "quality"))
    p.add_argument("--save-models", default=None, metavar="DIR",
                   help="Also save every final pruned model (merged, compact) to DIR/<run> with save_pretrained, "
                        "e.g. for bench/quality_zeroshot.py to evaluate later. Default: not saved.")
    p.add_argument("--report-only", action="store_true", help="Only rebuild table/JSON/PNG from finished runs.")
    args = p.parse_args(argv)
    for flag in ("c4_docs", "zeroshot_limit", "curve_every"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}.")
    if args.curve_windows < 1:
        p.error(f"--curve-windows must be >= 1, got {args.curve_windows}.")
    if args.steps < 0 or (args.steps == 0 and "iterative" in args.modes):
        p.error(f"--steps must be >= 1 (0 only with --modes oneshot: cut without fine-tuning), got {args.steps}.")
    return args


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


def load_eval_texts(args) -> dict:
    """``{name: (text, metadata)}`` of every ``--eval-sets`` dataset, read before any model is loaded so a
    missing file fails in a second."""
    from loraprune_trainer.evaluation import load_text

    texts = {}
    for name, rel in EVALS:
        if name not in args.eval_sets:
            continue
        texts[name] = load_c4_validation(args.c4_docs) if name == "c4" else load_text(common.data_file(rel))
    return texts


def load_c4_validation(num_docs: int) -> tuple[str, dict]:
    """The first ``num_docs`` (0 = all) documents of ``c4/c4_validation_sample.jsonl`` joined with ``"\\n\\n"``,
    and their metadata in the form :func:`loraprune_trainer.evaluation.load_text` gives (``load_text`` would read
    and join the whole file; the limit keeps a CPU run's tokenization short)."""
    import hashlib
    import json

    rel = dict(EVALS)["c4"]
    path = common.data_file(rel)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"C4 validation file {path} not found (--eval-sets c4): it should be {rel} under the "
                                "data folder ($LORAPRUNE_DATA_DIR).")
    with open(path, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    used = docs if num_docs == 0 else docs[:num_docs]
    text = "\n\n".join(used)
    newlines = "as stored"
    if "\r" in text:  # as load_text does: CRLF would add tokens the other copies do not have
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        newlines = "CRLF/CR normalised to LF"
    with open(path, "rb") as f:
        file_sha = hashlib.sha256(f.read()).hexdigest()
    meta = {"source": "c4", "path": portable_path(path), "split": "validation",
            "join": f"first {len(used)} records' \"text\" joined with \\n\\n", "newlines": newlines,
            "sha256": file_sha, "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "num_chars": len(text), "num_docs": len(used), "num_docs_in_file": len(docs), "c4_docs": num_docs,
            "note": C4_PROTOCOL_NOTE}
    return text, meta


# -- zero-shot ----------------------------------------------------------------------------------------------
def zeroshot_folder(args) -> str | None:
    """The zero-shot folder (``$LORAPRUNE_ZEROSHOT_DIR``, else ``<data dir>/zeroshot``) with every requested task's
    files checked, or None when no task is requested. Called before the model is loaded."""
    if not args.zeroshot_tasks:
        return None
    from loraprune_trainer.evaluation import local_task_configs, resolve_zeroshot_dir

    folder, source = resolve_zeroshot_dir(None)
    if folder is None:
        folder, source = os.path.join(common.data_dir(), "zeroshot"), "data folder"
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Zero-shot folder {folder!r} (from the {source}) does not exist: --zeroshot-tasks reads the tasks' "
            f"upstream files from ${ZEROSHOT_DIR_ENV}, or else from <data dir>/zeroshot ($LORAPRUNE_DATA_DIR). "
            "Set one of them, or drop --zeroshot-tasks.")
    local_task_configs(args.zeroshot_tasks, folder)  # every file present and parseable, or a clear error now
    return folder


def evaluate_zeroshot(model, tok, args, folder) -> dict:
    """Zero-shot accuracy of ``model`` on ``--zeroshot-tasks`` with the suite's mean accuracies.

    Per task the lm-eval numbers as :func:`loraprune_trainer.evaluation.zero_shot` returns them (``acc``,
    ``acc_stderr`` and, where the task defines it, ``acc_norm``, ``acc_norm_stderr``; sample stderr of the mean
    as lm-eval reports it) with their protocol. ``mean_acc``: mean ``acc`` over all tasks; ``mean_acc_norm``:
    mean ``acc_norm`` over the tasks that report it (``mean_acc_norm_tasks``); ``mean_acc_norm_or_acc``: per
    task ``acc_norm`` where reported, else ``acc`` (the mix LLM-Pruner-style tables average).
    """
    from loraprune_trainer.evaluation import zero_shot

    limit = args.zeroshot_limit or None
    t0 = time.perf_counter()
    # A copy of the tokenizer: lm-eval may set attributes on it (pad token, padding side), and the same
    # tokenizer trains the later runs of the grid.
    result = zero_shot(model, copy.deepcopy(tok), list(args.zeroshot_tasks), batch_size=args.eval_batch, limit=limit,
                       seed=args.seed, zeroshot_dir=folder, cache_dir=getattr(args, "zeroshot_cache", None))
    record = summarize_zeroshot(result["tasks"], limit, result["protocol"])
    record["eval_s"] = time.perf_counter() - t0
    logger.info("  zero-shot (limit %s): paper mean %s; %s", limit, record["paper_mean"],
                ", ".join(f"{n}={t.get('acc', float('nan')):.3f}" for n, t in record["tasks"].items()))
    return record


def summarize_zeroshot(tasks: dict, limit: int | None, protocol: dict) -> dict:
    """A zero-shot record from per-task results: ``paper_mean`` (the headline of the paper's table: PIQA,
    HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA under their paper metrics, BoolQ outside; None unless all six
    were scored) with ``paper_mean_stderr``, and the plain means ``mean_acc`` (``acc`` over every task scored),
    ``mean_acc_norm`` (over ``mean_acc_norm_tasks``) and ``mean_acc_norm_or_acc``."""
    from loraprune_trainer.evaluation import paper_mean

    accs = [t["acc"] for t in tasks.values() if t.get("acc") is not None]
    norm_tasks = [n for n, t in tasks.items() if t.get("acc_norm") is not None]
    mixed = [t["acc_norm"] if t.get("acc_norm") is not None else t.get("acc") for t in tasks.values()]
    mixed = [v for v in mixed if v is not None]

    def mean(values):
        return sum(values) / len(values) if values else None

    table = paper_mean(tasks)
    return {"tasks": tasks, "paper_mean": table["mean"], "paper_mean_stderr": table["stderr"],
            "paper_mean_metrics": table["metrics"], "mean_acc": mean(accs),
            "mean_acc_norm": mean([tasks[n]["acc_norm"] for n in norm_tasks]), "mean_acc_norm_tasks": norm_tasks,
            "mean_acc_norm_or_acc": mean(mixed), "limit": limit, "num_tasks": len(tasks), "protocol": protocol}


def merge_zeroshot(existing: dict, new: dict) -> dict:
    """``existing`` with the tasks of ``new`` (same ``limit``) added or replaced, means recomputed; each pass's
    tasks, command, load and wall time are kept under ``passes``."""
    if existing.get("limit") != new.get("limit"):
        raise ValueError(f"cannot merge zero-shot results with limit {existing.get('limit')} and {new.get('limit')}")
    passes = existing.get("passes") or [{k: existing.get(k) for k in ("command", "load_average_at_start",
                                                                       "load_average_at_end", "wall_s", "eval_s")}
                                        | {"tasks": list(existing["tasks"])}]
    passes.append({k: new.get(k) for k in ("command", "load_average_at_start", "load_average_at_end", "wall_s",
                                           "eval_s")} | {"tasks": list(new["tasks"])})
    merged = summarize_zeroshot({**existing["tasks"], **new["tasks"]}, new.get("limit"), new["protocol"])
    merged.update({k: existing.get(k) for k in ("command", "load_average_at_start", "load_average_at_end", "wall_s",
                                                 "eval_s")})
    merged["passes"] = passes
    return merged


# -- recovery curve -----------------------------------------------------------------------------------------
def curve_text(text: str, meta: dict, tok, windows: int, window: int = 128) -> tuple[str, dict]:
    """A prefix of ``text`` (cut at a line end) whose first ``windows`` ``llm-pruner`` windows are, token for
    token, the first windows of the whole text: ``perplexity()`` tokenizes the text it gets on every call, and
    the whole of WikiText-2 costs about a second per curve point on a CPU, the prefix almost nothing.
    Falls back to the whole text when no prefix matches (e.g. a tokenizer that merges across lines)."""
    need = windows * window
    full = tok(text, verbose=False)["input_ids"]
    if len(full) < need:
        raise ValueError(f"--curve-windows {windows}: WikiText-2 has {len(full)} tokens, fewer than {windows} windows "
                         f"of {window}.")
    cut = min(len(text), max(4096, 8 * need))  # characters; a token is rarely longer than 8
    while True:
        end = text.find("\n", cut)
        prefix = text if end < 0 else text[:end + 1]
        ids = tok(prefix, verbose=False)["input_ids"]
        # One spare window, so the special tokens or merges at the cut cannot reach the scored windows.
        if len(ids) >= need + window and ids[:need] == full[:need]:
            break
        if len(prefix) == len(text):
            prefix = text
            break
        cut = min(len(text), 2 * len(prefix))
    meta = {**meta, "curve_prefix_chars": len(prefix), "curve_prefix_note":
            "the text is a line-boundary prefix of the split whose first windows equal the whole split's first "
            "windows token for token (num_tokens_total / num_windows_available refer to the prefix)"}
    return prefix, meta


def curve_point(model, tok, text, meta, args) -> tuple[float, dict]:
    """Perplexity of ``model`` (masked or plain) on the curve windows, and the protocol record.

    ``perplexity()`` puts every module in eval mode (dropout off: the masked model then computes exactly what
    the cut model computes) under ``torch.no_grad`` and restores each module's train flag afterwards; it draws
    no random numbers, so a run with a curve trains exactly as one without."""
    import torch

    from loraprune_trainer.evaluation import perplexity

    with torch.no_grad():
        r = perplexity(model, tok, text, protocol="llm-pruner", batch_size=args.eval_batch,
                       max_windows=args.curve_windows, show_progress=False, metadata=meta)
    return r["perplexity"], r["protocol"]


def make_curve_callback(trainer, tok, text, meta, args):
    """A ``TrainerCallback`` that records the masked model's curve perplexity at step 0, every ``--curve-every``
    optimizer steps and at the end (``.points``: ``{"step", "tokens_seen", "perplexity", sparsities...}``).

    Added after the trainer's own pruning callback, so at a step's end it sees the masks of that step."""
    from transformers import TrainerCallback

    class PerplexityCurve(TrainerCallback):
        def __init__(self):
            self.points, self.protocol, self.eval_s = [], None, 0.0

        def _record(self, state):
            if self.points and self.points[-1]["step"] == state.global_step:
                return
            t0 = time.perf_counter()
            ppl, self.protocol = curve_point(trainer.model, tok, text, meta, args)
            point = {"step": int(state.global_step), "tokens_seen": int(state.num_input_tokens_seen),
                     "perplexity": ppl}
            metrics = getattr(trainer, "pruning_metrics", None)
            if metrics is not None:  # how much is pruned at this point: the curve's jumps line up with these
                m = metrics()
                point.update(attention_sparsity=m["prune/attention_sparsity"], mlp_sparsity=m["prune/mlp_sparsity"],
                             params_ratio=m["prune/params_ratio"])
            self.points.append(point)
            self.eval_s += time.perf_counter() - t0
            logger.info("  curve: step %d, %d tokens, perplexity %.3f", point["step"], point["tokens_seen"], ppl)

        def on_train_begin(self, args_, state, control, **kwargs):
            self._record(state)

        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step % args.curve_every == 0:
                self._record(state)

        def on_train_end(self, args_, state, control, **kwargs):
            self._record(state)

    return PerplexityCurve()


def save_model(model, tok, path: str) -> None:
    """``save_pretrained`` into a temporary sibling folder, renamed into place when complete, so ``path``
    never holds half a model."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".partial-")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def n_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def run_iterative(base, tok, train_ds, criterion, ratio, args, tmp, curve=None):
    """Prune while LoRA fine-tunes, then cut and merge. ``curve``: ``(text, metadata)`` of the recovery-curve
    windows (``--curve-every``), or None."""
    from loraprune_trainer import LoRAPruneConfig, LoRAPruneTrainer
    from loraprune_trainer.oneshot import compact_model

    cfg = LoRAPruneConfig(**train_kwargs(args, tmp), pruning_ratio=ratio, prune_freq=args.prune_freq,
                          attention_pruning_ratio=args.attention_ratio, mlp_pruning_ratio=args.mlp_ratio,
                          param_pruning_ratio=args.param_ratio, attention_unit=args.attention_unit,
                          width_multiple=args.width_multiple, distill_alpha=args.distill_alpha, distill_temperature=args.distill_temperature,
                          distill_teacher=args.distill_teacher, compensation=args.compensation,
                          compensation_lambda=args.compensation_lambda,
                          compensation_batches=args.compensation_batches, **VARIANTS[criterion])
    trainer = LoRAPruneTrainer(copy.deepcopy(base), cfg, train_dataset=train_ds, processing_class=tok,
                               peft_config=lora_config())
    recorder = None
    if curve is not None:
        recorder = make_curve_callback(trainer, tok, curve[0], curve[1], args)
        trainer.add_callback(recorder)  # after the pruning callback: sees each step's updated masks
    t0 = time.perf_counter()
    trainer.train()
    # train_s leaves out the curve's evaluations, so it stays comparable with runs without a curve.
    curve_s = recorder.eval_s if recorder is not None else 0.0
    train_s = time.perf_counter() - t0 - curve_s
    model, _ = compact_model(trainer.model, trainer.pruning_state)
    info = {"train_s": train_s, "tokens_trained": int(trainer.state.num_input_tokens_seen),
            "steps": trainer.state.global_step, "target": trainer.target_summary(),
            "final_loss": _last_loss(trainer), "log_history": trainer.state.log_history}
    if recorder is not None:
        info.update(curve=recorder.points, curve_protocol=_curve_protocol(recorder.protocol, args),
                    curve_eval_s=curve_s)
    del trainer
    return model, info


def run_oneshot(base, tok, train_ds, calib, criterion, ratio, args, tmp):
    from trl import SFTConfig

    from loraprune_trainer.oneshot import finetune_compact, oneshot_prune

    t0 = time.perf_counter()
    variant = VARIANTS[criterion]
    attention_ratio, mlp_ratio, counts = args.attention_ratio, args.mlp_ratio, None
    if args.param_ratio is not None:
        attention_ratio, mlp_ratio, counts = oneshot_budget_ratios(base, args)
    result = oneshot_prune(copy.deepcopy(base), tok, calib, criterion=variant["pruning_criterion"],
                           pruning_ratio=ratio, attention_ratio=attention_ratio, mlp_ratio=mlp_ratio,
                           attention_unit=args.attention_unit, width_multiple=args.width_multiple,
                           score_form=variant.get("score_form", "square"),
                           normalize_scores=variant.get("normalize_scores", False),
                           max_length=args.max_length, batch_size=args.batch, seed=args.seed,
                           compensation=args.compensation, compensation_lambda=args.compensation_lambda)
    score_s = time.perf_counter() - t0
    if counts is not None and result.report["units_pruned_per_layer"] != counts:
        raise RuntimeError(f"one-shot pruned {result.report['units_pruned_per_layer']} units per layer, the "
                           f"--param-ratio budget asks for {counts}")
    if args.steps == 0:  # the cut alone: what compensation recovers before any training
        return result.model.eval(), {"score_s": score_s, "train_s": 0.0, "tokens_trained": 0, "steps": 0,
                                     "oneshot": result.report, "final_loss": None}
    t0 = time.perf_counter()
    model, trainer = finetune_compact(result.model, tok, train_ds, SFTConfig(**train_kwargs(args, tmp)),
                                      lora_config=lora_config())
    info = {"score_s": score_s, "train_s": time.perf_counter() - t0,
            "tokens_trained": int(trainer.state.num_input_tokens_seen), "steps": trainer.state.global_step,
            "oneshot": result.report, "final_loss": _last_loss(trainer)}
    del trainer
    return model.eval(), info


def oneshot_budget_ratios(base, args) -> tuple[float, float, dict]:
    """Per-kind ratios that make one-shot pruning cut exactly the per-layer counts the trainer's
    ``param_pruning_ratio`` budget (``--param-ratio``) gives, so both modes end at the same size."""
    from loraprune_trainer.schedule import budget_prune_counts
    from loraprune_trainer.structure import decoder_parameters, discover_structure, unit_parameters

    structure = discover_structure(base, args.attention_unit)
    attn, mlp = structure.attention[0], structure.mlp[0]
    a, m = budget_prune_counts(attn, mlp, unit_parameters(structure, attn), unit_parameters(structure, mlp),
                               structure.num_layers, decoder_parameters(structure), args.param_ratio,
                               args.attention_ratio, args.mlp_ratio, args.width_multiple)
    return a / attn.num_units, m / mlp.num_units, {"attention": a, "mlp": m}


def _curve_protocol(protocol, args) -> dict:
    """The curve's perplexity protocol plus how its points were taken."""
    return {"every": args.curve_every, "windows": args.curve_windows, "dataset": "wikitext2",
            "model": "the masked model in training (PEFT + mask hooks, eval mode, no_grad), before cut and merge",
            "points": "step 0 (before any update), every `every` optimizer steps, and the last step",
            "tokens_seen": "trainer.state.num_input_tokens_seen (all input tokens, padding included)",
            "perplexity": protocol}


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
    # Data first: a missing evaluation file or zero-shot folder fails before the model load.
    texts = load_eval_texts(args)
    zs_folder = zeroshot_folder(args)
    base, tok = load_model_and_tokenizer(args.model)
    if _cuda():
        base = base.cuda()
    curve = None
    if args.curve_every:
        wiki = texts.get("wikitext2") or load_text(common.data_file(dict(EVALS)["wikitext2"]))
        curve = curve_text(wiki[0], wiki[1], tok, args.curve_windows)
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
                if curve is not None:  # the dense model's perplexity on the curve windows: the curves' reference
                    t = time.perf_counter()
                    ppl, protocol = curve_point(base, tok, curve[0], curve[1], args)
                    info = {"curve": [{"step": 0, "tokens_seen": 0, "perplexity": ppl}],
                            "curve_protocol": _curve_protocol(protocol, args), "curve_eval_s": time.perf_counter() - t}
            elif mode == "iterative":
                model, info = run_iterative(base, tok, train_ds, criterion, ratio, args, tmp, curve)
            else:
                model, info = run_oneshot(base, tok, train_ds, calib, criterion, ratio, args, tmp)
        if args.save_models and mode != "dense":
            save_model(model, tok, os.path.join(args.save_models, rid))
        t1 = time.perf_counter()
        metrics = evaluate(model, tok, texts, args)
        if zs_folder is not None:
            info["zeroshot"] = evaluate_zeroshot(model, tok, args, zs_folder)
        # eval_s: every evaluation of the final model (perplexity and, if asked, zero-shot: zeroshot.eval_s).
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
        zs = r.get("zeroshot")  # absent in runs made without --zeroshot-tasks (and in every older run)
        if zs:
            row["zs_acc"] = zs.get("mean_acc")
            row["zs_acc_norm"] = zs.get("mean_acc_norm")
        rows.append(row)
    # WikiText-2 and PTB columns always (as before); C4 and zero-shot columns only when some run has them.
    metric_cols = [f"{d}/{p}" for d, _ in EVALS for p in PROTOCOLS
                   if d in DEFAULT_EVAL_SETS or any(f"{d}/{p}" in row for row in rows)]
    zs_cols = [c for c in ("zs_acc", "zs_acc_norm") if any(c in row for row in rows)]
    table = common.print_table(rows, ["ratio", "criterion", "mode", "params_M", "params_%", "tokens", *metric_cols,
                                      *zs_cols, "wall_s"], floatfmt="{:.2f}")
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
    plot_curves(runs, args.out.rstrip("/") + ".curve.png")


def distill_alpha(run) -> float:
    """The distillation weight a run trained with (0.0 for the dense run and for plain LoRA)."""
    if run["mode"] == "dense":
        return 0.0
    return (run.get("settings") or {}).get("distill_alpha") or 0.0


def compensation(run) -> str:
    """The compensation a run pruned with (``none`` for runs from before the setting existed)."""
    return (run.get("settings") or {}).get("compensation") or "none"


def beats_baselines(runs) -> dict:
    """Per ratio, mode, distillation weight and metric: does ``lora`` have the lowest perplexity among the
    criteria run with the same settings? Compensated runs are a different method and stay out."""
    runs = [r for r in runs if compensation(r) == "none"]
    lines, cells = [], []
    for ratio in sorted({r["ratio"] for r in runs if r["ratio"]}):
        for mode in ("iterative", "oneshot"):
            for alpha in sorted({distill_alpha(r) for r in runs if r["ratio"] == ratio and r["mode"] == mode}):
                group = {r["criterion"]: r for r in runs
                         if r["ratio"] == ratio and r["mode"] == mode and distill_alpha(r) == alpha}
                if "lora" not in group or len(group) < 2:
                    continue
                kd = f" kd={alpha:g}" if alpha else ""
                for metric in group["lora"]["metrics"]:
                    ppl = {c: r["metrics"][metric]["perplexity"] for c, r in group.items() if metric in r["metrics"]}
                    best = min(ppl, key=ppl.get)
                    cells.append({"ratio": ratio, "mode": mode, "distill_alpha": alpha, "metric": metric, "best": best,
                                  "lora": ppl["lora"], "others": {c: v for c, v in ppl.items() if c != "lora"}})
                    lines.append(f"ratio {ratio:g} {mode:9s}{kd} {metric:24s} best={best:11s} lora={ppl['lora']:.2f} "
                                 + " ".join(f"{c}={v:.2f}" for c, v in ppl.items() if c != "lora"))
    wins = sum(c["best"] == "lora" for c in cells)
    lines.append(f"lora is best in {wins} of {len(cells)} (ratio, mode, distillation, metric) cells")
    return {"lines": lines, "cells": cells, "lora_best": wins, "cells_total": len(cells)}


def plot(runs, dense, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in runs if r["ratio"]})
    if not ratios:
        return
    metric = "wikitext2/llm-pruner"
    series = [("iterative", False, "prune while fine-tuning"), ("iterative", True, "prune while fine-tuning + distillation"),
              ("oneshot", False, "one-shot, then fine-tune")]
    runs = [r for r in runs if compensation(r) == "none"]  # one bar per criterion: the plain runs
    series = [s for s in series if any(r["mode"] == s[0] and _distilled(r) == s[1] for r in runs)]
    width = 0.8 / max(1, len(series))
    fig, axes = plt.subplots(1, len(ratios), figsize=(5.5 * len(ratios), 4), squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        for k, (mode, distilled, label) in enumerate(series):
            xs, ys = [], []
            for i, c in enumerate(CRITERIA):
                r = next((r for r in runs if r["ratio"] == ratio and r["mode"] == mode and r["criterion"] == c
                          and _distilled(r) == distilled), None)
                if r and metric in r["metrics"]:
                    xs.append(i + (k - (len(series) - 1) / 2) * width)
                    ys.append(r["metrics"][metric]["perplexity"])
            ax.bar(xs, ys, width=width, label=label)
        if dense and metric in dense["metrics"]:  # absent when --eval-sets leaves out wikitext2
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


def _distilled(run) -> bool:
    return run["mode"] != "dense" and bool((run.get("settings") or {}).get("distill_alpha"))


def plot_curves(runs, path) -> str | None:
    """Recovery curves: perplexity on the curve windows vs training tokens, one line per run of the folder
    that has a ``"curve"``, one panel per budget, colour by criterion, dashed with distillation (the dense
    model's point, if recorded, as a dotted line). Returns ``path``, or None (nothing drawn) when no run
    has a curve."""
    curves = [r for r in runs if r.get("curve") and r["mode"] != "dense"]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One panel per budget; colour = criterion, dashed = with distillation.
    ratios = sorted({r["ratio"] for r in curves})
    colours = {c: plt.cm.tab10(i) for i, c in enumerate(CRITERIA)}
    dense = next((r for r in runs if r["mode"] == "dense" and r.get("curve")), None)
    windows = (curves[0].get("curve_protocol") or {}).get("windows")
    fig, axes = plt.subplots(1, len(ratios), figsize=(7.5 * len(ratios), 4.5), squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        group = [r for r in curves if r["ratio"] == ratio]
        for r in group:
            points = r["curve"]
            ax.plot([p["tokens_seen"] for p in points], [p["perplexity"] for p in points], marker="o", ms=2.5, lw=1.2,
                    ls="--" if _distilled(r) else ("-." if compensation(r) != "none" else "-"),
                    color=colours.get(r["criterion"]), label=r["run"])
        if dense:
            ax.axhline(dense["curve"][0]["perplexity"], color="k", ls=":", lw=1, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens seen")
        ax.set_ylabel(f"perplexity (WikiText-2, {windows} llm-pruner windows)" if windows else "perplexity")
        ax.set_title(f"budget {ratio:g}: masked model during LoRA fine-tuning", fontsize=10)
        ax.legend(fontsize=7, ncol=2 if len(group) > 8 else 1)
    fig.suptitle("Recovery while pruning")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
