"""LoRAPruneTrainer end to end on tiny models, config validation, and preflight errors."""

import json
import os

import pytest
import torch
from peft import LoraConfig
from tiny import VOCAB, tiny_model, tiny_text_dataset, tiny_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, TrainerCallback

from loraprune_trainer import LoRAPruneConfig, LoRAPruneTrainer, UnsupportedModelError, load_masked_model

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def make_args(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "run"), pruning_ratio=0.5, prune_freq=2, max_steps=16,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3, use_cpu=True,
        bf16=False, logging_steps=4, report_to="none", save_strategy="no", max_length=32, seed=0,
        activation_checkpointing=False, dataloader_num_workers=0,
    )
    base.update(overrides)
    return LoRAPruneConfig(**base)


class RecordLogs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def make_trainer(tmp_path, arch="llama-gqa", lora=None, **overrides):
    recorder = RecordLogs()
    trainer = LoRAPruneTrainer(
        model=tiny_model(arch), args=make_args(tmp_path, **overrides), train_dataset=tiny_text_dataset(),
        processing_class=tiny_tokenizer(), peft_config=LoraConfig(**(lora or LORA)), callbacks=[recorder],
    )
    return trainer, recorder


@pytest.mark.parametrize("arch,unit,checkpointing", [("llama-gqa", "kv_group", False),
                                                    ("qwen2-gqa", "query_head", True),
                                                    ("llama-mha", "kv_group", True)])
def test_trainer_prunes_to_target_exports_and_reloads(tmp_path, arch, unit, checkpointing):
    trainer, recorder = make_trainer(tmp_path, arch, attention_unit=unit, activation_checkpointing=checkpointing)
    trainer.train()

    state = trainer.pruning_state
    for name, count in trainer.final_prune_counts.items():
        assert state.num_pruned(name) == count > 0, name
    assert state.num_score_updates > 0
    logged = [log for log in recorder.logs if "loss" in log]
    assert logged and all("prune/params" in log and "prune/mlp_sparsity" in log for log in logged)
    # 0.5 asked; kept channels rounded down to a multiple of 8 (the default width_multiple) remove a bit more
    achieved = trainer.target_summary()["mlp_achieved_ratio"]
    assert 0.5 <= achieved < 0.7 and logged[-1]["prune/mlp_sparsity"] == pytest.approx(achieved)
    assert (trainer.target_summary()["mlp_channels_per_layer"] - trainer.final_prune_counts["layers.0.mlp"]) % 8 == 0
    assert logged[0]["prune/params"] >= logged[-1]["prune/params"]

    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    trainer.model.eval()
    with torch.no_grad():
        masked = trainer.model(input_ids=ids).logits
    out = tmp_path / "pruned"
    report = trainer.save_pruned_model(str(out))
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # stock transformers, no extra code
    with torch.no_grad():
        compact = reloaded(input_ids=ids).logits
    assert (compact - masked).abs().max() < 1e-4

    on_disk = json.loads((out / "pruning_report.json").read_text())
    assert on_disk["parameters"]["model_after"] == sum(p.numel() for p in reloaded.parameters())
    assert on_disk["parameters"] == report["parameters"]
    assert on_disk["settings"]["pruning_ratio"] == 0.5 and len(on_disk["layers"]) == 2
    assert os.path.exists(out / "tokenizer.json") or os.path.exists(out / "tokenizer_config.json")
    assert logged[-1]["prune/params"] == report["parameters"]["model_after"]


def test_gradient_accumulation_scores_see_whole_step(tmp_path):
    """Scores are taken once per optimizer step, after the last micro-batch."""
    trainer, _ = make_trainer(tmp_path, max_steps=6, gradient_accumulation_steps=3, pruning_warmup_ratio=0.5,
                              pruning_cooldown_ratio=0.0)
    trainer.train()
    assert trainer.pruning_state.num_score_updates == 6


def test_packed_training_text_prunes_on_full_chunks(tmp_path):
    """TRL's `wrapped` packing (the recipe study's token-budget runs use it): every training row is a full
    `max_length` chunk of the concatenated texts, so text past a document's first `max_length` tokens trains
    too, and pruning proceeds as it does unpacked."""
    texts = tiny_text_dataset(n=32, length=40)  # 40 words: longer than max_length 32, truncation would drop some
    tokens = sum(len(ids) for ids in tiny_tokenizer()(list(texts["text"]))["input_ids"])
    trainer = LoRAPruneTrainer(
        model=tiny_model("llama-gqa"), processing_class=tiny_tokenizer(), peft_config=LoraConfig(**LORA),
        train_dataset=texts, args=make_args(tmp_path, max_steps=6, gradient_accumulation_steps=1, packing=True,
                                            packing_strategy="wrapped"))
    rows = trainer.train_dataset["input_ids"]
    assert {len(r) for r in rows} == {32}
    # every token kept (plus at most one end-of-text token per document) except the last partial chunk
    assert tokens // 32 <= len(rows) <= (tokens + len(texts)) // 32 and len(rows) > len(texts)
    trainer.train()
    for name, count in trainer.final_prune_counts.items():
        assert trainer.pruning_state.num_pruned(name) == count > 0, name


def test_one_shot_schedule_prunes(tmp_path):
    trainer, _ = make_trainer(tmp_path, pruning_schedule="one_shot", pruning_warmup_ratio=0.0, max_steps=4)
    trainer.train()
    for name, count in trainer.final_prune_counts.items():
        assert trainer.pruning_state.num_pruned(name) == count > 0


def test_reference_format_loads_back_onto_base(tmp_path):
    trainer, _ = make_trainer(tmp_path, max_steps=8)
    trainer.train()
    trainer.save_pruning_adapter(str(tmp_path / "adapter"))
    ids = torch.randint(4, VOCAB, (1, 10), generator=torch.Generator().manual_seed(6))
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
    peft_model, state, _ = load_masked_model(tiny_model("llama-gqa"), str(tmp_path / "adapter"))
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    assert (got - expected).abs().max() < 1e-5
    for name in state.keep:
        assert torch.equal(state.keep[name], trainer.pruning_state.keep[name])


@pytest.mark.parametrize("kwargs,message", [
    (dict(pruning_ratio=1.0), "`pruning_ratio` must be in \\[0, 1\\)"),
    (dict(pruning_ratio=-0.1), "`pruning_ratio`"),
    (dict(mlp_pruning_ratio=1.5), "`mlp_pruning_ratio`"),
    (dict(ema_lambda=1.0), "`ema_lambda`"),
    (dict(prune_freq=0), "`prune_freq` must be an integer >= 1"),
    (dict(attention_unit="heads"), "`attention_unit` must be one of"),
    (dict(score_form="cube"), "`score_form` must be one of"),
    (dict(pruning_schedule="linear"), "`pruning_schedule` must be one of"),
    (dict(pruning_criterion="oracle"), "`pruning_criterion` must be one of"),
    (dict(pruning_warmup_ratio=0.6, pruning_cooldown_ratio=0.5), "must be < 1"),
])
def test_config_validation(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAPruneConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **kwargs)


def test_unsupported_model_fails_before_training(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB))
    with pytest.raises(UnsupportedModelError, match="LLaMA-family"):
        LoRAPruneTrainer(model=gpt2, args=make_args(tmp_path), train_dataset=tiny_text_dataset(),
                         processing_class=tiny_tokenizer(), peft_config=LoraConfig(**LORA))


def test_partial_lora_targets_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="LoRA does not target .*'k_proj'.*all-linear"):
        make_trainer(tmp_path, lora={**LORA, "target_modules": ["q_proj", "v_proj"]})


def test_missing_lora_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="peft_config=LoraConfig"):
        LoRAPruneTrainer(model=tiny_model(), args=make_args(tmp_path), train_dataset=tiny_text_dataset(),
                         processing_class=tiny_tokenizer())


def test_prune_freq_longer_than_ramp_fails(tmp_path):
    with pytest.raises(ValueError, match="`prune_freq`=50 is longer than the pruning ramp"):
        make_trainer(tmp_path, prune_freq=50, max_steps=20)


def test_rounding_is_announced(tmp_path):
    with pytest.warns(UserWarning, match="rounds to 1 of 2 attention units"):
        make_trainer(tmp_path, pruning_ratio=0.3, prune_freq=2)


def test_norms_trained_alongside_lora_export_and_adapter_stay_exact(tmp_path):
    """RMSNorm weights trained next to LoRA (PEFT's `modules_to_save`, train.py's `--lora_modules_to_save`):
    they change, the export equals the masked model, and the adapter format restores them."""
    norms = ["input_layernorm", "post_attention_layernorm", "norm"]
    trainer, _ = make_trainer(tmp_path, pruning_criterion="taylor_gate", learning_rate=1e-2,
                              lora={**LORA, "modules_to_save": norms})
    trainer.train()
    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    trainer.model.eval()
    with torch.no_grad():
        masked = trainer.model(input_ids=ids).logits
    trainer.save_pruned_model(str(tmp_path / "pruned"))
    trainer.save_pruning_adapter(str(tmp_path / "adapter"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned")).eval()
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - masked).abs().max() < 1e-4
    base = tiny_model("llama-gqa")
    assert (reloaded.model.norm.weight - base.model.norm.weight).abs().max() > 1e-3, "the final norm trained"
    assert (reloaded.model.layers[1].input_layernorm.weight
            - base.model.layers[1].input_layernorm.weight).abs().max() > 1e-3
    peft_model, _, hooks = load_masked_model(tiny_model("llama-gqa"), str(tmp_path / "adapter"))
    peft_model.eval()
    with torch.no_grad():
        assert (peft_model(input_ids=ids).logits - masked).abs().max() < 1e-5
    hooks.remove()
