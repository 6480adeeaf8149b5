"""Depth pruning: whole decoder layers removed, scored by gate gradients (or block influence / last), exported
to a stock checkpoint with fewer layers. Tiny random models of every supported family."""

import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_core import ARCHS, lora_model
from tiny import VOCAB, tiny_model, tiny_text_dataset, tiny_tokenizer
from transformers import AutoModelForCausalLM

from loraprune_trainer import LoRAPruneConfig, LoRAPruneTrainer
from loraprune_trainer.depth import (BlockInfluenceScorer, LastLayersScorer, LayerGateScorer, final_layer_count,
                                     scheduled_layer_count, sliced_layer_config)
from loraprune_trainer.export import load_masked_model, save_adapter_and_masks, save_pruned_model
from loraprune_trainer.masks import MaskHooks, PruningState
from loraprune_trainer.schedule import UnreachableBudgetError, final_prune_count
from loraprune_trainer.structure import discover_structure


def _ids(seed=1, batch=2, length=10):
    # Words only (ids 0-3 are the tokenizer's special tokens, which SFT training treats differently)
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _random_width_masks(state, ratio=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, group in state.groups.items():
        state.scores[name] = torch.rand(group.num_units, generator=g)
        state.prune_to(name, final_prune_count(group, ratio))


# ---------------------------------------------------------------------------------------------------
# masks and export


def test_removed_layer_is_the_identity():
    """Masking every layer leaves the embeddings, the final norm and the head: exactly that computation."""
    model = lora_model("llama-gqa", num_layers=3)
    state = PruningState(discover_structure(model))
    hooks = MaskHooks(state, layers=True)
    state.layer_keep[:] = False
    state.version += 1
    ids = _ids()
    base = model.get_base_model()
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        expected = base.lm_head(base.model.norm(base.model.embed_tokens(ids)))
    torch.testing.assert_close(masked, expected)
    hooks.remove()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("unit", ["kv_group", "query_head"])
def test_layer_masks_equal_export_logits_and_generation(arch, unit, tmp_path):
    model = lora_model(arch, num_layers=4)
    structure = discover_structure(model, unit)
    state = PruningState(structure)
    hooks = MaskHooks(state, layers=True)
    ids = _ids()
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    _random_width_masks(state)
    state.layer_scores = torch.tensor([3.0, 0.0, 2.0, 1.0])
    assert state.prune_layers_to(2) == [1, 3]
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    assert (masked - dense).abs().max() > 1e-3

    report = save_pruned_model(model, state, str(tmp_path / "pruned"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned")).eval()
    assert reloaded.config.num_hidden_layers == 2
    assert len(reloaded.model.layers) == 2
    with torch.no_grad():
        compact = reloaded(input_ids=ids).logits
    assert (compact - masked).abs().max() < 1e-4
    assert report["kept_layers"] == [0, 2] and report["removed_layers"] == [1, 3]
    assert [entry["layer"] for entry in report["layers"]] == [0, 2]
    assert report["parameters"]["model_after"] == sum(p.numel() for p in reloaded.parameters())
    assert state.removed_parameters() == report["parameters"]["model_before"] - report["parameters"]["model_after"]
    with open(tmp_path / "pruned" / "pruning_report.json") as f:
        assert json.load(f)["kept_layers"] == [0, 2]

    # Greedy generation with the KV cache: the masked model (whose removed layers still fill their cache
    # slots) and the stock export produce the same tokens.
    prompt = _ids(seed=5, batch=1, length=6)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        masked_out = model.generate(input_ids=prompt, **kwargs)
        compact_out = reloaded.generate(input_ids=prompt, **kwargs)
    assert masked_out.tolist() == compact_out.tolist()
    hooks.remove()


def test_export_slices_per_layer_config_lists(tmp_path):
    """Qwen2 with a sliding window on the upper layers: the kept layers keep their attention type, and
    `max_window_layers` / `layer_types` describe the renumbered layers."""
    model = lora_model("qwen2-gqa", num_layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    base_types = model.get_base_model().config.layer_types
    assert base_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    state = PruningState(discover_structure(model))
    hooks = MaskHooks(state, layers=True)
    state.layer_scores = torch.tensor([3.0, 0.0, 2.0, 1.0])
    state.prune_layers_to(1)  # layer 1 goes: layers 0, 2, 3 remain
    ids = _ids(length=12)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    save_pruned_model(model, state, str(tmp_path / "p"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p")).eval()
    cfg = reloaded.config
    assert cfg.num_hidden_layers == 3
    assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert cfg.max_window_layers == 1
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - masked).abs().max() < 1e-4
    hooks.remove()


def test_sliced_layer_config():
    config = {"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"], "max_window_layers": 3,
              "no_rope_layers": [1, 0, 1, 0], "other": [1, 2, 3, 4]}
    new = sliced_layer_config(config, [0, 3], 4)
    assert new["num_hidden_layers"] == 2 and new["layer_types"] == ["a", "d"]
    assert new["no_rope_layers"] == [1, 0] and new["max_window_layers"] == 1
    assert new["other"] == [1, 2, 3, 4], "only known per-layer lists are sliced"


def test_adapter_and_masks_round_trip_with_layers(tmp_path):
    model = lora_model("llama-gqa", num_layers=3)
    state = PruningState(discover_structure(model))
    hooks = MaskHooks(state, layers=True)
    _random_width_masks(state)
    state.layer_scores = torch.tensor([1.0, 0.0, 2.0])
    state.prune_layers_to(1)
    ids = _ids()
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    save_adapter_and_masks(model, state, str(tmp_path / "a"), settings={})
    hooks.remove()
    fresh = tiny_model("llama-gqa", num_layers=3)
    peft_model, loaded, loaded_hooks = load_masked_model(fresh, str(tmp_path / "a"))
    assert loaded.layer_keep.tolist() == [True, False, True]
    with torch.no_grad():
        assert (peft_model(input_ids=ids).logits - masked).abs().max() < 1e-5
    loaded_hooks.remove()


def test_layer_mask_state_dict_and_old_checkpoints():
    model = lora_model("llama-mha", num_layers=3)
    state = PruningState(discover_structure(model))
    state.layer_scores = torch.tensor([1.0, 0.0, 2.0])
    state.prune_layers_to(1)
    saved = state.state_dict()
    other = PruningState(discover_structure(model))
    other.load_state_dict(saved)
    assert other.layer_keep.tolist() == [True, False, True]
    assert torch.equal(other.layer_scores, state.layer_scores)
    old = {k: v for k, v in saved.items() if k not in ("keep.layers", "scores.layers")}
    fresh = PruningState(discover_structure(model))
    fresh.load_state_dict(old)
    assert bool(fresh.layer_keep.all()), "a checkpoint from before depth pruning keeps every layer"


def test_prune_layers_only_grows_and_takes_lowest():
    model = lora_model("llama-mha", num_layers=4)
    state = PruningState(discover_structure(model))
    state.layer_scores = torch.tensor([0.5, 0.1, 0.9, 0.3])
    assert state.prune_layers_to(1) == [1]
    state.layer_scores = torch.tensor([0.0, 5.0, 0.9, 0.3])  # layer 1 is gone for good
    assert state.prune_layers_to(2) == [0]
    assert state.prune_layers_to(1) == []
    assert state.layer_keep.tolist() == [False, False, True, True]


# ---------------------------------------------------------------------------------------------------
# scores


def test_layer_gate_gradient_matches_finite_difference_of_removal_path():
    """dL/dm_l from the gate equals the brute-force derivative of L(m) with the layer's two residual
    contributions scaled by m (central difference at m = 1)."""
    model = lora_model("llama-gqa", num_layers=3)
    model.eval()
    structure = discover_structure(model)
    scorer = LayerGateScorer()
    scorer.attach(structure)
    ids = _ids(seed=3)
    model.train()  # the gate acts in training forwards (LoRA dropout is 0 here)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    grad = scorer.gate.grad.clone()
    scorer.detach()

    def loss_with(layer, m):
        handles = [b.register_forward_hook(lambda mod, a, out: (out[0] * m, *out[1:]) if isinstance(out, tuple)
                                           else out * m)
                   for b in (structure.layers[layer].self_attn, structure.layers[layer].mlp)]
        with torch.no_grad():
            value = model(input_ids=ids, labels=ids).loss.double()
        for h in handles:
            h.remove()
        return value

    eps = 1e-3
    for layer in range(3):
        numeric = (loss_with(layer, 1 + eps) - loss_with(layer, 1 - eps)) / (2 * eps)
        assert abs(float(numeric) - float(grad[layer])) < 2e-3 * max(1.0, abs(float(numeric)))


def _attached(scorer, arch, num_layers):
    """A tiny LoRA model in training mode with ``scorer`` attached to its layers: (model, scorer, ids)."""
    model = lora_model(arch, num_layers=num_layers)
    scorer.attach(discover_structure(model))
    model.train()
    return model, scorer, _ids()


def test_layer_gate_scores_are_squared_step_sums_and_reset():
    model, scorer, ids = _attached(LayerGateScorer(), "llama-mha", 2)
    model(input_ids=ids, labels=ids).loss.backward()
    g1 = scorer.gate.grad.clone()
    model(input_ids=ids, labels=ids).loss.backward()
    scores = scorer.score()
    torch.testing.assert_close(scores, (2 * g1).square())
    assert scorer.gate.grad is None
    with torch.no_grad():
        model.eval()
        model(input_ids=ids)
    assert scorer.score() is None, "evaluation forwards record nothing"
    scorer.detach()


def test_block_influence_matches_direct_cosine():
    model, scorer, ids = _attached(BlockInfluenceScorer(), "llama-gqa", 3)
    out = model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states  # embeddings, then after each layer (the last one after the final norm)
    scores = scorer.score()
    base = model.get_base_model()
    expected = []
    h = hidden[0]
    with torch.no_grad():
        for i in range(3):
            h_out = hidden[i + 1] if i < 2 else None
            if h_out is None:  # the last hidden state is normed: recompute the raw layer output
                position_ids = torch.arange(ids.shape[1])[None]
                emb = base.model.rotary_emb(h, position_ids)
                h_out = base.model.layers[2](h, position_embeddings=emb, attention_mask=None,
                                             position_ids=position_ids)
                h_out = h_out[0] if isinstance(h_out, tuple) else h_out
            expected.append(1 - torch.nn.functional.cosine_similarity(h.float(), h_out.float(), dim=-1).mean())
            h = h_out
    torch.testing.assert_close(scores, torch.stack(expected).float(), atol=1e-5, rtol=1e-4)
    scorer.detach()


def test_last_layers_keep_the_final_one():
    model = lora_model("llama-mha", num_layers=5)
    structure = discover_structure(model)
    state = PruningState(structure)
    scorer = LastLayersScorer()
    scorer.attach(structure, state=state)
    state.update_layer_scores(scorer.score(), 0.0)
    assert state.prune_layers_to(2) == [2, 3]


def test_layer_counts_and_schedule():
    assert final_layer_count(30, 0.2) == 6
    assert final_layer_count(30, 0.0) == 0
    with pytest.raises(ValueError, match="at least one must stay"):
        final_layer_count(2, 0.9)
    assert [scheduled_layer_count(4, p, False) for p in (0.0, 0.1, 0.5, 1.0)] == [0, 0, 2, 4]
    assert scheduled_layer_count(4, 0.0, True) == 4


# ---------------------------------------------------------------------------------------------------
# trainer


def _trainer(tmp_path, arch="llama-gqa", num_layers=4, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-3,
                  logging_steps=4, save_strategy="no", report_to="none", use_cpu=True, max_length=24,
                  pruning_ratio=0.0, layer_pruning_ratio=0.5, prune_freq=2, pruning_warmup_ratio=0.1,
                  pruning_cooldown_ratio=0.2, pruning_criterion="taylor_gate", seed=0, dataset_text_field="text",
                  disable_tqdm=True, bf16=False)
    kwargs.update(overrides)
    args = LoRAPruneConfig(**kwargs)
    return LoRAPruneTrainer(model=tiny_model(arch, num_layers=num_layers), args=args,
                            train_dataset=tiny_text_dataset(48), processing_class=tiny_tokenizer(),
                            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   task_type="CAUSAL_LM"))


@pytest.mark.parametrize("arch", ["llama-gqa", "mistral-gqa", "qwen2-gqa", "qwen3-gqa"])
@pytest.mark.parametrize("criterion", ["taylor_gate", "block_influence", "last"])
def test_trainer_removes_layers_and_export_matches(arch, criterion, tmp_path):
    trainer = _trainer(tmp_path, arch, layer_criterion=criterion)
    trainer.train()
    state = trainer.pruning_state
    assert state.num_pruned_layers() == 2
    assert trainer.pruning_metrics()["prune/layers_pruned"] == 2
    if criterion == "last":
        assert state.layer_keep.tolist() == [True, False, False, True]
    else:
        assert state.layer_scores.abs().sum() > 0
    ids = _ids()
    model = trainer.model
    model.eval()
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    report = trainer.save_pruned_model(str(tmp_path / "pruned"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned")).eval()
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - masked).abs().max() < 1e-4
    assert report["settings"]["layers_pruned"] == 2 and report["settings"]["layer_criterion"] == criterion


def test_layers_follow_the_cubic_schedule(tmp_path):
    trainer = _trainer(tmp_path, num_layers=6, max_steps=20, layer_pruning_ratio=0.5)
    counts = []

    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            counts.append(trainer.pruning_state.num_pruned_layers())

    trainer.add_callback(Record())
    trainer.train()
    assert counts[-1] == 3
    assert counts == sorted(counts), "layers only go, never come back"
    assert 0 < len(set(counts)) - 1 <= 3 and len({c for c in counts if 0 < c < 3}) >= 1, counts


def test_budget_counts_removed_layers(tmp_path):
    # 2 of 4 layers = 50% of the decoder parameters; a 60% budget leaves the rest to the kept layers' channels.
    trainer = _trainer(tmp_path, param_pruning_ratio=0.6, attention_pruning_ratio=0.0, layer_pruning_ratio=0.5)
    s = trainer.target_summary()
    assert s["layers_pruned"] == 2 and s["attention_units_pruned_per_layer"] == 0
    assert s["mlp_channels_pruned_per_layer"] > 0
    assert 0.6 <= s["param_achieved_ratio"] < 0.65
    trainer.train()
    removed = trainer.pruning_state.removed_parameters()
    assert removed / s["decoder_parameters"] == pytest.approx(s["param_achieved_ratio"])

    exact = _trainer(tmp_path, param_pruning_ratio=0.5, layer_pruning_ratio=0.5)
    assert set(exact.final_prune_counts.values()) == {0}, "the layers alone meet the budget"
    with pytest.raises(UnreachableBudgetError, match="layer_pruning_ratio"):
        _trainer(tmp_path, param_pruning_ratio=0.3, layer_pruning_ratio=0.5)


def test_config_rejects_bad_layer_settings(tmp_path):
    with pytest.raises(ValueError, match="layer_pruning_ratio"):
        LoRAPruneConfig(output_dir=str(tmp_path), layer_pruning_ratio=1.0)
    with pytest.raises(ValueError, match="layer_criterion"):
        LoRAPruneConfig(output_dir=str(tmp_path), layer_criterion="random")


def test_width_and_depth_together(tmp_path):
    trainer = _trainer(tmp_path, pruning_ratio=0.25, layer_pruning_ratio=0.25)
    trainer.train()
    assert trainer.pruning_state.num_pruned_layers() == 1
    ids = _ids()
    trainer.model.eval()
    with torch.no_grad():
        masked = trainer.model(input_ids=ids).logits
    trainer.save_pruned_model(str(tmp_path / "p"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p")).eval()
    assert reloaded.config.num_hidden_layers == 3
    assert reloaded.config.intermediate_size < 40
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - masked).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------------
# one-shot mode


@pytest.mark.parametrize("layer_criterion", ["taylor_gate", "block_influence", "last"])
@pytest.mark.parametrize("criterion", ["wanda", "taylor_gate"])
def test_oneshot_removes_layers_and_compact_equals_masked(layer_criterion, criterion):
    from loraprune_trainer.oneshot import oneshot_prune

    texts = tiny_text_dataset(8, length=16, seed=3)["text"]
    model = tiny_model("llama-gqa", num_layers=4)
    result = oneshot_prune(model, tiny_tokenizer(), texts, criterion=criterion, pruning_ratio=0.25,
                           layer_ratio=0.5, layer_criterion=layer_criterion)
    state = result.pruning_state
    assert state.num_pruned_layers() == 2
    assert result.model.config.num_hidden_layers == 2
    assert result.report["kept_layers"] == state.layer_keep.nonzero().flatten().tolist()
    if layer_criterion == "last":
        assert result.report["kept_layers"] == [0, 3]
    else:
        assert torch.isfinite(state.layer_scores).all() and state.layer_scores.std() > 0
    hooks = MaskHooks(state, layers=True)
    ids = _ids()
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        compact = result.model(input_ids=ids).logits
    hooks.remove()
    torch.testing.assert_close(compact, masked, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="at least one must stay"):
        oneshot_prune(model, tiny_tokenizer(), texts, criterion=criterion, layer_ratio=0.9)


def test_wandb_layer_rows_show_removed_layers():
    from loraprune_trainer.wandb_logging import layer_rows, mask_heatmap

    model = lora_model("llama-gqa", num_layers=3)
    state = PruningState(discover_structure(model))
    state.layer_scores = torch.tensor([1.0, 0.5, 2.0])
    state.prune_layers_to(1)
    rows = layer_rows(state)
    assert [r[:5] for r in rows] == [[0, 1, 2, 6, 40], [1, 0, 0, 0, 0], [2, 1, 2, 6, 40]]
    assert rows[1][5] == 0.5
    import matplotlib.pyplot as plt

    fig = mask_heatmap(state)
    plt.close(fig)
