"""Command line: perplexity (and optional zero-shot accuracy) of a model, written as JSON.

    python -m loraprune_trainer.eval --model PRUNED_FOLDER \\
        --datasets wikitext2=wiki.test.raw ptb=ptb.valid.txt --protocol llm-pruner --out results.json

    python -m loraprune_trainer.eval --model PRUNED_FOLDER \\
        --tasks boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa --zeroshot_dir /path/to/zeroshot

``--model`` is a folder (e.g. written by ``save_pruned_model``), a Hub id, a ``.gguf`` file, or
``smollm2-gguf`` (the embedded SmolLM2-135M-Instruct). Every dataset and zero-shot file is checked before
the model loads. ``--tasks piqa,arc_easy`` adds lm-eval zero-shot accuracy (needs ``lm-eval``); with
``--zeroshot_dir`` (or ``LORAPRUNE_ZEROSHOT_DIR``) the suite's tasks are read from local files.
``loraprune-eval`` is the same command.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from .ppl import PROTOCOLS
from .run import evaluate_folder
from .zeroshot import paper_mean


@dataclass
class EvalArguments:
    """Arguments of ``python -m loraprune_trainer.eval``.

    Model:
        model: folder, Hub id, ``.gguf`` file, or ``smollm2-gguf``.
        gguf_file: GGUF file name inside ``model`` (a folder or Hub repo).
        dtype: weights dtype (``float32``, ``bfloat16``, ``float16``); default: what ``from_pretrained`` gives.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...; default: cuda if available.

    Perplexity:
        datasets: ``NAME=FILE`` (a .raw/.txt/.jsonl/.json file or a folder) or a Hub name (wikitext2, ptb).
        protocol: ``llm-pruner`` (128-token windows) or ``full-context`` (model context, capped at 2048).
        window / stride: override the protocol's window (recorded as an override).
        max_windows: score only the first N windows of each dataset (quick runs; recorded).
        batch_size: windows per forward pass (also lm-eval's batch size).

    Zero-shot:
        tasks: comma-separated lm-eval tasks (boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge,
            openbookqa, ...).
        zeroshot_dir: folder of the suite's upstream files (boolq/val.jsonl, piqa/valid.jsonl, ...); its tasks
            are then read from it instead of the Hub. Default: ``$LORAPRUNE_ZEROSHOT_DIR``.
        task_dir: a folder of extra lm-eval task YAML files.
        num_fewshot / limit: lm-eval's few-shot count and the first-N-items cap per task (recorded).
        zeroshot_cache: a folder where every scored request is stored as it is scored, so that the same command
            run again after an interruption computes only what is missing (one file per model fingerprint).

    Output:
        out: JSON file for the results (written atomically); printed to stdout as well.
    """

    model: str = field(metadata={"help": "Model folder, Hub id, .gguf file, or `smollm2-gguf`."})
    datasets: list[str] = field(default_factory=list, metadata={
        "help": "Datasets as NAME=FILE (file or folder) or Hub names (wikitext2, ptb)."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside --model."})
    protocol: str = field(default="llm-pruner", metadata={"help": "Perplexity protocol.",
                                                          "choices": sorted(PROTOCOLS)})
    window: int | None = field(default=None, metadata={"help": "Override the protocol's window (tokens)."})
    stride: int | None = field(default=None, metadata={"help": "Window stride (default: the window)."})
    max_windows: int | None = field(default=None, metadata={"help": "Score only the first N windows."})
    batch_size: int = field(default=8, metadata={"help": "Windows per forward pass."})
    dtype: str | None = field(default=None, metadata={"help": "Weights dtype.",
                                                      "choices": ["float32", "bfloat16", "float16", "auto"]})
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda if available, else cpu)."})
    tasks: str | None = field(default=None, metadata={"help": "Comma-separated lm-eval tasks."})
    zeroshot_dir: str | None = field(default=None, metadata={
        "help": "Folder of the zero-shot suite's local files (boolq/, piqa/, hellaswag/, winogrande/, arc_easy/, "
                "arc_challenge/, openbookqa/); default: $LORAPRUNE_ZEROSHOT_DIR. Without either, tasks come from the Hub."})
    task_dir: str | None = field(default=None, metadata={"help": "Folder of extra lm-eval task YAML files."})
    num_fewshot: int = field(default=0, metadata={"help": "Few-shot examples for lm-eval tasks."})
    limit: float | None = field(default=None, metadata={"help": "Score only the first N items of each task."})
    zeroshot_cache: str | None = field(default=None, metadata={
        "help": "Folder caching every scored zero-shot request as it is scored (one file per model fingerprint): "
                "rerun the same command after an interruption and only the rest is computed."})
    out: str | None = field(default=None, metadata={"help": "Write the results JSON here."})
    no_progress: bool = field(default=False, metadata={"help": "Hide progress bars."})

    def __post_init__(self):
        if not self.datasets and not self.tasks:
            raise ValueError("Nothing to evaluate: pass `--datasets wikitext2=FILE ...` and/or `--tasks piqa,...`.")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"`max_windows` must be at least 1, got {self.max_windows}.")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"`limit` must be positive (N items, or a fraction below 1), got {self.limit}.")
        if self.limit is not None and self.limit >= 1:
            self.limit = int(self.limit)  # lm-eval reads an integer as a count, a float < 1 as a fraction


def make_parser() -> HfArgumentParser:
    """The argument parser of ``python -m loraprune_trainer.eval`` (fields of :class:`EvalArguments`)."""
    return HfArgumentParser(EvalArguments)


def main(argv: list[str] | None = None) -> dict:
    """Run ``python -m loraprune_trainer.eval`` / ``loraprune-eval`` with ``argv`` (default: ``sys.argv``);
    prints a summary as JSON and returns the full result."""
    (args,) = make_parser().parse_args_into_dataclasses(args=argv)
    result = evaluate_folder(
        args.model, datasets=args.datasets, protocol=args.protocol, gguf_file=args.gguf_file, dtype=args.dtype,
        device=args.device, tasks=args.tasks, task_dir=args.task_dir, zeroshot_dir=args.zeroshot_dir, out=args.out,
        num_fewshot=args.num_fewshot, limit=args.limit, zeroshot_cache=args.zeroshot_cache, window=args.window,
        stride=args.stride, batch_size=args.batch_size, max_windows=args.max_windows,
        show_progress=not args.no_progress,
    )
    summary = {name: round(r["perplexity"], 4) for name, r in result["perplexity"].items()}
    if result["zero_shot"]:
        for task, r in result["zero_shot"]["tasks"].items():
            summary.update({f"{task}/{m}": r[m] for m in ("acc", "acc_norm") if m in r})
            summary[f"{task}/num_items"] = r.get("num_samples")
        table = paper_mean(result["zero_shot"]["tasks"])
        if table["mean"] is not None:  # the headline of the paper's table: its six tasks, BoolQ outside
            summary["paper_mean"] = table["mean"]
            summary["paper_mean_metrics"] = table["metrics"]
    json.dump({"protocol": args.protocol, **summary}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
