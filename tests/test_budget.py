"""`param_pruning_ratio`: unit counts solved from a share of the decoder parameters."""

import pytest
from scripts.tiny_train import make_trainer
from tiny import tiny_model
from transformers import AutoModelForCausalLM

from loraprune_trainer import LoRAPruneConfig
from loraprune_trainer.schedule import UnreachableBudgetError, allowed_prune_counts, budget_prune_counts
from loraprune_trainer.structure import decoder_parameters, discover_structure, unit_parameters


def _setup(arch="llama-gqa", unit="query_head", **overrides):
    s = discover_structure(tiny_model(arch, num_layers=3, **overrides), unit)
    attn, mlp = s.attention[0], s.mlp[0]
    return s, attn, mlp, unit_parameters(s, attn), unit_parameters(s, mlp), decoder_parameters(s)


def _removed(s, a, m, ca, cm):
    return s.num_layers * (a * ca + m * cm)


def test_unit_parameters_match_the_weights_they_cut():
    s, attn, mlp, ca, cm, total = _setup("qwen2-gqa", "kv_group")  # q/k/v biases
    h, d = s.hidden_size, s.head_dim
    n_rep = s.num_heads // s.num_kv_heads
    assert ca == (n_rep * d * h + n_rep * d) + 2 * (d * h + d) + h * n_rep * d
    assert cm == 3 * h
    assert total == sum(p.numel() for layer in s.layers for p in layer.parameters())


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.35, 0.45])  # the tiny MLPs hold 47% of the layer
def test_mlp_only_budget_is_the_fewest_channels_that_reach_it(ratio):
    s, attn, mlp, ca, cm, total = _setup()
    a, m = budget_prune_counts(attn, mlp, ca, cm, s.num_layers, total, ratio, attention_ratio=0.0)
    assert a == 0
    assert _removed(s, a, m, ca, cm) >= ratio * total > _removed(s, a, m - 1, ca, cm)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.35, 0.5])
def test_free_budget_prunes_attention_at_its_ratio_and_fills_with_channels(ratio):
    s, attn, mlp, ca, cm, total = _setup()
    a, m = budget_prune_counts(attn, mlp, ca, cm, s.num_layers, total, ratio)
    assert a in allowed_prune_counts(attn) and _removed(s, a, 0, ca, cm) <= ratio * total
    assert _removed(s, a, m, ca, cm) >= ratio * total > _removed(s, a, m - 1, ca, cm)


def test_fixed_mlp_solves_for_attention():
    s, attn, mlp, ca, cm, total = _setup()
    a, m = budget_prune_counts(attn, mlp, ca, cm, s.num_layers, total, 0.12, mlp_ratio=0.1)
    assert m == 4  # round(0.1 * 40)
    smaller = [c for c in allowed_prune_counts(attn) if c < a]
    assert _removed(s, a, m, ca, cm) >= 0.12 * total
    assert all(_removed(s, c, m, ca, cm) < 0.12 * total for c in smaller)


def test_unreachable_budgets_are_refused():
    s, attn, mlp, ca, cm, total = _setup()
    with pytest.raises(UnreachableBudgetError, match="out of reach.*MLPs would need"):
        budget_prune_counts(attn, mlp, ca, cm, s.num_layers, total, 0.9, attention_ratio=0.0)
    with pytest.raises(UnreachableBudgetError, match="attention cannot make up"):
        budget_prune_counts(attn, mlp, ca, cm, s.num_layers, total, 0.6, mlp_ratio=0.0)


def test_config_refuses_both_kinds_with_a_budget():
    with pytest.raises(ValueError, match="at most one of"):
        LoRAPruneConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, param_pruning_ratio=0.2,
                        attention_pruning_ratio=0.0, mlp_pruning_ratio=0.3)
    with pytest.raises(ValueError, match="param_pruning_ratio"):
        LoRAPruneConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, param_pruning_ratio=1.0)


def test_unreachable_budget_fails_before_training(tmp_path):
    with pytest.raises(UnreachableBudgetError):
        make_trainer(str(tmp_path), param_pruning_ratio=0.9, attention_pruning_ratio=0.0)


def test_trainer_reaches_the_budget_and_reports_it(tmp_path):
    trainer = make_trainer(str(tmp_path / "out"), max_steps=6, param_pruning_ratio=0.3, attention_unit="query_head")
    summary = trainer.target_summary()
    assert summary["param_requested_ratio"] == 0.3 and summary["param_achieved_ratio"] >= 0.3
    assert summary["attention_requested_ratio"] is None and summary["mlp_requested_ratio"] is None
    trainer.train()
    report = trainer.save_pruned_model(str(tmp_path / "pruned"))
    assert report["settings"]["param_achieved_ratio"] == summary["param_achieved_ratio"]
    before = decoder_parameters(trainer.structure)
    after = sum(p.numel() for layer in AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned")).model.layers
                for p in layer.parameters())
    assert 1 - after / before == pytest.approx(summary["param_achieved_ratio"], abs=1e-9)
    assert 1 - after / before >= 0.3
