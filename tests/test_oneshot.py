"""One-shot mode: score once, prune in one go, compact, then LoRA fine-tune at equal tokens."""

import pytest
import torch
from peft import LoraConfig
from tiny import VOCAB, tiny_model, tiny_text_dataset, tiny_tokenizer
from trl import SFTConfig

from loraprune_trainer import LoRAPruneConfig, LoRAPruneTrainer
from loraprune_trainer.criteria import LoRACriterion
from loraprune_trainer.masks import MaskHooks
from loraprune_trainer.oneshot import calibration_batches, finetune_compact, oneshot_prune
from loraprune_trainer.structure import discover_structure


def texts(n=8):
    return tiny_text_dataset(n, length=16, seed=3)["text"]


@pytest.mark.parametrize("criterion", ["lora", "vanilla", "wanda", "magnitude", "random"])
def test_oneshot_prunes_to_target_and_compact_equals_masked(criterion):
    model = tiny_model("llama-gqa", seed=0)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    result = oneshot_prune(model, tiny_tokenizer(), texts(), criterion=criterion, pruning_ratio=0.5, batch_size=4)
    state = result.pruning_state
    for name, group in state.groups.items():
        # 2 KV groups -> 1; 40 channels -> 20 kept, rounded down to 16 by the default width_multiple (8)
        expected = 1 if group.kind == "attention" else 24
        assert state.num_pruned(name) == expected
        assert torch.isfinite(state.scores[name]).all() and state.scores[name].std() > 0
    cfg = result.model.config
    assert (cfg.num_key_value_heads, cfg.num_attention_heads, cfg.intermediate_size) == (1, 3, 16)
    assert result.report["width_multiple"] == 8
    assert result.report["parameters_after"] < result.report["parameters_before"]
    # The caller's model is left as it was: same weights and requires_grad flags, no adapter, no grads.
    assert not any("lora_" in n for n, _ in model.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] and p.grad is None, n
    # The compact model computes what the original model with the same masks computes.
    hooks = MaskHooks(state)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        compact = result.model(input_ids=ids).logits
    hooks.remove()
    torch.testing.assert_close(compact, masked, rtol=1e-4, atol=1e-5)


def test_oneshot_lora_scores_come_from_gB_only():
    """Fresh LoRA: B = 0 so gA = 0 and G = gB A; the one-shot scores equal that by hand."""
    from peft import get_peft_model

    tok = tiny_tokenizer()
    model = tiny_model("llama-mha", seed=1)
    result = oneshot_prune(model, tok, texts(), criterion="lora", pruning_ratio=0.5, seed=7)
    torch.manual_seed(7)
    peft_model = get_peft_model(tiny_model("llama-mha", seed=1),
                                LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    structure = discover_structure(peft_model)
    batches = calibration_batches(tok, texts(), 128, 4)
    for b in batches:
        (peft_model(**b).loss / len(batches)).backward()
    q = structure.layers[0].self_attn.q_proj
    assert torch.count_nonzero(q.lora_A["default"].weight.grad) == 0
    assert torch.count_nonzero(q.lora_B["default"].weight.grad) > 0
    expect = LoRACriterion().score(structure)
    for name, s in expect.items():
        torch.testing.assert_close(result.pruning_state.scores[name], s)


def test_oneshot_rejects_bad_input():
    model = tiny_model("llama-gqa")
    with pytest.raises(ValueError, match="calibration"):
        oneshot_prune(model, tiny_tokenizer(), None, criterion="wanda")
    with pytest.raises(ValueError, match="pruning_ratio"):
        oneshot_prune(model, tiny_tokenizer(), texts(), pruning_ratio=1.0)
    with pytest.raises(ValueError, match="pruning_criterion"):
        oneshot_prune(model, tiny_tokenizer(), texts(), criterion="nope")


def test_prune_then_finetune_sees_as_many_tokens_as_iterative(tmp_path):
    """Both modes train on the same dataset with the same steps/batch/max_length: equal tokens."""
    common = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=100,
                  save_strategy="no", report_to="none", use_cpu=True, bf16=False, max_length=24, seed=0,
                  include_num_input_tokens_seen=True, gradient_checkpointing=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    data = tiny_text_dataset(32)
    tok = tiny_tokenizer()
    iterative = LoRAPruneTrainer(tiny_model("llama-gqa"), LoRAPruneConfig(output_dir=str(tmp_path / "it"),
                                 pruning_ratio=0.5, prune_freq=1, **common), train_dataset=data,
                                 processing_class=tok, peft_config=lora)
    iterative.train()

    result = oneshot_prune(tiny_model("llama-gqa"), tok, texts(), criterion="lora", pruning_ratio=0.5)
    compact_params = sum(p.numel() for p in result.model.parameters())
    tuned, trainer = finetune_compact(result.model, tok, data, SFTConfig(output_dir=str(tmp_path / "os"), **common),
                                      lora_config=lora)
    assert trainer.state.num_input_tokens_seen == iterative.state.num_input_tokens_seen > 0
    assert trainer.state.global_step == iterative.state.global_step == 4
    # Merged back into a plain model of the compact size, and the fine-tune changed its weights.
    assert not any("lora_" in n for n, _ in tuned.named_parameters())
    assert sum(p.numel() for p in tuned.parameters()) == compact_params


def test_oneshot_width_multiple_one_keeps_exact_counts_and_bad_values_are_refused():
    result = oneshot_prune(tiny_model("llama-gqa", seed=0), tiny_tokenizer(), None, criterion="magnitude",
                           pruning_ratio=0.5, width_multiple=1)
    assert result.model.config.intermediate_size == 20 and result.report["width_multiple"] == 1
    with pytest.raises(ValueError, match="`width_multiple` must be an integer >= 1"):
        oneshot_prune(tiny_model("llama-gqa", seed=0), tiny_tokenizer(), None, criterion="magnitude",
                      pruning_ratio=0.5, width_multiple=0)
