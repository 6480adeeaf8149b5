"""Zero-shot accuracy for runs of ``bench/quality.py``, evaluated after the grid from saved models.

The six-task suite costs several minutes per model on a CPU, more than the perplexities, so a grid can
train and measure perplexity first (``quality.py --save-models DIR``) and leave zero-shot to this script:

    python bench/quality.py ... --out bench/results/grid --save-models .bench_models/grid
    python bench/quality_zeroshot.py --out bench/results/grid --models .bench_models/grid --limit 500

Runs of ``bench/recipe.py`` work the same way (``--summary recipe``).
For each run (``--runs`` in the given order, default every run JSON of ``--out``) it loads the saved model
(the ``dense`` run: ``--model`` itself), scores the tasks with the same code as ``quality.py
--zeroshot-tasks`` and stores the result in the run's JSON under ``--key`` (default ``zeroshot``, or
``zeroshot_full`` for ``--limit 0``) with the load average at start and end. A run that already has a
result for the same tasks and limit is skipped, so the script resumes; a run that has a result at the same
limit but lacks some of the tasks (HellaSwag, say) gets only those scored and merged into it. Each JSON is
rewritten atomically. With ``--cache DIR`` every scored request is also kept as it is scored, so an
interrupted run (a long HellaSwag pass, say) resumes mid-task instead of from the task's first item.
Finally the grid's summary (``<out>.json``, plots) is rebuilt.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import quality  # noqa: E402

logger = logging.getLogger("bench.quality_zeroshot")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="The quality.py --out folder holding the run JSONs.")
    p.add_argument("--models", required=True, help="The quality.py --save-models folder (one folder per run).")
    p.add_argument("--model", default="smollm2-gguf", help="The base model, evaluated for the `dense` run.")
    p.add_argument("--runs", nargs="+", default=None, help="Run ids in the order to evaluate (default: all).")
    p.add_argument("--tasks", nargs="+", default=list(quality.ZEROSHOT_TASKS), choices=quality.ZEROSHOT_TASKS)
    p.add_argument("--limit", type=int, default=500, help="First N items of each task (0 = the full sets).")
    p.add_argument("--key", default=None, help="JSON key of the result (default: zeroshot, or zeroshot_full for "
                                               "--limit 0).")
    p.add_argument("--cache", default=None,
                   help="Folder caching every scored request as it is scored (one file per model fingerprint): "
                        "the same command run again after an interruption computes only what is missing. A "
                        "full HellaSwag pass takes over two hours on 2 CPU cores.")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summary", choices=["quality", "recipe"], default="quality",
                   help="Which script's report to rebuild at the end: the folder's runs come from quality.py "
                        "(default) or recipe.py.")
    args = p.parse_args(argv)
    if args.limit < 0:
        p.error(f"--limit must be >= 0, got {args.limit}.")
    args.key = args.key or ("zeroshot" if args.limit else "zeroshot_full")
    return args


def plan(args) -> list[tuple[str, str, str | None]]:
    """``(run id, run JSON path, model folder or None for dense)`` of every run to evaluate, checked before
    any model is loaded: a missing run or saved model is an error naming it."""
    runs = common.run_ids(args.out) if args.runs is None else list(args.runs)
    out, missing = [], []
    for rid in runs:
        path = os.path.join(args.out, f"{rid}.json")
        if not os.path.isfile(path):
            missing.append(f"run {rid!r}: no {path} (not run yet?)")
            continue
        folder = None if rid == "dense" else os.path.join(args.models, rid)
        if folder is not None and not os.path.isfile(os.path.join(folder, "config.json")):
            missing.append(f"run {rid!r}: no saved model in {folder} (was quality.py run with --save-models?)")
            continue
        out.append((rid, path, folder))
    if missing:
        raise SystemExit("quality_zeroshot: cannot evaluate\n  " + "\n  ".join(missing))
    return out


def missing_tasks(record: dict, args) -> list[str]:
    """The requested tasks the run has no result for at this limit (all of them when its result has another
    limit, which is then replaced)."""
    done = record.get(args.key)
    if not done or done.get("limit") != (args.limit or None):
        return list(args.tasks)
    return [t for t in args.tasks if t not in done.get("tasks", {})]


def load(folder, args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if folder is None:
        from loraprune_trainer.loading import load_model_and_tokenizer

        return load_model_and_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    todo = plan(args)
    eval_args = argparse.Namespace(zeroshot_tasks=args.tasks, zeroshot_limit=args.limit, eval_batch=args.batch,
                                   seed=args.seed, zeroshot_cache=args.cache)
    folder = quality.zeroshot_folder(eval_args)
    for rid, path, model_folder in todo:
        record = common.read_json(path)
        todo_tasks = missing_tasks(record, args)
        if not todo_tasks:
            logger.info("skip %s (done)", rid)
            continue
        logger.info("zero-shot %s (limit %s): %s", rid, args.limit or "full", ", ".join(todo_tasks))
        load_at_start = common.load_average()
        t0 = time.perf_counter()
        model, tok = load(model_folder, args)
        model.eval()
        result = quality.evaluate_zeroshot(model, tok, argparse.Namespace(**{**vars(eval_args),
                                                                            "zeroshot_tasks": todo_tasks}), folder)
        result.update(load_average_at_start=load_at_start, load_average_at_end=common.load_average(),
                      wall_s=time.perf_counter() - t0, command=common.command_line())
        record = common.read_json(path)  # re-read: never overwrite what another writer added meanwhile
        existing = record.get(args.key)
        # Tasks added to a finished result (e.g. HellaSwag) join it; the other tasks are not scored again.
        same_limit = existing and existing.get("limit") == result["limit"]
        record[args.key] = quality.merge_zeroshot(existing, result) if same_limit else result
        common.write_json(path, record)
        del model
        gc.collect()
    if args.summary == "recipe":
        import recipe

        recipe.report(args.out)
    else:
        quality.report(argparse.Namespace(out=args.out))


if __name__ == "__main__":
    main()
