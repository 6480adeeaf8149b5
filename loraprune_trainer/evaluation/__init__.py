"""Perplexity and zero-shot evaluation with the protocol recorded next to every number.

- :mod:`.ppl`: :func:`perplexity` under a named protocol (``PROTOCOLS``), :func:`load_text` /
  :func:`load_texts` for local files or the Hub.
- :mod:`.zeroshot`: :func:`zero_shot` through lm-evaluation-harness, with the commonsense suite
  (boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa) readable from a local folder,
  and :func:`paper_mean`, the headline mean of the paper's table (:data:`PAPER_TASKS`, BoolQ outside it).
- :mod:`.records`: :func:`write_result` (atomic, refuses a perplexity without its protocol) and
  :func:`library_versions`.
- :mod:`.run`: :func:`evaluate_model` / :func:`evaluate_folder`, several datasets and tasks at once.
- :mod:`.cli`: ``python -m loraprune_trainer.eval`` / ``loraprune-eval`` (:func:`main`).

Everything is importable from ``loraprune_trainer.evaluation`` as it was when this was one module.
"""

from __future__ import annotations

from .ppl import HUB_DATASETS, PROTOCOLS, load_text, load_texts, parse_dataset_specs, perplexity
from .records import library_versions, write_result
from .run import evaluate_folder, evaluate_model
from .zeroshot import (PAPER_METRICS, PAPER_TASKS, STANDARD_TASKS, ZEROSHOT_DIR_ENV, ZEROSHOT_TASKS, local_task_config,
                       local_task_configs, paper_accuracy, paper_mean, resolve_zeroshot_dir, zero_shot)


def main(argv: list[str] | None = None) -> dict:
    """Console entry point ``loraprune-eval``; see :mod:`loraprune_trainer.eval`."""
    # Imported here: the CLI pulls in transformers' argument parser, which library users do not need.
    from .cli import main as cli_main

    return cli_main(argv)


__all__ = [
    "HUB_DATASETS",
    "PAPER_METRICS",
    "PAPER_TASKS",
    "PROTOCOLS",
    "STANDARD_TASKS",
    "ZEROSHOT_DIR_ENV",
    "ZEROSHOT_TASKS",
    "evaluate_folder",
    "evaluate_model",
    "library_versions",
    "load_text",
    "load_texts",
    "local_task_config",
    "local_task_configs",
    "main",
    "paper_accuracy",
    "paper_mean",
    "parse_dataset_specs",
    "perplexity",
    "resolve_zeroshot_dir",
    "write_result",
    "zero_shot",
]
