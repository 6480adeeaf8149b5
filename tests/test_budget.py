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


# -- width_multiple: kept MLP widths aligned to a multiple, never less removed than asked ------------

def test_width_multiple_rounds_kept_channels_down():
    from loraprune_trainer.schedule import final_prune_count

    s, attn, mlp, *_ = _setup()  # 40 MLP channels
    assert final_prune_count(mlp, 0.3) == 12
    assert final_prune_count(mlp, 0.3, width_multiple=8) == 16  # keeps 24, not 28
    assert final_prune_count(mlp, 0.0, width_multiple=8) == 0  # nothing pruned: the full width stays
    assert final_prune_count(attn, 0.5, width_multiple=8) == final_prune_count(attn, 0.5)  # heads untouched
    counts = allowed_prune_counts(mlp, 8)
    # Below one multiple (fewer than 8 would stay) the count is left as it is: rounding down would remove all.
    assert counts[0] == 0 and all((40 - c) % 8 == 0 for c in counts[1:] if 40 - c >= 8)


@pytest.mark.parametrize("multiple", [1, 4, 8, 16])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.35])
def test_budget_with_width_multiple_meets_the_budget_with_aligned_widths(ratio, multiple):
    s, attn, mlp, ca, cm, total = _setup()
    a, m = budget_prune_counts(attn, mlp, ca, cm, s.num_layers, total, ratio, attention_ratio=0.0,
                               width_multiple=multiple)
    assert _removed(s, a, m, ca, cm) >= ratio * total
    kept = mlp.num_units - m
    assert kept % multiple == 0 or kept < multiple  # below one multiple: the unaligned count (documented)
    a1, m1 = budget_prune_counts(attn, mlp, ca, cm, s.num_layers, total, ratio, attention_ratio=0.0)
    assert m1 <= m < m1 + multiple, "the smallest aligned count at or above the unaligned one"


def test_smollm2_demo_shapes_align_to_1120_channels():
    """SmolLM2-135M (hidden 576, MLP 1536, 9 heads over 3 KV heads, 30 layers) at the demo's 20% budget from
    MLP channels: 1,126 channels stay unaligned, 1,120 with width_multiple 8 or 16 or 32, 1,088 with 64."""
    from loraprune_trainer.structure import ROWS, GroupMember, UnitGroup

    mlp = UnitGroup(0, "mlp", 1536, (GroupMember("mlp.gate_proj", ROWS, 1),))
    attn = UnitGroup(0, "attention", 3, (GroupMember("self_attn.q_proj", ROWS, 192),), heads_per_unit=3)
    layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576  # attention, MLP, two RMSNorms
    unit_attn, unit_mlp = 576 * 192 * 2 + 576 * 64 * 2, 3 * 576
    kept = {w: 1536 - budget_prune_counts(attn, mlp, unit_attn, unit_mlp, 30, 30 * layer, 0.2, attention_ratio=0.0,
                                          width_multiple=w)[1] for w in (1, 8, 16, 32, 64)}
    assert kept == {1: 1126, 8: 1120, 16: 1120, 32: 1120, 64: 1088}


def test_trainer_exports_aligned_width(tmp_path):
    trainer = make_trainer(str(tmp_path / "out"), pruning_ratio=0.3, width_multiple=8, max_steps=8)
    trainer.train()
    out = tmp_path / "pruned"
    trainer.save_pruned_model(str(out))
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.intermediate_size == 24
    assert trainer.target_summary()["mlp_channels_pruned_per_layer"] == 16
    with pytest.raises(ValueError, match="`width_multiple` must be an integer >= 1"):
        LoRAPruneConfig(output_dir=str(tmp_path), width_multiple=0)
