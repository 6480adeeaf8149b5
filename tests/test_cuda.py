"""Checks that need a CUDA GPU: deselected by default (pyproject's `-m 'not cuda'`), run by
scripts/gpu_check.sh with `pytest -m cuda`. On GPUs the kernels, dtypes and reduction orders differ from
the CPU ones every other test uses."""

import pytest
import torch
from peft import LoraConfig
from tiny import VOCAB, tiny_model, tiny_text_dataset, tiny_tokenizer
from transformers import AutoModelForCausalLM

from loraprune_trainer import LoRAPruneConfig, LoRAPruneTrainer

pytestmark = pytest.mark.cuda


def _require_cuda():
    if not torch.cuda.is_available():
        pytest.fail("selected with -m cuda on a machine without CUDA: run scripts/gpu_check.sh on a GPU")


@pytest.mark.parametrize("criterion", ["lora", "taylor_gate"])
@pytest.mark.parametrize("layers", [0.0, 0.5])
def test_bf16_training_on_cuda_exports_what_the_masked_model_computes(tmp_path, criterion, layers):
    _require_cuda()
    args = LoRAPruneConfig(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=4,
                           learning_rate=1e-3, bf16=True, report_to="none", save_strategy="no", max_length=32,
                           prune_freq=2, pruning_ratio=0.5, layer_pruning_ratio=layers, pruning_criterion=criterion,
                           disable_tqdm=True, seed=0)
    trainer = LoRAPruneTrainer(model=tiny_model("llama-gqa", num_layers=4), args=args,
                               train_dataset=tiny_text_dataset(64), processing_class=tiny_tokenizer(),
                               peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      task_type="CAUSAL_LM"))
    trainer.train()
    assert next(trainer.model.parameters()).is_cuda
    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5)).cuda()
    trainer.model.eval()
    with torch.no_grad():
        masked = trainer.model(input_ids=ids).logits.float()
    trainer.save_pruned_model(str(tmp_path / "pruned"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned")).cuda().eval()
    with torch.no_grad():
        compact = reloaded(input_ids=ids).logits.float()
    assert (compact - masked).abs().max() < 1e-3  # both float32 weights on the GPU (TF32 may be on)
    assert trainer.pruning_state.num_pruned_layers() == (2 if layers else 0)


def test_quantized_nf4_base_trains_on_cuda(tmp_path):
    _require_cuda()
    pytest.importorskip("bitsandbytes", reason="the `quant` extra")
    from transformers import BitsAndBytesConfig

    folder = tmp_path / "base"
    tiny_model("llama-gqa", hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
               intermediate_size=128).save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    args = LoRAPruneConfig(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4,
                           learning_rate=1e-3, bf16=True, report_to="none", save_strategy="no", max_length=32,
                           prune_freq=2, pruning_ratio=0.5, pruning_criterion="taylor_gate", disable_tqdm=True)
    trainer = LoRAPruneTrainer(model=model, args=args, train_dataset=tiny_text_dataset(32),
                               processing_class=tiny_tokenizer(),
                               peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      task_type="CAUSAL_LM"))
    trainer.train()
    report = trainer.save_pruned_model(str(tmp_path / "pruned"))
    assert report["parameters"]["model_after"] < report["parameters"]["model_before"]
