"""Zero-shot accuracy through lm-evaluation-harness, from the Hub or from a folder of local files.

:func:`zero_shot` scores an in-memory model (plain, PEFT, or masked mid-training) on lm-eval tasks.
Task names are passed to lm-eval as they are (the stock tasks read the Hugging Face Hub), except
the tasks of the commonsense suite that pruning papers report (:data:`ZEROSHOT_TASKS`: boolq, piqa,
hellaswag, winogrande, arc_easy, arc_challenge, openbookqa) when a zero-shot folder is given
(``zeroshot_dir=`` / ``--zeroshot_dir``, or the environment variable ``LORAPRUNE_ZEROSHOT_DIR``).
Those are then read from the folder's upstream files through the task YAMLs shipped in
``evaluation/tasks/``: lm-eval's official task definitions (prompt, choices, target, metrics, version)
with only the data source changed, so that the numbers compare with published lm-eval numbers.

The folder holds each task's evaluation split in its original upstream format::

    boolq/val.jsonl                           BoolQ validation (SuperGLUE form)
    piqa/valid.jsonl + piqa/valid-labels.lst  PIQA validation and its labels
    hellaswag/val.jsonl                       HellaSwag validation (activity_label, ctx, endings, label)
    winogrande/dev.jsonl                      WinoGrande 1.1 dev (= winogrande_xl validation)
    arc_easy/ARC-Easy-Test.jsonl              ARC-Easy test
    arc_challenge/ARC-Challenge-Test.jsonl    ARC-Challenge test
    openbookqa/test.jsonl                     OpenBookQA main test

Every task's result records the files it read and their sha256, the number of items scored and in
the split, ``limit``, ``num_fewshot``, the metrics and the lm-eval version.

The headline mean of LoRAPrune's (and LLaMA's, LLM-Pruner's) zero-shot table is over
:data:`PAPER_TASKS` (PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA); :func:`paper_mean` computes
it. BoolQ is scored as an extra column, outside that mean.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os

import torch
import yaml

from ..data import portable_path
from .records import _model_dtype, _sha256_file, library_versions, model_name

# The tasks lm-eval runs for the usual LLM-Pruner / LoRAPrune table (needs the Hub or a datasets cache).
STANDARD_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

# The tasks that can be read from a local folder, in the order papers list them.
ZEROSHOT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

# The six tasks whose mean accuracy is the headline of the LoRAPrune / LLM-Pruner / LLaMA tables. BoolQ is
# reported beside them, not in the mean: a pruned model that flips from "no" to "yes" gains 20 points there.
PAPER_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

# The metric each task contributes to that table. LLM-Pruner (whose protocol and baseline rows LoRAPrune
# reuses) reports lm-eval's `acc` for BoolQ, PIQA, WinoGrande and ARC-e and the length-normalised `acc_norm`
# for HellaSwag, ARC-c and OpenBookQA; its published figures match that choice and no other (LLM-Pruner
# issue #25 reproduces its table both ways).
PAPER_METRICS = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
                 "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}

# Environment variable naming the zero-shot folder when no `zeroshot_dir` is passed.
ZEROSHOT_DIR_ENV = "LORAPRUNE_ZEROSHOT_DIR"

# Package data: one lm-eval task YAML per task of ZEROSHOT_TASKS, and their process_docs functions.
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
_TASKS_PACKAGE = __name__.rpartition(".")[0] + ".tasks"

# What each task's files must hold, for the error that names a missing or malformed file.
_FORMATS = {
    "boolq": "BoolQ validation in SuperGLUE form, one JSON object per line: question, passage (\"Title -- text\"), "
             "idx, label \"true\"/\"false\"",
    "piqa": "PIQA validation: valid.jsonl (one JSON object per line: goal, sol1, sol2) and valid-labels.lst "
            "(one 0/1 label per line, same order)",
    "hellaswag": "HellaSwag validation, one JSON object per line: activity_label, ctx (ctx_a and ctx_b joined), "
                 "endings (4 strings), label (0-3)",
    "winogrande": "WinoGrande 1.1 dev, one JSON object per line: sentence (with \"_\"), option1, option2, "
                  "answer \"1\"/\"2\"",
    "arc_easy": "ARC-Easy test, one JSON object per line: id, question {stem, choices [{text, label}]}, answerKey",
    "arc_challenge": "ARC-Challenge test, one JSON object per line: id, question {stem, choices [{text, label}]}, "
                     "answerKey",
    "openbookqa": "OpenBookQA main test, one JSON object per line: id, question {stem, choices [{text, label}]}, "
                  "answerKey",
}


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(
            "Zero-shot accuracy needs lm-evaluation-harness: `pip install 'loraprune-trainer[eval]'` "
            f"(or `pip install lm-eval`). Import failed with: {e}"
        ) from e
    return lm_eval, HFLM, TaskManager


def _task_manager(TaskManager, tasks: list[str], include_path: str | None):
    """A TaskManager that knows ``tasks``. Indexing lm-eval's thousands of built-in task files is slow,
    so a run whose tasks all live in ``include_path`` (or that has none to look up) skips them."""
    if include_path is not None:
        if not os.path.isdir(include_path):
            raise FileNotFoundError(f"Task folder {include_path!r} does not exist: pass a folder of lm-eval task "
                                    "YAML files as `include_path` (CLI: --task_dir).")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    elif not tasks:
        return TaskManager(include_defaults=False)
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"Unknown lm-eval task(s) {unknown}: use names from `lm-eval ls tasks` (e.g. "
                         f"{', '.join(STANDARD_TASKS)}) or pass the folder of your task YAML as `include_path`.")
    return manager


def _task_list(tasks: list[str] | str) -> list[str]:
    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    tasks = [t for t in tasks if t]
    if not tasks:
        raise ValueError("`tasks` is empty: pass lm-eval task names, e.g. \"piqa,arc_easy\".")
    return tasks


# -- the local suite ----------------------------------------------------------------------------------------
def resolve_zeroshot_dir(zeroshot_dir: str | None = None) -> tuple[str | None, str | None]:
    """The zero-shot folder to use and where it came from: ``(folder, "argument")`` when ``zeroshot_dir``
    is given, ``(folder, "env LORAPRUNE_ZEROSHOT_DIR")`` when only the environment variable is set
    (non-empty), ``(None, None)`` otherwise (the stock lm-eval tasks, read from the Hub)."""
    if zeroshot_dir:
        return os.path.abspath(os.path.expanduser(str(zeroshot_dir))), "argument"
    env = os.environ.get(ZEROSHOT_DIR_ENV, "").strip()
    if env:
        return os.path.abspath(os.path.expanduser(env)), f"env {ZEROSHOT_DIR_ENV}"
    return None, None


class _TaskYamlLoader(yaml.SafeLoader):
    """A YAML loader for the shipped task files: ``!function utils.f`` resolves to ``f`` of this package's
    ``tasks/utils.py`` (lm-eval's own loader resolves the same tag by file path, so the files stay valid
    lm-eval YAML)."""


def _function_constructor(loader: yaml.SafeLoader, node: yaml.Node):
    module, _, name = loader.construct_scalar(node).rpartition(".")
    if not module or "." in module:
        raise ValueError(f"`!function {node.value}`: expected MODULE.FUNCTION of a module in {TASKS_DIR}.")
    return getattr(importlib.import_module(f"{_TASKS_PACKAGE}.{module}"), name)


_TaskYamlLoader.add_constructor("!function", _function_constructor)


def _task_yaml(task: str) -> str:
    return os.path.join(TASKS_DIR, f"{task}.yaml")


def load_task_yaml(task: str) -> dict:
    """The shipped lm-eval task config of ``task`` (one of :data:`ZEROSHOT_TASKS`) as a dict, with its
    ``!function`` entries resolved and ``data_files`` still relative to a zero-shot folder."""
    if task not in ZEROSHOT_TASKS:
        raise ValueError(f"{task!r} is not a task of the local zero-shot suite {list(ZEROSHOT_TASKS)}.")
    path = _task_yaml(task)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The task file {path} is missing from the installed package: reinstall "
                                "loraprune-trainer (the task YAMLs are package data).")
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_TaskYamlLoader)  # noqa: S506 - our own SafeLoader subclass


def _task_files(config: dict) -> dict[str, str]:
    """``{role: path relative to the folder}`` of a task config: each split's data file, and the labels file."""
    files = {f"split:{split}": rel for split, rel in config["dataset_kwargs"]["data_files"].items()}
    labels = (config.get("metadata") or {}).get("labels_file")
    if labels:
        files["labels"] = labels
    return files


def expected_layout() -> str:
    """The files a zero-shot folder holds, one line per task, for help texts and error messages."""
    lines = []
    for task in ZEROSHOT_TASKS:
        files = " + ".join(_task_files(load_task_yaml(task)).values())
        lines.append(f"  {files:42s} {task}: {_FORMATS[task]}")
    return "\n".join(lines)


def _read_jsonl(path: str, task: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e}). {task} expects {_FORMATS[task]}.") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {n}: not a JSON object. {task} expects {_FORMATS[task]}.")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows. {task} expects {_FORMATS[task]}.")
    return rows


def local_task_config(task: str, zeroshot_dir: str) -> tuple[dict, dict]:
    """The lm-eval config dict of ``task`` reading the files of ``zeroshot_dir``, and the record of those files.

    Every file is checked before anything is scored: it must exist, parse, and convert to the official
    task's rows (the same ``process_docs`` lm-eval will apply). Errors name the file and what it must hold.

    Returns ``(config, data)``; ``config`` goes to lm-eval as an inline task config (``data_files``
    made absolute, PIQA's labels file bound to its ``process_docs``), ``data`` is
    ``{"source": "local files", "folder", "split", "files": {relative path: {"path", "sha256"}},
    "num_rows", "task_config"}``.
    """
    folder = os.path.abspath(os.path.expanduser(zeroshot_dir))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Zero-shot folder {folder!r} does not exist (from --zeroshot_dir / {ZEROSHOT_DIR_ENV}). Point it at a "
            f"folder that holds the tasks' upstream files:\n{expected_layout()}"
        )
    config = load_task_yaml(task)
    relative = _task_files(config)
    paths = {}
    for role, rel in relative.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Task {task!r} needs {path} in the zero-shot folder {folder} ({_FORMATS[task]}). Add the file, or "
                f"drop {task} from --tasks. The folder's expected layout:\n{expected_layout()}"
            )
        paths[role] = path

    splits = [role.split(":", 1)[1] for role in paths if role.startswith("split:")]
    if len(splits) != 1:  # each shipped task evaluates one split; a second would be scored as well
        raise ValueError(f"{_task_yaml(task)} names {len(splits)} data files; expected one evaluation split.")
    split = splits[0]
    config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": {split: paths[f"split:{split}"]}}
    # The data are local: nothing should be looked up on the Hub for this task.
    config.pop("dataset_name", None)

    rows = _read_jsonl(paths[f"split:{split}"], task)
    if "labels" in paths:
        # process_docs receives only the rows: bind the labels file it adds them from.
        config["process_docs"] = functools.partial(config["process_docs"], labels_file=paths["labels"])
    docs_path = paths[f"split:{split}"]
    try:
        docs = config["process_docs"](rows)  # the same conversion lm-eval runs, on the parsed file
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{docs_path}: a row lacks a field or has the wrong type ({type(e).__name__}: {e}). {task} "
                         f"expects {_FORMATS[task]}.") from e
    except ValueError as e:
        raise ValueError(f"{docs_path}: {e}" if docs_path not in str(e) else str(e)) from e

    data = {
        "source": "local files",
        "folder": portable_path(folder),
        "split": split,
        "files": {rel: {"path": portable_path(paths[role]), "sha256": _sha256_file(paths[role])}
                  for role, rel in relative.items()},
        "num_rows": len(docs),
        "task_config": portable_path(_task_yaml(task)),
    }
    return config, data


def local_task_configs(tasks: list[str] | str, zeroshot_dir: str | None = None,
                       num_fewshot: int = 0) -> tuple[dict[str, tuple[dict, dict]], str | None, str | None]:
    """:func:`local_task_config` for every task of ``tasks`` in :data:`ZEROSHOT_TASKS` when a zero-shot folder
    is set (``zeroshot_dir`` or ``LORAPRUNE_ZEROSHOT_DIR``); other tasks are left to lm-eval by name.

    Returns ``({task: (config, data)}, folder, folder_source)``; the dict is empty without a folder. Call it
    before loading a model so that a missing file fails first.
    """
    tasks = _task_list(tasks)
    folder, source = resolve_zeroshot_dir(zeroshot_dir)
    if folder is None:
        return {}, None, None
    if not os.path.isdir(folder):
        origin = "--zeroshot_dir" if source == "argument" else source
        raise FileNotFoundError(
            f"Zero-shot folder {folder!r} does not exist (from {origin}). Point it at a folder that holds the tasks' "
            f"upstream files:\n{expected_layout()}"
        )
    local = {t: local_task_config(t, folder) for t in tasks if t in ZEROSHOT_TASKS}
    if local and num_fewshot:
        # The folder holds the evaluation splits only: lm-eval would draw the examples from the split being
        # scored, which no published number does.
        raise ValueError(f"num_fewshot={num_fewshot} with local task files ({', '.join(local)}): the zero-shot folder "
                         "holds only the evaluation splits, so there is nothing to draw few-shot examples from. Use "
                         "num_fewshot=0, or the Hub tasks (unset --zeroshot_dir and LORAPRUNE_ZEROSHOT_DIR).")
    return local, folder, source


# -- the paper's table -------------------------------------------------------------------------------------
def paper_accuracy(task: str, entry: dict) -> float | None:
    """The accuracy of one task's result ``entry`` (a value of ``zero_shot(...)["tasks"]``) under the paper's
    metric for that task (:data:`PAPER_METRICS`; ``acc`` for tasks outside the table); None if absent."""
    value = entry.get(PAPER_METRICS.get(task, "acc"))
    return float(value) if isinstance(value, (int, float)) else None


def paper_mean(tasks: dict[str, dict]) -> dict:
    """The headline mean of LoRAPrune's zero-shot table over :data:`PAPER_TASKS`, from ``zero_shot(...)["tasks"]``.

    Returns ``{"mean": float or None, "stderr": float or None, "tasks": [...], "metrics": {task: metric},
    "missing": [...]}``. The mean is None unless all six tasks were scored (a mean over fewer tasks is not
    the table's number); ``stderr`` is the standard error of the mean, ``sqrt(sum(se_i^2)) / 6``, from the
    tasks' own standard errors. BoolQ never enters it.
    """
    values, errors, missing = [], [], []
    for task in PAPER_TASKS:
        entry = tasks.get(task)
        value = paper_accuracy(task, entry) if entry else None
        if value is None:
            missing.append(task)
            continue
        values.append(value)
        stderr = entry.get(f"{PAPER_METRICS[task]}_stderr")
        errors.append(float(stderr) if isinstance(stderr, (int, float)) else None)
    complete = not missing
    stderr = (sum(e * e for e in errors) ** 0.5 / len(errors)) if complete and None not in errors else None
    return {"mean": sum(values) / len(values) if complete else None, "stderr": stderr, "tasks": list(PAPER_TASKS),
            "metrics": {t: PAPER_METRICS[t] for t in PAPER_TASKS}, "missing": missing}


# -- evaluation ---------------------------------------------------------------------------------------------
def zero_shot(model, tokenizer, tasks: list[str] | str, include_path: str | None = None, num_fewshot: int = 0,
              batch_size: int = 8, limit: int | float | None = None, max_length: int | None = None,
              seed: int = 1234, zeroshot_dir: str | None = None, cache_dir: str | None = None) -> dict:
    """Zero-shot (or ``num_fewshot``-shot) accuracy of an in-memory ``model`` on lm-eval ``tasks``.

    ``model`` is a transformers model, a PEFT model or a masked model in training; it is wrapped in
    lm-eval's ``HFLM(pretrained=model, tokenizer=tokenizer)``, so nothing is reloaded. ``tasks`` are lm-eval
    names (``piqa``, ``hellaswag``, ... need the Hub or a datasets cache) or names of YAML tasks in
    ``include_path``. With a zero-shot folder (``zeroshot_dir``, or the ``LORAPRUNE_ZEROSHOT_DIR``
    environment variable) the tasks of :data:`ZEROSHOT_TASKS` are read from its files instead (see the
    module docstring). ``limit`` scores only the first ``limit`` items of each task (a float below 1: that
    fraction); it is recorded, and numbers with a limit are not the standard ones.

    ``cache_dir`` makes a long pass resumable: every scored request is written, as it is scored, to an
    SQLite file in that folder (lm-eval's ``use_cache``) named after the model's fingerprint (weights and
    tokenizer, :func:`~loraprune_trainer.evaluation.records.model_fingerprint`; the exact logits of a fixed
    probe, which see masks and other hooks; the context length), so another model never reads it. Run the same call again after an interruption and only the requests not yet
    scored are computed; a larger ``limit`` reuses the items a smaller one scored. A cached answer is the
    one computed earlier, in whatever batch it was computed.

    Returns ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "num_samples",
    "num_samples_total", "version", "protocol": {...}}}, "protocol": {...}}``; a task's ``protocol`` holds
    its data source (files and sha256 for local tasks), item counts, ``limit``, ``num_fewshot``, metrics
    and the lm-eval version.
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    tasks = _task_list(tasks)
    local, folder, folder_source = local_task_configs(tasks, zeroshot_dir, num_fewshot)
    manager = _task_manager(TaskManager, [t for t in tasks if t not in local], include_path)
    specs = [local[t][0] if t in local else t for t in tasks]

    modes = {m: m.training for m in model.modules()}
    lm = None
    try:
        model.eval()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        cache = _cache_record(model, tokenizer, lm, cache_dir) if cache_dir else None
        out = lm_eval.simple_evaluate(model=lm, tasks=specs, num_fewshot=num_fewshot, task_manager=manager,
                                      limit=limit, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed,
                                      use_cache=cache["prefix"] if cache else None)
    finally:
        for m, training in modes.items():
            m.training = training
        hook_db = getattr(getattr(lm, "cache_hook", None), "dbdict", None)
        if hook_db is not None:
            hook_db.close()  # lm-eval leaves its SQLite connection (and its thread) open

    lm_eval_version = library_versions().get("lm_eval")
    results = {}
    for name in tasks:
        metrics = out["results"].get(name, {})
        entry = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in metrics:
                entry[metric] = float(metrics[f"{metric},none"])
                stderr = metrics.get(f"{metric}_stderr,none")
                entry[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
        counts = out.get("n-samples", {}).get(name, {})
        entry["num_samples"] = counts.get("effective")
        entry["num_samples_total"] = counts.get("original")
        entry["version"] = out.get("versions", {}).get(name)
        config = out.get("configs", {}).get(name, {})
        if name in local:
            data = local[name][1]
        else:
            data = {"source": "lm-eval task", "dataset_path": config.get("dataset_path"),
                    "dataset_name": config.get("dataset_name"), "include_path": include_path}
        entry["protocol"] = {
            "task": name,
            "data": data,
            "num_items": entry["num_samples"],
            "num_items_total": entry["num_samples_total"],
            "limit": limit,
            "num_fewshot": num_fewshot,
            "metrics": [m["metric"] for m in config.get("metric_list") or [] if isinstance(m, dict) and "metric" in m],
            "output_type": config.get("output_type"),
            "task_version": entry["version"],
            "lm_eval": lm_eval_version,
        }
        results[name] = entry
    protocol = {
        "harness": "lm-evaluation-harness",
        "num_fewshot": num_fewshot,
        "limit": limit,
        "batch_size": batch_size,
        "max_length": lm.max_length,
        "add_bos_token": getattr(lm, "add_bos_token", None),
        "include_path": portable_path(include_path) if include_path else None,
        "zeroshot_dir": portable_path(folder),
        "zeroshot_dir_source": folder_source,
        "local_tasks": list(local),
        "seed": seed,
        "dtype": _model_dtype(model),
        "model": model_name(model),
        "versions": library_versions(),
    }
    if cache:
        protocol["cache"] = {"file": portable_path(cache["file"]), "model_fingerprint": cache["fingerprint"],
                             "requests_cached_before": cache["requests_cached_before"],
                             "requests_cached_after": _count_cached(cache["file"])}
    return {"tasks": results, "protocol": protocol}


def _cache_record(model, tokenizer, lm, cache_dir: str) -> dict:
    """Where the request cache of this model lives in ``cache_dir`` and how many answers it already holds.
    The file name carries the model's fingerprint and the context length: lm-eval keys cached answers by the
    request alone, so one file must never serve two models."""
    from .records import model_fingerprint

    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise NotADirectoryError(f"Zero-shot cache {cache_dir!r} is a file; pass a folder (it is created if missing).")
    os.makedirs(cache_dir, exist_ok=True)
    fingerprint = hashlib.sha256((model_fingerprint(model, tokenizer) + _probe_digest(model)).encode()).hexdigest()
    prefix = os.path.join(os.path.abspath(cache_dir), f"zeroshot-{fingerprint[:24]}-ctx{lm.max_length}")
    file = prefix + "_rank0.db"  # the suffix lm-eval appends (one process)
    return {"prefix": prefix, "file": file, "fingerprint": fingerprint,
            "requests_cached_before": _count_cached(file)}


@torch.no_grad()
def _probe_digest(model, length: int = 16) -> str:
    """sha256 of the exact logits of a fixed 16-token input: masks and other forward hooks change what a
    model computes without changing its weights, so the weights alone cannot key a cache of its outputs.
    Bitwise, so a different machine or thread count may miss the cache (and recompute), never reuse a
    wrong answer."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    ids = (torch.arange(length, device=device) * 7919 % config.vocab_size)[None]
    logits = model(input_ids=ids).logits
    return hashlib.sha256(logits.float().cpu().numpy().tobytes()).hexdigest()


def _count_cached(file: str) -> int:
    """Answers stored in an lm-eval request cache file (0 when it does not exist)."""
    if not os.path.isfile(file):
        return 0
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{file}?mode=ro", uri=True)) as conn:
        return conn.execute('SELECT COUNT(*) FROM "unnamed"').fetchone()[0]  # sqlitedict's default table
