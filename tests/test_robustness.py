"""Bad input fails before training starts, with an error that names the problem and the fix.

One test per row of the robustness table in docs/production.md (same order)."""

import os
import warnings

import pytest
from peft import LoraConfig
from tiny import tiny_model, tiny_text_dataset, tiny_tokenizer

from loraprune_trainer import LoRAPruneConfig, LoRAPruneTrainer, UnsupportedModelError
from loraprune_trainer.distributed import UnsupportedBackendError, check_distributed_backend
from loraprune_trainer.resume import ResumeError, load_pruning_checkpoint

ALL_LINEAR = dict(target_modules="all-linear", task_type="CAUSAL_LM")


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=20, use_cpu=True, bf16=False, report_to="none",
                save_strategy="no", max_length=32, gradient_checkpointing=False, prune_freq=2)
    return LoRAPruneConfig(**{**base, **kw})


def _trainer(tmp_path, model=None, args=None, peft=None, dataset=None, **kw):
    return LoRAPruneTrainer(model if model is not None else tiny_model("llama-gqa"),
                            args if args is not None else _args(tmp_path),
                            train_dataset=dataset if dataset is not None else tiny_text_dataset(16),
                            processing_class=tiny_tokenizer(),
                            peft_config=peft if peft is not None else LoraConfig(r=4, **ALL_LINEAR), **kw)


# 1. ratios and other settings out of range: LoRAPruneConfig.__post_init__
@pytest.mark.parametrize("kwargs, message", [
    (dict(pruning_ratio=1.0), r"`pruning_ratio` must be in \[0, 1\), got 1.0"),
    (dict(mlp_pruning_ratio=-0.1), r"`mlp_pruning_ratio` must be in \[0, 1\), got -0.1"),
    (dict(attention_pruning_ratio=1.5), r"`attention_pruning_ratio` must be in \[0, 1\), got 1.5"),
    (dict(ema_lambda=1.0), r"`ema_lambda` must be in \[0, 1\), got 1.0"),
    (dict(prune_freq=0), r"`prune_freq` must be an integer >= 1, got 0"),
    (dict(pruning_warmup_ratio=0.6, pruning_cooldown_ratio=0.5), r"must be < 1 so that some steps prune"),
    (dict(attention_unit="heads"), r"`attention_unit` must be one of \('kv_group', 'query_head'\)"),
    (dict(pruning_criterion="taylor"), r"`pruning_criterion` must be one of"),
])
def test_settings_out_of_range(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **kwargs)


# 2. prune_freq longer than the pruning ramp for the run's step count
def test_prune_freq_vs_max_steps(tmp_path):
    with pytest.raises(ValueError, match=r"`prune_freq`=30 is longer than the pruning ramp .*Lower `prune_freq`"):
        _trainer(tmp_path, args=_args(tmp_path, max_steps=20, prune_freq=30))


def test_prune_freq_vs_epochs_checked_when_steps_are_known(tmp_path):
    """With epochs instead of max_steps the step count is known only at train begin: checked there."""
    args = _args(tmp_path, max_steps=-1, num_train_epochs=1, per_device_train_batch_size=4, prune_freq=5)
    trainer = _trainer(tmp_path, args=args)  # 16 samples / 4 = 4 steps: ramp of 3 steps
    with pytest.raises(ValueError, match=r"`prune_freq`=5 is longer than the pruning ramp \(steps 1..4 of 4\)"):
        trainer.train()


# 3. no LoRA, DoRA, or LoRA not covering every member of a unit group
def test_no_lora(tmp_path):
    with pytest.raises(ValueError, match=r"pass `peft_config=LoraConfig\(target_modules=\"all-linear\""):
        LoRAPruneTrainer(tiny_model("llama-gqa"), _args(tmp_path), train_dataset=tiny_text_dataset(16),
                         processing_class=tiny_tokenizer())


def test_lora_not_covering_group_matrices(tmp_path):
    with pytest.raises(ValueError, match=r"LoRA does not target \['k_proj', 'o_proj', 'gate_proj', 'up_proj', "
                                         r"'down_proj'\].*all-linear"):
        _trainer(tmp_path, peft=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def test_dora_refused(tmp_path):
    with pytest.raises(ValueError, match=r"DoRA adapters are not supported: set `use_dora=False`"):
        _trainer(tmp_path, peft=LoraConfig(r=4, use_dora=True, **ALL_LINEAR))


# 4. GQA rounding: the achieved ratio differs from the requested one (a warning, training goes on)
def test_gqa_rounding_is_announced(tmp_path):
    # llama-gqa: 2 KV groups per layer, so kv_group units can only be pruned in halves.
    with pytest.warns(UserWarning, match=r"attention pruning ratio 0.3 rounds to 1 of 2 attention units per layer "
                                         r"\(50.0%\) with attention_unit='kv_group' \(6 query heads over 2 KV heads\)"):
        trainer = _trainer(tmp_path, args=_args(tmp_path, pruning_ratio=0.3))
    assert trainer.target_summary()["attention_achieved_ratio"] == 0.5


# 5. unsupported architecture
def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=96, n_positions=64))
    with pytest.raises(UnsupportedModelError, match=r"prunes LLaMA-family decoders .*got model_type='gpt2'"):
        _trainer(tmp_path, model=gpt2, peft=LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM"))


def test_heads_not_a_multiple_of_kv_heads(tmp_path):
    from loraprune_trainer.structure import check_supported_config
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=2)
    config.num_key_value_heads = 4  # set after validation, as a hand-edited config.json could
    with pytest.raises(UnsupportedModelError, match=r"num_attention_heads=6 is not a multiple of num_key_value_heads=4"):
        check_supported_config(config)


# 6. the dataset has no column SFTTrainer can use
def test_missing_dataset_column(tmp_path):
    from datasets import Dataset

    bad = Dataset.from_list([{"body": "w1 w2 w3"}] * 8)
    with pytest.raises(ValueError, match=r"columns \['body'\], none of which SFTTrainer can train on: it needs "
                                         r"`text` \(set `dataset_text_field`"):
        _trainer(tmp_path, dataset=bad)


def test_dataset_text_field_or_formatting_func_accepted(tmp_path):
    from datasets import Dataset

    data = Dataset.from_list([{"body": " ".join(f"w{i}" for i in range(20))}] * 8)
    _trainer(tmp_path, args=_args(tmp_path, dataset_text_field="body"), dataset=data)
    _trainer(tmp_path / "f", dataset=data, formatting_func=lambda row: row["body"])


# 7. output_dir not writable
def test_output_dir_under_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=r"`output_dir`=.* is not writable .*Choose a writable `output_dir`"):
        _trainer(tmp_path, args=_args(tmp_path, output_dir=str(blocker / "run")))


def test_output_dir_read_only(tmp_path, monkeypatch):
    import loraprune_trainer.trainer as trainer_module

    target = str(tmp_path / "ro")
    os.makedirs(target)
    # A read-only folder cannot be simulated with chmod when the tests run as root, so deny access.
    real_access = os.access
    monkeypatch.setattr(trainer_module.os, "access", lambda p, m: False if p == target else real_access(p, m))
    with pytest.raises(PermissionError, match=r"is not writable"):
        _trainer(tmp_path, args=_args(tmp_path, output_dir=target))


# 8. a distributed backend that hides full LoRA gradients
def test_backend_without_full_lora_gradients():
    from types import SimpleNamespace

    trainer = SimpleNamespace(is_deepspeed_enabled=True, is_fsdp_enabled=False,
                              args=SimpleNamespace(pruning_criterion="lora", compensation="none"),
                              accelerator=SimpleNamespace(state=SimpleNamespace(
                                  deepspeed_plugin=SimpleNamespace(zero_stage=2))))
    with pytest.raises(UnsupportedBackendError, match=r"`pruning_criterion='lora'` does not run under DeepSpeed"):
        check_distributed_backend(trainer)


# 9. resuming from a checkpoint of another pruning configuration
def test_resume_from_other_config(tmp_path):
    from loraprune_trainer.masks import PruningState
    from loraprune_trainer.resume import save_pruning_checkpoint
    from loraprune_trainer.structure import discover_structure

    state = PruningState(discover_structure(tiny_model("llama-gqa")))
    save_pruning_checkpoint(str(tmp_path), state, _args(tmp_path).pruning_settings(), total_steps=20)
    with pytest.raises(ResumeError, match=r"different pruning settings \(ema_lambda: checkpoint 0.9 vs now 0.5\)"):
        load_pruning_checkpoint(str(tmp_path), state, _args(tmp_path, ema_lambda=0.5).pruning_settings())


# 10. non-finite scores (a NaN/inf gradient step) are skipped, not folded into the average
def test_non_finite_scores_skipped():
    import torch

    from loraprune_trainer.masks import PruningState
    from loraprune_trainer.structure import discover_structure

    state = PruningState(discover_structure(tiny_model("llama-gqa")))
    scores = {name: torch.ones(group.num_units) for name, group in state.groups.items()}
    scores["layers.0.mlp"][3] = float("nan")
    with pytest.warns(UserWarning, match=r"Skipping an importance update: non-finite scores in \['layers.0.mlp'\]"):
        assert state.update_scores(scores, 0.9) is False
    assert state.num_score_updates == 0 and all(bool((s == 0).all()) for s in state.scores.values())


# 15. depth pruning settings (rows 12-14 have their tests in test_budget.py and test_compensation.py)
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(layer_pruning_ratio=1.0), ValueError, r"`layer_pruning_ratio` must be in \[0, 1\), got 1.0"),
    (dict(layer_criterion="random"), ValueError, r"`layer_criterion` must be one of"),
])
def test_layer_settings_out_of_range(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        _args(tmp_path, **kwargs)


def test_layer_ratio_removing_every_layer_or_over_budget(tmp_path):
    from loraprune_trainer.schedule import UnreachableBudgetError

    with pytest.raises(ValueError, match="removes 2 of 2 decoder layers; at least one must stay"):
        _trainer(tmp_path, args=_args(tmp_path, layer_pruning_ratio=0.9))
    with pytest.raises(UnreachableBudgetError, match=r"removes 2 of 4 decoder layers, 50.0% .* more than "
                                                     r"`param_pruning_ratio`=0.3"):
        _trainer(tmp_path, model=tiny_model("llama-gqa", num_layers=4),
                 args=_args(tmp_path, layer_pruning_ratio=0.5, param_pruning_ratio=0.3))


def test_valid_input_passes_every_check(tmp_path):
    """The checks must not reject good input (else every row above could pass trivially)."""
    with warnings.catch_warnings():
        # Ratios that round exactly: 1 of 2 KV groups; 24 of 40 channels keeps 16, a multiple of 8: no warning
        warnings.simplefilter("error", UserWarning)
        trainer = _trainer(tmp_path, args=_args(tmp_path, mlp_pruning_ratio=0.6))
    assert trainer.final_prune_counts["layers.0.attention"] == 1
    assert trainer.final_prune_counts["layers.0.mlp"] == 24


def test_rounding_warning_names_width_multiple(tmp_path):
    """0.5 of 40 channels keeps 20, which the default width_multiple (8) rounds down to 16: the warning
    says so and how to get exact counts; with width_multiple=1 the same ratio rounds exactly."""
    with pytest.warns(UserWarning, match=r"rounds to 24 of 40 MLP channels.*width_multiple=8.*width_multiple=1"):
        trainer = _trainer(tmp_path)
    assert trainer.args.width_multiple == 8 and trainer.final_prune_counts["layers.0.mlp"] == 24
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        exact = _trainer(tmp_path, args=_args(tmp_path, width_multiple=1))
    assert exact.final_prune_counts["layers.0.mlp"] == 20
