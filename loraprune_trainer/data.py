"""Training data from a Hub name or a local file, in one of the forms SFTTrainer understands, and where
local data files are found.

A data file may be named by a path, or by its path inside a data folder (``c4/c4_train_sample.jsonl``).
:func:`resolve_data_path` looks for it in this order: the path as given (absolute, or relative to the
working directory), then ``$LORAPRUNE_DATA_DIR``, then the ``data/`` folder shipped with a source checkout
of this project (the few small files its README commands need; ``data/SHA256SUMS`` lists them).
"""

from __future__ import annotations

import os

from datasets import Dataset, load_dataset

# Environment variable naming a data folder (laid out as wikitext-2-raw/, ptb/, c4/, zeroshot/).
DATA_DIR_ENV = "LORAPRUNE_DATA_DIR"
# The checksum list that marks the shipped data folder (a `data/` beside the package in a source checkout).
_SHIPPED_MARKER = "SHA256SUMS"


def shipped_data_dir() -> str | None:
    """The ``data/`` folder of a source checkout (next to the package), or None when not installed from one."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
    return folder if os.path.isfile(os.path.join(folder, _SHIPPED_MARKER)) else None


def data_roots() -> list[tuple[str, str]]:
    """``[(folder, label)]`` searched for data files named relative to a data folder, in order:
    ``$LORAPRUNE_DATA_DIR`` (when set), then the shipped ``data/``."""
    roots = []
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        roots.append((os.path.abspath(os.path.expanduser(env)), f"${DATA_DIR_ENV}"))
    shipped = shipped_data_dir()
    if shipped:
        roots.append((shipped, "data"))
    return roots


def resolve_data_path(name_or_path: str) -> str | None:
    """The local file or folder that ``name_or_path`` names, or None (then it may be a Hub name).

    Tried in order: the path itself (``~`` and ``$VARS`` expanded), ``$LORAPRUNE_DATA_DIR/<name>``, and the
    shipped ``data/<name>``.
    """
    path = os.path.expandvars(os.path.expanduser(name_or_path))
    if os.path.exists(path):
        return path
    if os.path.isabs(path) or "$" in path:
        return None
    for root, _ in data_roots():
        candidate = os.path.join(root, path)
        if os.path.exists(candidate):
            return candidate
    return None


def searched_locations(name_or_path: str) -> str:
    """Where :func:`resolve_data_path` looked, for error messages."""
    places = [repr(name_or_path)]
    if not os.path.isabs(name_or_path):
        places += [f"{label}/{name_or_path}" for _, label in data_roots()]
        if not os.environ.get(DATA_DIR_ENV, "").strip():
            places.append(f"(${DATA_DIR_ENV} is not set)")
    return ", ".join(places)


def portable_path(path: str | None) -> str | None:
    """``path`` as recorded in result files: relative to the data folder it lies in (``$LORAPRUNE_DATA_DIR/...``
    or ``data/...``), to the installed package (``loraprune_trainer/...``), to its ``site-packages``
    (``<site-packages>/...``), or to the working directory; never the machine's absolute path."""
    if not path:
        return path
    path = os.path.abspath(os.path.expanduser(str(path)))
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root, label in data_roots():
        if _is_within(path, root):
            return _join_label(label, os.path.relpath(path, root))
    if _is_within(path, os.path.join(package_parent, "loraprune_trainer")):
        return os.path.relpath(path, package_parent)
    parts = path.split(os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return _join_label("<site-packages>", os.sep.join(parts[len(parts) - parts[::-1].index(marker):]))
    return os.path.relpath(path)


def _is_within(path: str, root: str) -> bool:
    root = os.path.abspath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _join_label(label: str, relative: str) -> str:
    return label if relative == "." else f"{label}/{relative}"

# extension -> datasets builder
_BUILDERS = {".txt": "text", ".raw": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
             ".csv": "csv"}

FORMS = ("text", "prompt/completion", "messages", "instruction/input/output")


def load_training_dataset(name_or_path: str, config: str | None = None, split: str = "train",
                          max_samples: int | None = None, text_field: str = "text") -> Dataset:
    """A ``datasets.Dataset`` in plain-text (``text``), prompt/completion or chat (``messages``) form.

    ``name_or_path`` is a Hub dataset name, a local folder, or a file (found by :func:`resolve_data_path`:
    as given, under ``$LORAPRUNE_DATA_DIR``, or in the shipped ``data/``; .txt/.raw: one example per
    non-empty line; .json/.jsonl/.parquet/.csv: one per row). Alpaca-style rows
    (instruction/input/output) become prompt/completion pairs.
    """
    path = resolve_data_path(name_or_path) or os.path.expandvars(os.path.expanduser(name_or_path))
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in _BUILDERS:
            raise ValueError(f"Unsupported dataset file type {ext!r} for {path}: use one of {sorted(_BUILDERS)}.")
        dataset = load_dataset(_BUILDERS[ext], data_files=path, split="train")
    elif os.path.isdir(path):
        dataset = load_dataset(path, config, split=split)
    elif _looks_like_a_path(name_or_path):
        raise FileNotFoundError(f"Dataset file or folder {name_or_path!r} not found (looked in "
                                f"{searched_locations(name_or_path)}). Pass an existing file, or set {DATA_DIR_ENV} "
                                "to the data folder that holds it.")
    else:
        try:
            dataset = load_dataset(name_or_path, config, split=split)
        except Exception as err:  # offline, unknown name, ...
            raise FileNotFoundError(
                f"Could not load dataset {name_or_path!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
                "Pass a local file (.txt, .json, .jsonl, .parquet, .csv) or folder instead."
            ) from err
    if "text" in dataset.column_names and dataset.column_names and dataset.features["text"].dtype == "string":
        dataset = dataset.filter(lambda row: bool(row["text"] and row["text"].strip()))
    dataset = to_sft_form(dataset, text_field)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"Dataset {name_or_path!r} has no examples.")
    return dataset


def _looks_like_a_path(name: str) -> bool:
    """A file name (known extension) or an explicit path; "allenai/c4" is a Hub name, "c4/x.jsonl" a file."""
    return name.startswith((".", "$", "~", os.sep)) or os.path.splitext(name)[1].lower() in _BUILDERS


def to_sft_form(dataset: Dataset, text_field: str = "text") -> Dataset:
    """Keep only the columns of one SFT form; convert instruction/input/output rows to prompt/completion."""
    cols = set(dataset.column_names)
    if text_field in cols:
        keep = [text_field]
    elif {"prompt", "completion"} <= cols:
        keep = ["prompt", "completion"]
    elif "messages" in cols:
        keep = ["messages"]
    elif {"instruction", "output"} <= cols:
        def to_prompt(row):
            extra = (row.get("input") or "").strip()
            prompt = row["instruction"].strip() + (f"\n\n{extra}" if extra else "")
            return {"prompt": prompt + "\n\n", "completion": row["output"]}

        return dataset.map(to_prompt, remove_columns=dataset.column_names)
    else:
        raise ValueError(
            f"Dataset columns {sorted(cols)} match no supported form {FORMS}: add a `{text_field}` column (or set "
            "`dataset_text_field`), or use prompt/completion, messages, or instruction/input/output columns."
        )
    return dataset.remove_columns([c for c in dataset.column_names if c not in keep])
