"""Repeat recorded ``bench/quality.py`` runs into another folder, one after another, resumable.

Every run JSON of ``quality.py`` records the command that made it. This script runs that command again with
``--out`` and ``--save-models`` pointed elsewhere. Two uses:

* measuring how far one run moves between machines (the rerun's perplexities against the first run's);
* getting back a model whose saved weights are gone, to score what was added to the suite later (HellaSwag,
  say). On the same kind of machine and thread count a rerun has matched the first run's perplexities to
  about 1e-6 relative and its zero-shot accuracies exactly; each rerun's comparison line says whether that
  held, so a score taken from the rerun model can be trusted to belong to the first run's row.

    python bench/rerun.py --of bench/results/grid --out bench/results/grid_rerun \\
        --save-models .bench_models/grid_rerun --runs iterative-wanda-r0.2 iterative-lora-r0.2
    python bench/quality_zeroshot.py --out bench/results/grid_rerun --models .bench_models/grid_rerun \\
        --tasks hellaswag --limit 500 --cache .bench_models/zeroshot_cache

A run that already has a JSON in ``--out`` is skipped, so the same command continues an interrupted series.
Every requested run is checked before the first one starts: it must exist in ``--of`` with a ``quality.py``
command. An option added to ``quality.py`` after a run was recorded, whose default changes the model
(``--width-multiple``), is pinned to the behaviour the run had. The same command may make the ``dense`` run
too, when ``--out`` has none yet.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

SCRIPT = "bench/quality.py"
# Flags whose values name where a run writes: replaced, everything else kept as recorded.
REDIRECTED = ("--out", "--save-models")
# Relative change above which a rerun is not the same model up to float noise.
SAME_MODEL_RTOL = 1e-4
# Options added to quality.py after some runs were recorded, whose default changes the model: a run recorded
# without the option (absent from its ``settings``) ran with the behaviour before it existed, given here.
# width_multiple: kept MLP channels were not rounded before it (the default became 8).
PINNED_WHEN_UNRECORDED = {"width_multiple": ("--width-multiple", "1")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--of", required=True, help="The quality.py --out folder whose runs to repeat.")
    p.add_argument("--out", required=True, help="Where the reruns' JSONs go (a different folder than --of).")
    p.add_argument("--save-models", default=None, metavar="DIR",
                   help="Keep each rerun's compacted model in DIR/<run> (for quality_zeroshot.py).")
    p.add_argument("--runs", nargs="+", default=None,
                   help="Run ids, in the order to run them (default: every run of --of, in name order).")
    args = p.parse_args(argv)
    if os.path.abspath(args.of) == os.path.abspath(args.out):
        p.error("--out must differ from --of: the reruns would be skipped as done.")
    return args


def rerun_argv(command: str, out: str, save_models: str | None, settings: dict | None = None) -> list[str]:
    """The recorded ``python bench/quality.py ...`` command as an argv for this interpreter, writing to ``out``
    (and saving models to ``save_models``) instead of where it first wrote. ``settings`` (the run JSON's) tells
    which later-added options the run predates: those are pinned to their earlier behaviour
    (``PINNED_WHEN_UNRECORDED``) so today's defaults do not make a different model."""
    words = shlex.split(command)
    if words[:2] != ["python", SCRIPT]:
        raise ValueError(f"not a {SCRIPT} command: {command[:80]!r}")
    kept, skip_value = [], False
    for word in words[2:]:
        if skip_value:
            skip_value = False
            continue
        flag = word.split("=", 1)[0]
        if flag in REDIRECTED:
            skip_value = "=" not in word
            continue
        kept.append(word)
    given = {word.split("=", 1)[0] for word in kept}
    for key, (flag, value) in PINNED_WHEN_UNRECORDED.items():
        if key not in (settings or {}) and flag not in given:
            kept += [flag, value]
    kept += ["--out", out] + (["--save-models", save_models] if save_models else [])
    return [sys.executable, os.path.join(common.REPO_ROOT, SCRIPT), *kept]


def plan(args) -> list[tuple[str, list[str] | None]]:
    """``(run id, argv or None when already rerun)`` for every requested run, checked before anything runs."""
    runs = common.run_ids(args.of) if args.runs is None else list(args.runs)
    todo, problems = [], []
    for rid in runs:
        first = os.path.join(args.of, f"{rid}.json")
        if not os.path.isfile(first):
            problems.append(f"run {rid!r}: no {first}")
            continue
        record = common.read_json(first)
        try:
            argv = rerun_argv(record.get("command") or "", args.out, args.save_models, record.get("settings"))
        except ValueError as e:
            problems.append(f"run {rid!r}: {e}")
            continue
        todo.append((rid, None if os.path.isfile(os.path.join(args.out, f"{rid}.json")) else argv))
    if problems:
        raise SystemExit("rerun: cannot repeat\n  " + "\n  ".join(problems))
    return todo


def compare(first: dict, rerun: dict) -> dict:
    """Per perplexity metric of both runs: first, rerun and the relative change; ``same_model`` is whether both
    kept the same parameter count (where recorded) and every change is below ``SAME_MODEL_RTOL``."""
    row = {"run": first["run"]}
    changes = []
    sizes = first.get("parameters"), rerun.get("parameters")
    same_size = None in sizes or sizes[0] == sizes[1]
    for metric, value in first.get("metrics", {}).items():
        again = rerun.get("metrics", {}).get(metric)
        if not (isinstance(value, dict) and isinstance(again, dict) and "perplexity" in value and "perplexity" in again):
            continue
        name = metric.split("/")[0]
        change = again["perplexity"] / value["perplexity"] - 1
        row.update({f"{name}_first": value["perplexity"], f"{name}_rerun": again["perplexity"],
                    f"{name}_change": change})
        changes.append(abs(change))
    row["same_model"] = same_size and bool(changes) and max(changes) < SAME_MODEL_RTOL
    return row


def main(argv=None):
    args = parse_args(argv)
    todo = plan(args)
    rows = []
    for rid, command in todo:
        if command is None:
            print(f"skip {rid} (in {args.out} already)", flush=True)
        else:
            print(f"rerun {rid}: {shlex.join(command[1:])}", flush=True)
            subprocess.run(command, check=True)  # in this directory: --out and --save-models as the user gave them
            if not os.path.isfile(os.path.join(args.out, f"{rid}.json")):
                raise SystemExit(f"rerun: the recorded command of {rid!r} did not write {args.out}/{rid}.json.")
        rows.append(compare(common.read_json(os.path.join(args.of, f"{rid}.json")),
                            common.read_json(os.path.join(args.out, f"{rid}.json"))))
    if rows:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        common.print_table(rows, columns, floatfmt="{:.6g}")
    return rows


if __name__ == "__main__":
    main()
