"""What more training buys: the README's demo command at several step budgets, one after another.

Runs ``accelerate launch --config_file accelerate_configs/cpu.yaml train.py --config CONFIG --max_steps N``
for every ``--steps`` value, each in its own output folder, and collects the wall time of the
whole command (model loading, both evaluations and the export included), the perplexity before
and after and the parameter counts from its ``summary.json``. Resumable: a budget whose JSON exists
is skipped. Writes ``bench/results/demo_budgets/steps-N.json`` per run and ``demo_budgets.json``.

    python bench/demo_budgets.py --steps 40 80 160

``--seeds 0 1 2`` runs every budget once per seed (``--seed S``; files ``steps-N-seed-S.json``) and the
report adds, per budget, the mean and range over seeds of the perplexity, the wall time and the training
time per step: how far one run of the same config moves.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/smollm2_demo.yaml")
    p.add_argument("--steps", type=int, nargs="+", default=[40, 80, 160])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="Run every budget with each of these seeds (default: once, with the config's seed).")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More train.py flags for every run.")
    p.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "demo_budgets"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu.yaml"]
    for steps in args.steps:
        for seed in args.seeds or [None]:
            run_one(args, launcher, steps, seed)
    report(args.out)


def run_one(args, launcher, steps: int, seed: int | None) -> None:
    name = f"steps-{steps}" + (f"-seed-{seed}" if seed is not None else "")
    path = os.path.join(args.out, f"{name}.json")
    if os.path.exists(path):
        print(f"skip {name} (done)")
        return
    flags = ["--max_steps", str(steps)] + (["--seed", str(seed)] if seed is not None else []) + list(args.extra)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = launcher + ["train.py", "--config", args.config, "--output_dir", tmp, *flags]
        load_start = common.load_average()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=common.REPO_ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        summary = common.read_json(os.path.join(tmp, "summary.json"))
    record = {"steps": steps, "seed": seed, "wall_s": wall, "load_average_at_start": load_start,
              "load_average_at_end": common.load_average(), "summary": summary,
              "command": " ".join(["accelerate launch --config_file accelerate_configs/cpu.yaml train.py",
                                   "--config", args.config, *flags]),
              "machine": common.machine_info()}
    common.write_json(path, record)
    print(f"{name}: {wall / 60:.1f} min, perplexity {summary['perplexity_before']['perplexity']:.2f} -> "
          f"{summary['perplexity_after']['perplexity']:.2f}", flush=True)


def report(folder: str) -> None:
    runs = sorted((common.read_json(p) for p in glob.glob(os.path.join(folder, "steps-*.json"))),
                  key=lambda r: (r["steps"], r.get("seed") if r.get("seed") is not None else -1))
    rows = []
    for r in runs:
        s = r["summary"]
        before, after = s["perplexity_before"]["perplexity"], s["perplexity_after"]["perplexity"]
        rows.append({"steps": r["steps"], "seed": r.get("seed"), "tokens": r["steps"] * _tokens_per_step(s),
                     "wall_min": r["wall_s"] / 60, "train_s_per_step": s.get("train_s_per_step"),
                     "ppl_before": before, "ppl_after": after, "ppl_ratio": after / before,
                     "decoder_params_ratio": s["parameters"]["decoder_layers_ratio"],
                     "load_start": (r["load_average_at_start"] or [None])[0],
                     "load_end": (r["load_average_at_end"] or [None])[0]})
    table = common.print_table(rows, list(rows[0]) if rows else [], floatfmt="{:.2f}")
    spread = seed_spread(rows)
    if spread:
        common.print_table(spread, list(spread[0]), floatfmt="{:.2f}")
    common.write_json(folder.rstrip("/") + ".json", {"benchmark": "demo at several step budgets", "rows": rows,
                                                     "seed_spread": spread, "table": table, "runs": runs})


def seed_spread(rows: list[dict]) -> list[dict]:
    """Per step budget run with two or more seeds: mean, min and max of the final perplexity, its ratio to
    dense, the wall time and the training time per step."""
    out = []
    for steps in sorted({r["steps"] for r in rows}):
        group = [r for r in rows if r["steps"] == steps and r.get("seed") is not None]
        if len(group) < 2:
            continue
        row = {"steps": steps, "seeds": len(group)}
        for key in ("ppl_after", "ppl_ratio", "wall_min", "train_s_per_step"):
            values = [r[key] for r in group if r.get(key) is not None]
            if values:
                row.update({f"{key}_mean": sum(values) / len(values), f"{key}_min": min(values),
                            f"{key}_max": max(values)})
        out.append(row)
    return out


def _tokens_per_step(summary: dict) -> int | None:
    s = summary.get("settings") or {}
    parts = [s.get(k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "max_length")]
    return parts[0] * parts[1] * parts[2] * parts[3] if all(parts) else None


if __name__ == "__main__":
    main()
