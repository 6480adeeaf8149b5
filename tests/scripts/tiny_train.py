"""A deterministic LoRAPrune run on a tiny random model; dumps masks, scores and losses per rank.

Used in-process by tests (``make_trainer``) and as a script under
``accelerate launch --cpu --num_processes N tests/scripts/tiny_train.py --dump DIR ...``.
Every sample has the same token count, so no padding differs between batchings: one process with
per-device batch ``B`` and N processes with ``B / N`` see the same global batches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tests/tiny.py

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny import tiny_model, tiny_text_dataset, tiny_tokenizer  # noqa: E402

from loraprune_trainer import LoRAPruneConfig, LoRAPruneTrainer  # noqa: E402


def make_trainer(output_dir: str, max_steps: int = 12, per_device_batch: int = 4, grad_accum: int = 2,
                 prune_freq: int = 2, pruning_ratio: float = 0.5, save_steps: int | None = None,
                 report_to: str = "none", arch: str = "llama-gqa", model=None, eval_dataset=None, num_layers: int = 2,
                 lora_modules_to_save: list[str] | None = None, **extra):
    """A LoRAPruneTrainer over 64 fixed samples of 24 tokens (lr 1e-3 so masks follow the data)."""
    args = LoRAPruneConfig(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=grad_accum, prune_freq=prune_freq, pruning_ratio=pruning_ratio,
        use_cpu=True, bf16=False, report_to=report_to, logging_steps=1, learning_rate=1e-3, max_length=32,
        gradient_checkpointing=False, seed=0, data_seed=0, dataloader_drop_last=True,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, disable_tqdm=True, **extra,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                      modules_to_save=lora_modules_to_save)
    return LoRAPruneTrainer(model if model is not None else tiny_model(arch, num_layers=num_layers), args,
                            train_dataset=tiny_text_dataset(64), eval_dataset=eval_dataset,
                            processing_class=tiny_tokenizer(), peft_config=lora)


def dump(trainer, folder: str) -> None:
    """``rank{r}.safetensors`` (keep masks as uint8, scores) and ``rank{r}.json`` (losses, mismatches)."""
    rank = trainer.args.process_index
    os.makedirs(folder, exist_ok=True)
    state = trainer.pruning_state
    tensors = {f"keep.{n}": k.to(torch.uint8) for n, k in state.keep.items()}
    tensors.update({f"scores.{n}": s.clone() for n, s in state.scores.items()})
    tensors.update({"keep.layers": state.layer_keep.to(torch.uint8), "scores.layers": state.layer_scores.clone()})
    compensation = getattr(trainer, "compensation_callback", None)
    if compensation is not None:  # the refitted base weights, which every rank must share
        from loraprune_trainer.compensation import consumer_name, consumer_tensors

        names = [consumer_name(g) for g in trainer.structure.groups()]
        tensors.update({f"consumer.{k}": v for k, v in consumer_tensors(trainer.structure, names).items()})
    save_file(tensors, os.path.join(folder, f"rank{rank}.safetensors"))
    losses = {int(h["step"]): h["loss"] for h in trainer.state.log_history if "loss" in h}
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": trainer.args.world_size, "losses": losses,
                   "rank_mismatches": trainer.pruning_callback.rank_mismatches,
                   "num_score_updates": state.num_score_updates,
                   "compensation_history": compensation.history if compensation is not None else []}, f)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dump", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_steps", type=int, default=12)
    p.add_argument("--per_device_batch", type=int, default=4)
    p.add_argument("--grad_accum", type=int, default=2)
    p.add_argument("--prune_freq", type=int, default=2)
    p.add_argument("--criterion", default="lora")
    p.add_argument("--distill_alpha", type=float, default=0.0)
    p.add_argument("--compensation", default="none")
    p.add_argument("--compensation_batches", type=int, default=8)
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--layer_pruning_ratio", type=float, default=0.0)
    p.add_argument("--layer_criterion", default="taylor_gate")
    p.add_argument("--export", default=None, help="Also write the compact model here (save_pruned_model).")
    a = p.parse_args()
    trainer = make_trainer(a.output_dir, a.max_steps, a.per_device_batch, a.grad_accum, a.prune_freq,
                           pruning_criterion=a.criterion, distill_alpha=a.distill_alpha, compensation=a.compensation,
                           compensation_batches=a.compensation_batches, num_layers=a.num_layers,
                           layer_pruning_ratio=a.layer_pruning_ratio, layer_criterion=a.layer_criterion)
    trainer.train()
    dump(trainer, a.dump)
    if a.export:
        trainer.save_pruned_model(a.export)


if __name__ == "__main__":
    main()
