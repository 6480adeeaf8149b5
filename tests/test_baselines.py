"""Baseline criteria: vanilla (true gradients), magnitude, wanda, random."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import VOCAB, tiny_model, tiny_text_dataset, tiny_tokenizer
from transformers import TrainerCallback

from loraprune_trainer import LoRAPruneConfig, LoRAPruneTrainer
from loraprune_trainer.criteria import (MagnitudeCriterion, RandomCriterion, VanillaCriterion, WandaCriterion,
                                         merged_weight)
from loraprune_trainer.config import LoRAPruneConfig as _Cfg
from loraprune_trainer.criteria import CRITERIA, build_criterion
from loraprune_trainer.structure import ROWS, discover_structure


def lora_model(name="llama-gqa", seed=0, dropout=0.0):
    model = tiny_model(name, seed=seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  lora_dropout=dropout))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # non-zero B so that W' = W + s B A differs from W
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return peft_model


def batch(seed=0, shape=(2, 12)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, shape, generator=g)


def test_registry_and_config_choices():
    for name in ("lora", "taylor_gate", "vanilla", "magnitude", "wanda", "random"):
        assert name in CRITERIA
        assert build_criterion(name).name == name
        _Cfg(output_dir="/tmp/unused", pruning_criterion=name, use_cpu=True, bf16=False)  # accepted by the config
    with pytest.raises(ValueError, match="pruning_criterion"):
        _Cfg(output_dir="/tmp/unused", pruning_criterion="nope", use_cpu=True, bf16=False)


@pytest.mark.parametrize("score_form", ["square", "abs"])
def test_vanilla_equals_brute_force_autograd(score_form):
    """Eq. 3 against autograd on an explicit merged-weight leaf: y = x W'^T with W' a Parameter."""
    model = lora_model("llama-gqa")
    structure = discover_structure(model)
    crit = VanillaCriterion(score_form=score_form)
    crit.attach(structure, model)
    ids = batch(0)
    # Two micro-batches: the criterion must sum their gradients.
    model(input_ids=ids, labels=ids).loss.backward()
    model(input_ids=batch(1), labels=batch(1)).loss.backward()
    scores = crit.score(structure)
    # The base weights carry no .grad (moved into the criterion's buffer) and LoRA grads exist.
    for _, _, module in ((g, m, structure.module(g, m)) for g in structure.groups() for m in g.members):
        assert module.get_base_layer().weight.grad is None
        assert module.lora_A["default"].weight.grad is not None

    # Brute force: a plain copy of the model with the merged weights as leaves.
    plain = tiny_model("llama-gqa")
    merged = {}
    with torch.no_grad():
        for g in structure.groups():
            for m in g.members:
                name = f"model.layers.{g.layer_idx}.{m.module}"
                target = plain.get_submodule(name)
                target.weight.copy_(merged_weight(structure.module(g, m)))
                merged[(g.name, m.module)] = target.weight
    plain.zero_grad()
    plain(input_ids=ids, labels=ids).loss.backward()
    plain(input_ids=batch(1), labels=batch(1)).loss.backward()
    for g in structure.groups():
        expect = torch.zeros(g.num_units)
        for m in g.members:
            w = merged[(g.name, m.module)]
            prod = w.grad * w
            imp = prod.square() if score_form == "square" else prod.abs()
            per = imp.sum(dim=1) if m.dim == ROWS else imp.sum(dim=0)
            expect += per.view(g.num_units, m.unit_size).sum(dim=1)
        torch.testing.assert_close(scores[g.name], expect, rtol=1e-4, atol=1e-10)
    crit.detach()
    assert all(not structure.module(g, m).get_base_layer().weight.requires_grad
               for g in structure.groups() for m in g.members)


def test_vanilla_restarts_each_step():
    model = lora_model()
    structure = discover_structure(model)
    step = {"n": 0}
    crit = VanillaCriterion()
    crit.attach(structure, model, step_fn=lambda: step["n"])
    ids = batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    first = crit.score(structure)
    step["n"] = 1  # a new optimizer step: the old gradient must not be added
    model(input_ids=ids, labels=ids).loss.backward()
    second = crit.score(structure)
    for k in first:
        torch.testing.assert_close(first[k], second[k])


def test_magnitude_is_merged_weight_abs_sum():
    model = lora_model("llama-mha")
    structure = discover_structure(model)
    scores = MagnitudeCriterion().score(structure)
    mlp = structure.mlp[0]
    layer = structure.layers[0].mlp
    w = lambda mod: (mod.get_base_layer().weight + mod.scaling["default"]
                     * mod.lora_B["default"].weight @ mod.lora_A["default"].weight).abs()
    expect = w(layer.gate_proj).sum(1) + w(layer.up_proj).sum(1) + w(layer.down_proj).sum(0)
    torch.testing.assert_close(scores[mlp.name], expect.detach())
    # LoRA matters: the base weight alone gives different scores.
    base_only = (layer.gate_proj.get_base_layer().weight.abs().sum(1) + layer.up_proj.get_base_layer().weight.abs().sum(1)
                 + layer.down_proj.get_base_layer().weight.abs().sum(0))
    assert not torch.allclose(scores[mlp.name], base_only.detach())


def test_wanda_activation_norms_equal_hand_computation():
    model = lora_model("llama-gqa")
    structure = discover_structure(model)
    crit = WandaCriterion()
    crit.attach(structure, model)
    model.train()
    captured = {}
    layer = structure.layers[1]
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(
                 lambda m, a: captured.setdefault("down", []).append(a[0].detach().clone())),
             layer.self_attn.q_proj.register_forward_pre_hook(
                 lambda m, a: captured.setdefault("q", []).append(a[0].detach().clone()))]
    for s in (0, 1):  # two micro-batches of one step
        ids = batch(s)
        model(input_ids=ids, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    for key, module in (("down", layer.mlp.down_proj), ("q", layer.self_attn.q_proj)):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured[key]])  # [tokens, in]
        hand = torch.sqrt((x ** 2).sum(dim=0))
        torch.testing.assert_close(crit.activation_norm(module), hand)
    # And the down_proj unit scores: ||X_c|| * sum_i |W'_ic| plus the gate/up rows' |W'| @ ||X||.
    scores = crit.score(structure)
    norm_down = crit.activation_norm(layer.mlp.down_proj)
    norm_in = crit.activation_norm(layer.mlp.gate_proj)
    expect = (merged_weight(layer.mlp.gate_proj).abs() @ norm_in + merged_weight(layer.mlp.up_proj).abs() @ norm_in
              + merged_weight(layer.mlp.down_proj).abs().sum(0) * norm_down)
    torch.testing.assert_close(scores[structure.mlp[1].name], expect)
    crit.detach()


def test_wanda_counts_each_token_once_under_gradient_checkpointing_and_ignores_eval():
    def norms(checkpointing):
        model = lora_model("llama-gqa")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        structure = discover_structure(model)
        crit = WandaCriterion()
        crit.attach(structure, model)
        model.train()
        ids = batch(0)
        model(input_ids=ids, labels=ids).loss.backward()
        model.eval()
        with torch.no_grad():
            model(input_ids=batch(5))  # evaluation forwards do not count
        return crit.activation_norm(structure.layers[0].mlp.down_proj)

    torch.testing.assert_close(norms(True), norms(False))


def test_random_is_seeded():
    structure = discover_structure(lora_model())
    a = RandomCriterion(seed=3).score(structure)
    b = RandomCriterion(seed=3).score(structure)
    c = RandomCriterion(seed=4).score(structure)
    for k in a:
        assert torch.equal(a[k], b[k])
    assert any(not torch.equal(a[k], c[k]) for k in a)


def _train(criterion, tmp_path, steps=6, **cfg):
    model = tiny_model("llama-gqa", seed=0)
    args = LoRAPruneConfig(
        output_dir=str(tmp_path / criterion), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=100, save_strategy="no", report_to="none", use_cpu=True, bf16=False, max_length=24,
        pruning_ratio=0.5, pruning_criterion=criterion, prune_freq=1, seed=0, dataset_num_proc=None, **cfg,
    )
    trainer = LoRAPruneTrainer(model, args, train_dataset=tiny_text_dataset(32), processing_class=tiny_tokenizer(),
                               peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      task_type="CAUSAL_LM"))
    return trainer


@pytest.mark.parametrize("criterion", ["vanilla", "taylor_gate", "magnitude", "wanda", "random"])
def test_each_criterion_trains_end_to_end_and_reaches_target(criterion, tmp_path):
    trainer = _train(criterion, tmp_path)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    for name, group in trainer.pruning_state.groups.items():
        assert trainer.pruning_state.num_pruned(name) == trainer.final_prune_counts[name] > 0
    assert trainer.pruning_state.num_score_updates > 0
    # Scores are informative (not all equal) for every criterion.
    assert all(s.std() > 0 for s in trainer.pruning_state.scores.values())
    # Base weights never change (vanilla: requires_grad but excluded from the optimizer).
    for n, p in trainer.model.named_parameters():
        if n in base:
            assert torch.equal(p.detach(), base[n]), n
    # Only LoRA parameters were ever in the optimizer (vanilla's requires_grad base weights excluded).
    lora_ids = {id(p) for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert all(id(p) in lora_ids for g in trainer.optimizer.param_groups for p in g["params"])
    # After the ramp the criterion is detached: no base weight still asks autograd for a gradient.
    assert trainer.criterion.frozen_parameters() == []
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)
    report = trainer.save_pruned_model(str(tmp_path / f"{criterion}-pruned"))
    assert report["parameters"]["model_after"] < report["parameters"]["model_before"]


def test_vanilla_base_weights_require_grad_during_the_ramp_only(tmp_path):
    trainer = _train("vanilla", tmp_path, steps=10)  # ramp ends at step 9: step 10 is recovery
    seen = []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            seen.append(bool(trainer.criterion.frozen_parameters()))

    trainer.add_callback(Probe())
    trainer.train()
    assert seen == [True] * 9 + [False]


def test_vanilla_without_gradient_checkpointing(tmp_path):
    # SFTConfig enables gradient checkpointing by default (the tests above); cover the plain path too.
    trainer = _train("vanilla", tmp_path, steps=4, gradient_checkpointing=False)
    trainer.train()
    assert trainer.pruning_state.num_score_updates > 0
    assert all(s.std() > 0 for s in trainer.pruning_state.scores.values())
