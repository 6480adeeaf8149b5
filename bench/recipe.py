"""Which training knobs matter: the README's demo config, one knob changed at a time, then combinations.

Every run is ``train.py --config bench/recipe_base.yaml`` plus the flags of its setting (run in this
process, so a perplexity curve can ride along as a callback; the equivalent command is recorded). The
exported model is then scored on WikiText-2 (test), PTB (validation) and C4 (validation, first
``--c4-docs`` documents) under the ``llm-pruner`` protocol, first ``--windows`` windows of each: the same
windows for every run, so comparisons are paired. Dense is scored once (``dense.json``).

    python bench/recipe.py --settings demo lr1e-3 r32 --seeds 0
    python bench/recipe.py --settings demo+lr1e-3 --seeds 0 1 2
    python bench/recipe.py --report-only

A setting is a name from ``SETTINGS`` or several joined with ``+`` (their flags concatenated, later ones
win). Resumable: each finished run writes ``<out>/<setting>-seed-<S>.json`` and a rerun skips it. The report
(``<out>.json``, ``<out>.png``, ``<out>.curve.png``) gives every run, and per setting the mean and range over
seeds; a setting is called better than ``demo`` only when its range does not overlap demo's.

``bench/recipe_base.yaml`` is the demo config as it was when the study began (lr 3e-4); the setting ``demo``
is that base unchanged. The README's demo has since taken the study's winner, so the base stays a copy.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # train.py

import common  # noqa: E402

logger = logging.getLogger("bench.recipe")

# One knob at a time, from the study's base (LoRA r 8 / alpha 16, lr 3e-4 linear, prune_freq 5, ema 0.9,
# cooldown 0.2, no compensation, kept MLP widths multiples of 8).
SETTINGS: dict[str, list[str]] = {
    "demo": [],
    "r32": ["--lora_r", "32", "--lora_alpha", "64"],
    "r128": ["--lora_r", "128", "--lora_alpha", "256"],
    "rslora": ["--use_rslora", "true"],
    "lr1e-3": ["--learning_rate", "1e-3"],
    "lr2e-3": ["--learning_rate", "2e-3"],
    "cosine": ["--lr_scheduler_type", "cosine"],
    "cooldown0.5": ["--pruning_cooldown_ratio", "0.5"],
    "freq1": ["--prune_freq", "1"],
    "ema0.99": ["--ema_lambda", "0.99"],
    "norms": ["--lora_modules_to_save", "input_layernorm", "post_attention_layernorm", "norm"],
    "lstsq": ["--compensation", "lstsq"],
    "steps480": ["--max_steps", "480"],
    # What tokens buy: 976 steps of 4 x 128 tokens = 499,712 tokens (about 6x the demo), and half the decoder.
    "tokens500k": ["--max_steps", "976"],
    "p50": ["--param_pruning_ratio", "0.5"],
    # Training text as consecutive 128-token chunks of the concatenated documents (TRL's `wrapped` packing)
    # instead of each document's first 128 tokens: the C4 sample holds 722k tokens that way, 163k truncated,
    # so 500k tokens are one pass over distinct text rather than three over the same openings.
    "packed": ["--packing", "true", "--packing_strategy", "wrapped"],
    # Kept MLP widths: exact counts (the default before it became 8) and GPU-tile multiples.
    "width1": ["--width_multiple", "1"],
    "width64": ["--width_multiple", "64"],
    # Depth (whole decoder layers, SmolLM2 has 30) inside the same 20% budget; MLP channels make up the rest.
    "depth2": ["--layer_pruning_ratio", "0.0667"],
    "depth4": ["--layer_pruning_ratio", "0.1334"],
    "depth6": ["--layer_pruning_ratio", "0.2"],
    "bi6": ["--layer_pruning_ratio", "0.2", "--layer_criterion", "block_influence"],
    "last6": ["--layer_pruning_ratio", "0.2", "--layer_criterion", "last"],
}
EVAL_SETS = ["wikitext2", "ptb", "c4"]
# What each setting changes, for the report's `knob` column.
KNOBS = {"demo": "(the base: the demo before the study)", "r32": "LoRA rank", "r128": "LoRA rank", "rslora": "LoRA scaling",
         "lr1e-3": "learning rate", "lr2e-3": "learning rate", "cosine": "lr schedule",
         "cooldown0.5": "when cuts happen", "freq1": "when cuts happen", "ema0.99": "score smoothing",
         "norms": "what else trains", "lstsq": "compensated cuts", "steps480": "tokens",
         "tokens500k": "tokens", "p50": "budget (50%)", "packed": "training text (packed)",
         "width1": "MLP width multiple", "width64": "MLP width multiple"}


def knob(setting: str) -> str:
    """The knob a setting turns (``"a+b"``: both, joined with ``+``; depth settings: ``depth``)."""
    return " + ".join(KNOBS.get(part, "depth") for part in setting.split("+"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="bench/recipe_base.yaml")
    p.add_argument("--settings", nargs="+", default=["demo"],
                   help=f"Setting names ({', '.join(SETTINGS)}), or several joined with '+'.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More train.py flags for every run (recorded; last).")
    p.add_argument("--windows", type=int, default=256, help="llm-pruner windows per evaluation set.")
    p.add_argument("--c4-docs", type=int, default=256)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--curve-every", type=int, default=20, help="Curve point every K steps (0: no curve).")
    p.add_argument("--curve-windows", type=int, default=32)
    p.add_argument("--save-models", default=None, help="Keep each exported model under DIR/<run>.")
    p.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "recipe"))
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def setting_flags(name: str) -> list[str]:
    """The train.py flags of a setting: ``"a+b"`` is ``SETTINGS["a"] + SETTINGS["b"]``."""
    flags = []
    for part in name.split("+"):
        if part not in SETTINGS:
            raise SystemExit(f"Unknown setting {part!r} in {name!r}; known: {', '.join(SETTINGS)}.")
        flags += SETTINGS[part]
    return flags


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in args.settings:  # a typo fails now, not after an hour of runs
        setting_flags(name)
    if not args.report_only:
        import quality

        qargs = SimpleNamespace(eval_sets=EVAL_SETS, c4_docs=args.c4_docs, protocols=["llm-pruner"],
                                full_context_on=[], windows=args.windows, full_windows=0, eval_batch=args.eval_batch,
                                curve_every=args.curve_every, curve_windows=args.curve_windows)
        texts = quality.load_eval_texts(qargs)
        os.makedirs(args.out, exist_ok=True)
        dense_path = os.path.join(args.out, "dense.json")
        if not os.path.exists(dense_path):
            run_dense(args, qargs, texts, dense_path)
        for name in args.settings:
            for seed in args.seeds:
                run_one(args, qargs, texts, name, seed)
    report(args.out)


def _load_dense(config_path: str):
    """The config's base model (``model_name_or_path``, ``gguf_file``), as train.py loads it."""
    import yaml

    from loraprune_trainer.loading import load_model_and_tokenizer

    with open(config_path) as f:
        config = yaml.safe_load(f)
    return load_model_and_tokenizer(os.path.expandvars(config["model_name_or_path"]), config.get("gguf_file"))


def run_dense(args, qargs, texts, path):
    import quality

    model, tok = _load_dense(args.config)
    t0 = time.perf_counter()
    record = {"run": "dense", "eval": quality.evaluate(model, tok, texts, qargs), "eval_s": time.perf_counter() - t0,
              "machine": common.machine_info()}
    common.write_json(path, record)


def run_one(args, qargs, texts, name: str, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quality
    import train

    run = f"{name}-seed-{seed}"
    path = os.path.join(args.out, f"{run}.json")
    if os.path.exists(path):
        print(f"skip {run} (done)", flush=True)
        return
    flags = setting_flags(name) + ["--seed", str(seed)] + list(args.extra)
    tmp = tempfile.mkdtemp(prefix="recipe-")
    try:
        cli = ["--config", args.config, "--output_dir", tmp, "--disable_tqdm", "true", *flags]
        script_args, training_args, model_args = train.make_parser().parse_args_and_config(args=cli)
        curve = None
        if args.curve_every:
            curve = CurveCallback(texts["wikitext2"], args.curve_every, qargs)
        load_start = common.load_average()
        t0 = time.perf_counter()
        summary = train.main(script_args, training_args, model_args, callbacks=[curve] if curve else None)
        train_wall = time.perf_counter() - t0
        pruned_dir = os.path.join(tmp, "pruned")
        model = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(pruned_dir)
        t1 = time.perf_counter()
        evals = quality.evaluate(model, tok, texts, qargs)
        eval_s = time.perf_counter() - t1
        if args.save_models:
            dest = os.path.join(args.save_models, run)
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(pruned_dir, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary.pop("pruned_dir", None)  # a temporary folder, gone now
    label = os.path.join(args.save_models, run) if args.save_models else f"{run} (exported, not kept)"
    summary, evals = relabel(summary, label), relabel(evals, label)
    record = {
        "run": run, "setting": name, "seed": seed, "flags": flags,
        "command": "accelerate launch --config_file accelerate_configs/cpu.yaml train.py "
                   + shlex.join(["--config", args.config, *flags]),  # quoted: a flag may hold JSON
        "bench_command": common.command_line(),
        "train_wall_s": train_wall, "eval_s": eval_s, "load_average_at_start": load_start,
        "load_average_at_end": common.load_average(), "eval": evals, "summary": summary,
        "curve": curve.points if curve else None, "curve_eval_s": curve.eval_s if curve else None,
        "machine": common.machine_info(),
    }
    common.write_json(path, record)
    ppl = {k.split("/")[0]: v["perplexity"] for k, v in evals.items()}
    print(f"{run}: {train_wall / 60:.1f} min, " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()), flush=True)


TMP_RUN_DIR = re.compile(r"[^\s\"']*recipe-[A-Za-z0-9_]+/pruned")


def relabel(obj, label: str):
    """``obj`` with every path of the run's temporary export folder replaced by ``label`` (where the model
    was kept, or the run's name): the folder is deleted after the run, and records hold no machine paths."""
    if isinstance(obj, dict):
        return {k: relabel(v, label) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relabel(v, label) for v in obj]
    if isinstance(obj, str):
        return TMP_RUN_DIR.sub(label, obj)
    return obj


class CurveCallback:
    """Masked-model WikiText-2 perplexity on the first ``curve_windows`` windows at step 0, every ``every``
    optimizer steps and at the end (evaluation mode, no gradients: training is unchanged)."""

    def __new__(cls, text_meta, every, qargs):
        from transformers import TrainerCallback

        import quality

        class _Curve(TrainerCallback):
            def __init__(self):
                self.points, self.eval_s, self.tok, self.text = [], 0.0, None, None

            def _record(self, state, model, tok):
                if self.points and self.points[-1]["step"] == state.global_step:
                    return
                t0 = time.perf_counter()
                if self.text is None:
                    self.text, self.meta = quality.curve_text(text_meta[0], text_meta[1], tok, qargs.curve_windows)
                ppl, _ = quality.curve_point(model, tok, self.text, self.meta, qargs)
                self.points.append({"step": int(state.global_step), "perplexity": ppl})
                self.eval_s += time.perf_counter() - t0

            def on_train_begin(self, a, state, control, model=None, processing_class=None, **kw):
                self._record(state, model, processing_class)

            def on_step_end(self, a, state, control, model=None, processing_class=None, **kw):
                if state.global_step % every == 0:
                    self._record(state, model, processing_class)

            def on_train_end(self, a, state, control, model=None, processing_class=None, **kw):
                self._record(state, model, processing_class)

        return _Curve()


# -- report -------------------------------------------------------------------------------------------------
def load_runs(folder: str) -> tuple[dict | None, list[dict]]:
    dense_path = os.path.join(folder, "dense.json")
    dense = common.read_json(dense_path) if os.path.exists(dense_path) else None
    runs = [common.read_json(p) for p in sorted(glob.glob(os.path.join(folder, "*-seed-*.json")))]
    return dense, runs


def run_row(run: dict, dense: dict | None) -> dict:
    s = run["summary"]
    ppl = {k.split("/")[0]: v["perplexity"] for k, v in run["eval"].items()}
    tokens = (s.get("settings") or {}).get("max_steps", 0) * tokens_per_step(s)
    row = {"setting": run["setting"], "seed": run["seed"], **{s_: ppl.get(s_) for s_ in EVAL_SETS}}
    if dense:
        dppl = {k.split("/")[0]: v["perplexity"] for k, v in dense["eval"].items()}
        row["wikitext2_x_dense"] = ppl["wikitext2"] / dppl["wikitext2"]
    zs = run.get("zeroshot")
    if zs:
        row["paper_mean"] = zs.get("paper_mean")
        row["boolq"] = (zs.get("tasks", {}).get("boolq") or {}).get("acc")
    # A task scored on every item (``quality_zeroshot.py --limit 0``), HellaSwag first of all.
    full_hellaswag = ((run.get("zeroshot_full") or {}).get("tasks") or {}).get("hellaswag")
    if full_hellaswag:
        row["hellaswag_full"] = full_hellaswag["acc_norm"]
    layers = s.get("decoder_layers") or {}
    row.update({"layers": layers.get("after"), "removed_layers": " ".join(map(str, layers.get("removed") or [])),
                "mlp_channels": (s.get("settings") or {}).get("mlp_channels_per_layer", 0)
                - (s.get("settings") or {}).get("mlp_channels_pruned_per_layer", 0)})
    # The curve's evaluations ride inside train.main's wall time; they are not training.
    train_s = run["train_wall_s"] - (run.get("curve_eval_s") or 0.0)
    row.update({"knob": knob(run["setting"]), "decoder_params_ratio": s["parameters"]["decoder_layers_ratio"],
                "tokens": tokens, "train_min": train_s / 60, "s_per_step": s.get("train_s_per_step"),
                "load": (run.get("load_average_at_start") or [None])[0],
                "load_end": (run.get("load_average_at_end") or [None])[0]})
    return row


def tokens_per_step(summary: dict) -> int:
    """Training tokens per optimizer step of a run (batch x accumulation x processes x sequence length)."""
    st = summary.get("settings") or {}
    return (st.get("per_device_train_batch_size", 0) * st.get("gradient_accumulation_steps", 0)
            * st.get("world_size", 1) * st.get("max_length", 0))


def is_token_budget(setting: str) -> bool:
    """Whether a setting changes the number of training tokens (``tokens500k``, ``steps480``, ...)."""
    return any(KNOBS.get(part) == "tokens" for part in setting.split("+"))


def dense_row(dense: dict) -> dict:
    """The unpruned model's row: its perplexities and zero-shot (if scored)."""
    row = {"setting": "dense", **{k.split("/")[0]: v["perplexity"] for k, v in dense["eval"].items()}}
    zs = dense.get("zeroshot")
    if zs:
        row["paper_mean"] = zs.get("paper_mean")
        row["boolq"] = (zs.get("tasks", {}).get("boolq") or {}).get("acc")
    return row


def spread(rows: list[dict]) -> list[dict]:
    """Per setting: number of seeds, mean / min / max of each perplexity and of the WikiText-2 ratio."""
    out = []
    for name in dict.fromkeys(r["setting"] for r in rows):
        group = [r for r in rows if r["setting"] == name]
        row = {"setting": name, "seeds": len(group)}
        for key in EVAL_SETS + ["wikitext2_x_dense", "train_min"]:
            values = [r[key] for r in group if r.get(key) is not None]
            if values:
                row.update({f"{key}_mean": sum(values) / len(values), f"{key}_min": min(values),
                            f"{key}_max": max(values)})
        out.append(row)
    base = next((r for r in out if r["setting"] == "demo"), None)
    for row in out:
        row["verdict_vs_demo"] = verdict(row, base)
    return out


def verdict(row: dict, base: dict | None) -> str:
    """'better' / 'worse' when the WikiText-2 ranges over seeds do not overlap demo's (both with 2+ seeds);
    'inside spread' when they overlap; 'one seed' otherwise."""
    if base is None or row is base:
        return ""
    if row["seeds"] < 2 or base["seeds"] < 2:
        return "one seed"
    if row["wikitext2_max"] < base["wikitext2_min"]:
        return "better"
    if row["wikitext2_min"] > base["wikitext2_max"]:
        return "worse"
    return "inside spread"


def report(folder: str) -> dict | None:
    dense, runs = load_runs(folder)
    if not runs:
        print(f"No runs in {folder}.")
        return None
    rows = [run_row(r, dense) for r in runs]
    order = {n: i for i, n in enumerate(SETTINGS)}
    rows.sort(key=lambda r: (len(r["setting"].split("+")), order.get(r["setting"].split("+")[0], 99), r["setting"],
                             r["seed"]))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = common.print_table(([dense_row(dense)] if dense else []) + rows, columns, floatfmt="{:.2f}")
    speed = load_speed(folder.rstrip("/") + ".speed.json")
    if speed:
        for row in rows:
            row.update(speed.get(row["setting"], {}))
    agg = spread(rows)
    common.print_table(agg, ["setting", "seeds", "wikitext2_mean", "wikitext2_min", "wikitext2_max", "ptb_mean",
                             "c4_mean", "verdict_vs_demo"], floatfmt="{:.2f}")
    out = {"benchmark": "recipe study at the demo's budget", "dense": dense, "rows": rows, "spread": agg,
           "table": table, "runs": runs}
    common.write_json(folder.rstrip("/") + ".json", out)
    plot(rows, agg, dense, folder.rstrip("/") + ".png")
    plot_curves([r for r in runs if not is_token_budget(r["setting"])], folder.rstrip("/") + ".curve.png")
    plot_token_curves(runs, dense, folder.rstrip("/") + ".tokens.png")
    if speed:
        plot_speed_quality(rows, dense, folder.rstrip("/") + ".speed.png")
    return out


SPEED_KEYS = {("generate", 1): "gen_b1_speedup", ("generate", 16): "gen_b16_speedup",
              ("forward", 1): "fwd_b1_speedup", ("forward", 16): "fwd_b16_speedup"}


def load_speed(path: str) -> dict:
    """``{model name: {gen_b1_speedup, gen_b16_speedup, fwd_b1_speedup, fwd_b16_speedup, speed_load}}`` from an
    ``inference_speed.py --saved <setting>=<folder>`` JSON (names are this study's settings), or ``{}``."""
    if not os.path.exists(path):
        return {}
    data = common.read_json(path)
    out = {}
    for r in data["rows"]:
        key = SPEED_KEYS.get((r["kind"], r["batch"]))
        if key and r["model"] != "dense":
            out.setdefault(r["model"], {})[key] = r["measured_speedup"]
            out[r["model"]][key.replace("speedup", "ideal")] = r["ideal_speedup"]
    return out


def plot_speed_quality(rows, dense, path):
    """WikiText-2 perplexity against the batch-1 greedy generation speed-up, one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get("gen_b1_speedup")]
    if not points:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if dense:
        d = next(v["perplexity"] for k, v in dense["eval"].items() if k.startswith("wikitext2"))
        ax.scatter([1.0], [d], color="k", marker="*", s=90, label="dense")
    for i, r in enumerate(points):
        ax.scatter([r["gen_b1_speedup"]], [r["wikitext2"]], color=f"C{i % 10}", s=40)
        ax.annotate(r["setting"], (r["gen_b1_speedup"], r["wikitext2"]), fontsize=8, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xlabel("greedy generation speed-up at batch 1 (measured, 1 thread)")
    ax.set_ylabel("WikiText-2 perplexity (256 windows)")
    ax.set_title("20% of decoder parameters: width vs depth (SmolLM2-135M)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rows, agg, dense, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [a["setting"] for a in agg]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 4))
    for i, name in enumerate(names):
        ys = [r["wikitext2"] for r in rows if r["setting"] == name]
        ax.scatter([i] * len(ys), ys, color="C0", zorder=3)
        ax.plot([i - 0.25, i + 0.25], [sum(ys) / len(ys)] * 2, color="C1")
    if agg and agg[0]["setting"] == "demo" and agg[0].get("wikitext2_min") is not None:
        ax.axhspan(agg[0]["wikitext2_min"], agg[0]["wikitext2_max"], color="0.85", zorder=0, label="demo's range")
    if dense:
        d = next(v["perplexity"] for k, v in dense["eval"].items() if k.startswith("wikitext2"))
        ax.axhline(1.35 * d, ls="--", color="C2", label=f"1.35 x dense ({1.35 * d:.1f})")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("WikiText-2 perplexity (256 windows)")
    ax.set_title("Recipe study: SmolLM2-135M, 20% of decoder parameters, taylor_gate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(runs, path):
    runs = [r for r in runs if r.get("curve")]
    if not runs:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(runs):
        pts = r["curve"]
        ax.plot([p["step"] for p in pts], [p["perplexity"] for p in pts], label=r["run"], color=f"C{i % 10}",
                ls="-" if r["seed"] == 0 else ":")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked-model WikiText-2 perplexity (32 windows)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_token_curves(runs, dense, path) -> list[tuple[str, str | None]]:
    """What more tokens buy: the curve of every run with a token-budget setting against training tokens, next
    to the run of the same setting and seed at the study's budget (the name without the token part), when
    there is one. Returns the ``(long run, budget run or None)`` pairs drawn; draws nothing without long runs."""
    by_name = {r["run"]: r for r in runs if r.get("curve")}
    pairs = []
    for r in by_name.values():
        if is_token_budget(r["setting"]):
            short = "+".join(p for p in r["setting"].split("+") if KNOBS.get(p) != "tokens") or "demo"
            pairs.append((r["run"], f"{short}-seed-{r['seed']}" if f"{short}-seed-{r['seed']}" in by_name else None))
    if not pairs:
        return pairs
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (long_run, short_run) in enumerate(sorted(pairs)):
        for name, style in ((long_run, "-"), (short_run, "--")):
            if name is None:
                continue
            run = by_name[name]
            per_step = tokens_per_step(run["summary"])
            pts = run["curve"]
            ax.plot([p["step"] * per_step / 1e3 for p in pts], [p["perplexity"] for p in pts], ls=style,
                    marker="o", ms=3, color=f"C{i % 10}", label=name)
        # Shade the long run's pruning ramp: the curve rises while units go, and recovers only after.
        st = by_name[long_run]["summary"]["settings"]
        if "pruning_warmup_ratio" in st and "pruning_cooldown_ratio" in st:
            total = st["max_steps"] * tokens_per_step(by_name[long_run]["summary"]) / 1e3
            ax.axvspan(st["pruning_warmup_ratio"] * total, (1 - st["pruning_cooldown_ratio"]) * total,
                       color=f"C{i % 10}", alpha=0.08, label=f"{long_run}: units being cut")
    if dense:
        d = next(v["perplexity"] for k, v in dense["eval"].items() if k.startswith("wikitext2"))
        first = by_name[pairs[0][0]]["curve"][0]["perplexity"]  # step 0: the unpruned model on the curve's windows
        ax.axhline(first, color="k", lw=0.8, ls=":", label=f"dense on the curve's windows ({first:.1f}; {d:.1f} on 256)")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("masked-model WikiText-2 perplexity (32 windows)")
    ax.set_title("What tokens buy: the same recipe, longer", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return sorted(pairs)


if __name__ == "__main__":
    main()
