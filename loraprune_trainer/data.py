"""Training data from a Hub name or a local file, in one of the forms SFTTrainer understands."""

from __future__ import annotations

import os

from datasets import Dataset, load_dataset

# extension -> datasets builder
_BUILDERS = {".txt": "text", ".raw": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
             ".csv": "csv"}

FORMS = ("text", "prompt/completion", "messages", "instruction/input/output")


def load_training_dataset(name_or_path: str, config: str | None = None, split: str = "train",
                          max_samples: int | None = None, text_field: str = "text") -> Dataset:
    """A ``datasets.Dataset`` in plain-text (``text``), prompt/completion or chat (``messages``) form.

    ``name_or_path`` is a Hub dataset name, a local folder, or a file (.txt/.raw: one example per
    non-empty line; .json/.jsonl/.parquet/.csv: one per row). Alpaca-style rows
    (instruction/input/output) become prompt/completion pairs.
    """
    path = os.path.expandvars(os.path.expanduser(name_or_path))
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in _BUILDERS:
            raise ValueError(f"Unsupported dataset file type {ext!r} for {path}: use one of {sorted(_BUILDERS)}.")
        dataset = load_dataset(_BUILDERS[ext], data_files=path, split="train")
    elif os.path.isdir(path):
        dataset = load_dataset(path, config, split=split)
    elif os.path.sep in name_or_path or name_or_path.startswith((".", "$", "~")):
        raise FileNotFoundError(f"Dataset file or folder {path!r} does not exist.")
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
