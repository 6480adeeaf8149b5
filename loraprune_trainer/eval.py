"""Command line: perplexity (and optional zero-shot accuracy) of a model, written as JSON.

    python -m loraprune_trainer.eval --model PRUNED_FOLDER \\
        --datasets wikitext2=wiki.test.raw ptb=ptb.valid.txt --protocol llm-pruner --out results.json

    python -m loraprune_trainer.eval --model PRUNED_FOLDER \\
        --tasks boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa --zeroshot_dir /path/to/zeroshot

The implementation is :mod:`loraprune_trainer.evaluation.cli` (``--help`` lists every flag); this module
keeps ``python -m loraprune_trainer.eval`` and its imports working.
"""

from __future__ import annotations

from .evaluation.cli import EvalArguments, main, make_parser

__all__ = ["EvalArguments", "main", "make_parser"]

if __name__ == "__main__":
    main()
