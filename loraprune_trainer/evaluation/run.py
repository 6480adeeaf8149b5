"""Whole evaluations: perplexity on several datasets (and zero-shot tasks) for one model, in memory or
loaded from a folder."""

from __future__ import annotations

import json
import os

import torch

from .ppl import load_texts, perplexity
from .records import write_result
from .zeroshot import _import_lm_eval, local_task_configs, zero_shot


def evaluate_model(model, tokenizer, datasets: list[str] | dict[str, str] | None = None,
                   protocol: str = "llm-pruner", tasks: list[str] | str | None = None, task_dir: str | None = None,
                   num_fewshot: int = 0, limit: int | float | None = None, texts: dict | None = None,
                   zeroshot_dir: str | None = None, zeroshot_cache: str | None = None,
                   **perplexity_kwargs) -> dict:
    """Perplexity on every dataset (and optionally lm-eval ``tasks``) for an in-memory model.

    Returns ``{"perplexity": {name: perplexity(...) result}, "zero_shot": zero_shot(...) result or None}``.
    ``texts`` (from :func:`load_texts`) skips reloading the datasets. ``zeroshot_dir`` (default: the
    ``LORAPRUNE_ZEROSHOT_DIR`` environment variable) reads the suite's tasks from local files; see
    :func:`~loraprune_trainer.evaluation.zeroshot.zero_shot`; ``zeroshot_cache`` is its ``cache_dir`` (a
    folder that makes an interrupted zero-shot pass resumable).
    """
    texts = texts if texts is not None else load_texts(datasets or [])
    out = {"perplexity": {}, "zero_shot": None}
    for name, (text, meta) in texts.items():
        out["perplexity"][name] = perplexity(model, tokenizer, text, protocol=protocol,
                                             metadata={"name": name, **meta}, **perplexity_kwargs)
    if tasks:
        batch_size = perplexity_kwargs.get("batch_size", 8)
        out["zero_shot"] = zero_shot(model, tokenizer, tasks, include_path=task_dir, num_fewshot=num_fewshot,
                                     batch_size=batch_size, limit=limit, zeroshot_dir=zeroshot_dir,
                                     cache_dir=zeroshot_cache)
    return out


def evaluate_folder(path: str, datasets: list[str] | dict[str, str] | None = None, protocol: str = "llm-pruner",
                    gguf_file: str | None = None, dtype: str | torch.dtype | None = None, device: str | None = None,
                    tasks: list[str] | str | None = None, task_dir: str | None = None, out: str | None = None,
                    zeroshot_dir: str | None = None, **kwargs) -> dict:
    """Load a model folder (e.g. a pruned model written by ``save_pruned_model``), a Hub id, a GGUF file or
    ``"smollm2-gguf"`` with stock ``AutoModelForCausalLM.from_pretrained`` and evaluate it with
    :func:`evaluate_model`. The datasets and the zero-shot folder's files are read first, so a missing file
    fails before the model loads. ``out`` writes the result with :func:`write_result`. Returns the result,
    with a ``"model"`` entry (source, parameter count, and the folder's ``pruning_report.json`` summary if
    it has one)."""
    from ..loading import load_model_and_tokenizer

    texts = load_texts(datasets or [])
    if tasks:
        _import_lm_eval()  # fail before the model loads, not after
        local_task_configs(tasks, zeroshot_dir, kwargs.get("num_fewshot", 0))  # same: a bad folder or file
    model, tokenizer = load_model_and_tokenizer(path, gguf_file=gguf_file, dtype=dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    result = evaluate_model(model, tokenizer, protocol=protocol, tasks=tasks, task_dir=task_dir, texts=texts,
                            zeroshot_dir=zeroshot_dir, **kwargs)
    info = {"source": path, "gguf_file": gguf_file, "requested_dtype": str(dtype) if dtype is not None else None,
            "num_parameters": sum(p.numel() for p in model.parameters())}
    report = os.path.join(path, "pruning_report.json") if os.path.isdir(path) else None
    if report and os.path.isfile(report):
        with open(report, encoding="utf-8") as f:
            pruning = json.load(f)
        info["pruning_report"] = {"parameters": pruning.get("parameters"), "settings": pruning.get("settings")}
    result = {"model": info, **result}
    if out:
        write_result(out, result)
    return result
