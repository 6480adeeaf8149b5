"""Structure discovery, the LoRA criterion, masks, schedule and export on tiny random models."""

import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import VOCAB, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from loraprune_trainer.criteria import LoRACriterion, combine_member_scores
from loraprune_trainer.export import build_pruned_state, save_pruned_model
from loraprune_trainer.masks import MaskHooks, PruningState
from loraprune_trainer.schedule import PruningSchedule, final_prune_count, scheduled_prune_count
from loraprune_trainer.structure import (COLUMNS, ROWS, UnsupportedModelError, discover_structure,
                                         lora_coverage_problems)

ARCHS = ["llama-mha", "llama-gqa", "llama-gqa-hd", "mistral-gqa", "qwen2-gqa", "qwen3-gqa"]


def lora_model(name, seed=0, r=4, **kw):
    model = tiny_model(name, seed=seed, **kw)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # B = 0 at init would make the adapter a no-op; give it weight so merging matters
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return peft_model


def backward_once(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()


# ---------------------------------------------------------------------------------------------------
# structure


def test_group_membership_mha():
    s = discover_structure(lora_model("llama-mha"), "kv_group")
    # 4 heads of head_dim 8: a unit is one head with its own k/v head
    attn = s.attention[0]
    assert (attn.num_units, attn.heads_per_unit, attn.units_per_kv_group) == (4, 1, 1)
    assert {(m.module, m.dim, m.unit_size) for m in attn.members} == {
        ("self_attn.q_proj", ROWS, 8), ("self_attn.k_proj", ROWS, 8), ("self_attn.v_proj", ROWS, 8),
        ("self_attn.o_proj", COLUMNS, 8)}
    # under MHA "query_head" is the same unit
    s2 = discover_structure(lora_model("llama-mha"), "query_head")
    assert s2.attention[0].members == attn.members and s2.attention_unit == "kv_group"
    mlp = s.mlp[1]
    assert mlp.num_units == 48 and {(m.module, m.dim) for m in mlp.members} == {
        ("mlp.gate_proj", ROWS), ("mlp.up_proj", ROWS), ("mlp.down_proj", COLUMNS)}
    assert len(s.groups()) == 4 and s.num_layers == 2


def test_group_membership_gqa():
    model = lora_model("llama-gqa-hd")  # 8 query heads over 2 KV heads, head_dim 6 != hidden/heads
    kv = discover_structure(model, "kv_group").attention[0]
    assert (kv.num_units, kv.heads_per_unit) == (2, 4)
    assert {(m.module, m.unit_size) for m in kv.members} == {
        ("self_attn.q_proj", 24), ("self_attn.k_proj", 6), ("self_attn.v_proj", 6), ("self_attn.o_proj", 24)}
    qh = discover_structure(model, "query_head").attention[0]
    assert (qh.num_units, qh.heads_per_unit, qh.units_per_kv_group) == (8, 1, 4)
    # shared key/value heads are never cut by query-head units
    assert {m.module for m in qh.members} == {"self_attn.q_proj", "self_attn.o_proj"}


def test_unsupported_model_errors_clearly():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB))
    with pytest.raises(UnsupportedModelError, match="model_type='gpt2'"):
        discover_structure(gpt2)


def test_lora_coverage_problems():
    assert lora_coverage_problems("all-linear") == []
    assert lora_coverage_problems(["q_proj", "v_proj"]) == ["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora_coverage_problems(None) != []


# ---------------------------------------------------------------------------------------------------
# criterion


def brute_force_group_scores(model, structure, group, score_form, normalize):
    """Per-unit importance from an explicit SGD step (lr 1) in float64 and explicit index lists."""
    layer = structure.layers[group.layer_idx]
    d, n_rep = structure.head_dim, structure.heads_per_kv
    per_member = []
    for member in group.members:
        mod = layer.get_submodule(member.module)
        a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        s = mod.scaling["default"]
        a64, b64 = a.detach().double(), b.detach().double()
        a_new, b_new = a64 - a.grad.double(), b64 - b.grad.double()
        est_grad = b64 @ a64 - b_new @ a_new  # minus the change of BA under one SGD step
        merged = mod.get_base_layer().weight.detach().double() + s * b64 @ a64
        imp = (est_grad * merged) ** 2 if score_form == "square" else (est_grad * merged).abs()
        scores = []
        for u in range(group.num_units):
            if group.kind == "mlp":
                idx = [u]
            elif member.module.endswith(("k_proj", "v_proj")):
                idx = list(range(u * d, (u + 1) * d))  # kv head u
            elif group.units_per_kv_group > 1:  # query head u
                idx = list(range(u * d, (u + 1) * d))
            else:  # the n_rep query heads that read kv head u
                idx = [i for h in range(structure.num_heads) if h // n_rep == u
                       for i in range(h * d, (h + 1) * d)]
            scores.append(imp[idx, :].sum() if member.dim == ROWS else imp[:, idx].sum())
        per_member.append(torch.stack(scores))
    return combine_member_scores(per_member, normalize)


@pytest.mark.parametrize("arch,unit", [("llama-mha", "kv_group"), ("llama-gqa-hd", "kv_group"),
                                       ("llama-gqa-hd", "query_head"), ("qwen2-gqa", "kv_group")])
@pytest.mark.parametrize("score_form,normalize", [("square", False), ("abs", True)])
def test_lora_criterion_matches_brute_force(arch, unit, score_form, normalize):
    model = lora_model(arch)
    backward_once(model)
    structure = discover_structure(model, unit)
    for group in structure.groups():
        assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.grad is None
        got = LoRACriterion(score_form, normalize).group_scores(structure, group)
        want = brute_force_group_scores(model, structure, group, score_form, normalize)
        assert got.shape == (group.num_units,)
        assert want.abs().max() > 0
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-12)


def test_criterion_chunking_is_exact(monkeypatch):
    model = lora_model("llama-gqa")
    backward_once(model)
    structure = discover_structure(model)
    full = LoRACriterion().score(structure)
    import loraprune_trainer.criteria.common as crit

    monkeypatch.setattr(crit, "CHUNK_ELEMENTS", 7 * 48)  # 7 rows per chunk
    chunked = LoRACriterion().score(structure)
    for name in full:
        torch.testing.assert_close(full[name], chunked[name], rtol=1e-5, atol=0)


def test_moving_average_and_nonfinite_skip():
    structure = discover_structure(lora_model("llama-mha"))
    state = PruningState(structure)
    name = structure.mlp[0].name
    ones = {n: torch.ones(g.num_units) for n, g in state.groups.items()}
    assert state.update_scores(ones, 0.9)
    torch.testing.assert_close(state.scores[name], torch.full((48,), 0.1))
    assert state.update_scores({n: 2 * v for n, v in ones.items()}, 0.9)
    torch.testing.assert_close(state.scores[name], torch.full((48,), 0.9 * 0.1 + 0.1 * 2))
    bad = {n: v.clone() for n, v in ones.items()}
    bad[name][3] = float("nan")
    with pytest.warns(UserWarning, match="non-finite"):
        assert not state.update_scores(bad, 0.9)
    assert state.num_score_updates == 2 and torch.isfinite(state.scores[name]).all()


# ---------------------------------------------------------------------------------------------------
# masks


def test_masks_only_grow_and_prune_lowest():
    structure = discover_structure(lora_model("llama-gqa-hd"), "query_head")
    state = PruningState(structure)
    name = structure.attention[0].name
    state.scores[name] = torch.tensor([5.0, 1.0, 3.0, 4.0, 0.5, 9.0, 8.0, 0.1])
    assert state.prune_to(name, 2) == [1, 7]  # one per KV group: the lowest in each
    state.scores[name] = torch.tensor([0.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0])  # unit 1 now looks great
    newly = state.prune_to(name, 4)
    assert newly == [0, 4]
    assert not state.keep[name][1] and not state.keep[name][7], "a pruned unit never comes back"
    assert state.prune_to(name, 2) == []  # asking for fewer never restores units
    with pytest.raises(ValueError, match="evenly"):
        state.prune_to(name, 3)


def random_masks(state, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, group in state.groups.items():
        count = final_prune_count(group, 0.5)
        state.scores[name] = torch.rand(group.num_units, generator=g)
        state.prune_to(name, count)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("unit", ["kv_group", "query_head"])
def test_masked_model_equals_compacted_model(arch, unit, tmp_path):
    model = lora_model(arch)
    structure = discover_structure(model, unit)
    state = PruningState(structure)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    hooks = MaskHooks(state)
    random_masks(state)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    assert (masked - dense).abs().max() > 1e-3, "masks must change the output"

    report = save_pruned_model(model, state, str(tmp_path / "pruned"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned")).eval()
    with torch.no_grad():
        compact = reloaded(input_ids=ids).logits
    assert (compact - masked).abs().max() < 1e-4
    assert report["parameters"]["model_after"] == sum(p.numel() for p in reloaded.parameters())
    assert report["parameters"]["model_after"] < report["parameters"]["model_before"]
    cfg = reloaded.config
    assert cfg.intermediate_size == structure.intermediate_size - final_prune_count(structure.mlp[0], 0.5)
    assert not any(n.startswith(".") for n in os.listdir(tmp_path)), "no temporary folders left behind"
    hooks.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense)


def test_zeroing_query_rows_alone_is_not_pruning():
    """Why masks act on o_proj's inputs: a head with zeroed q still averages V (uniform softmax)."""
    model = lora_model("llama-mha")
    structure = discover_structure(model)
    state = PruningState(structure)
    state.prune_to(structure.attention[0].name, 1)
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    hooks = MaskHooks(state)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    hooks.remove()
    head = int((~state.keep[structure.attention[0].name]).nonzero()[0])
    q = structure.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.base_layer.weight[head * 8:(head + 1) * 8] = 0
        q.lora_B["default"].weight[head * 8:(head + 1) * 8] = 0
        zeroed_q = model(input_ids=ids).logits
    assert (zeroed_q - masked).abs().max() > 1e-4


def test_export_pads_heads_when_config_class_refuses(tmp_path):
    # 8 query heads over 2 KV heads in hidden 32; removing 1 query head per KV group leaves 6 heads and
    # LlamaConfig refuses 32 % 6 != 0, so export adds zero heads (8 again) that contribute nothing.
    model = lora_model("llama-gqa-hd")
    structure = discover_structure(model, "query_head")
    state = PruningState(structure)
    for group in structure.attention:
        state.prune_to(group.name, 2)
    hooks = MaskHooks(state)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    _, config, info = build_pruned_state(model, state)
    assert info["num_attention_heads"] == 6 and info["zero_heads_added_for_config"] == 2
    assert config.num_attention_heads == 8 and config.head_dim == 6
    save_pruned_model(model, state, str(tmp_path / "p"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p"))
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - masked).abs().max() < 1e-4
    hooks.remove()


def test_export_is_atomic(tmp_path, monkeypatch):
    model = lora_model("llama-gqa")
    state = PruningState(discover_structure(model))
    random_masks(state)
    target = tmp_path / "pruned"
    target.mkdir()
    (target / "keep.txt").write_text("previous export")

    def broken_save(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_pruned_model(model, state, str(target))
    assert sorted(os.listdir(tmp_path)) == ["pruned"], "no half-written folder left"
    assert (target / "keep.txt").read_text() == "previous export", "the previous export is untouched"


# ---------------------------------------------------------------------------------------------------
# schedule


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.25, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("arch,unit", [("llama-mha", "kv_group"), ("llama-gqa-hd", "kv_group"),
                                       ("llama-gqa-hd", "query_head"), ("qwen3-gqa", "query_head")])
def test_schedule_reaches_exact_target(ratio, arch, unit):
    structure = discover_structure(lora_model(arch), unit)
    state = PruningState(structure)
    final = {n: final_prune_count(g, ratio) for n, g in state.groups.items()}
    schedule = PruningSchedule(total_steps=97, prune_freq=10, warmup_ratio=0.1, cooldown_ratio=0.1)
    g = torch.Generator().manual_seed(0)
    previous = dict.fromkeys(final, 0)
    for step in range(1, 98):
        for n in state.scores:
            state.scores[n] = torch.rand(state.scores[n].shape, generator=g)
        if schedule.is_update_step(step):
            for n, group in state.groups.items():
                state.prune_to(n, scheduled_prune_count(group, final[n], schedule.progress(step)))
        for n in final:
            assert state.num_pruned(n) >= previous[n]
            previous[n] = state.num_pruned(n)
    for n, group in state.groups.items():
        assert state.num_pruned(n) == final[n]
        if group.kind == "mlp":  # plain rounding of ratio * units: no unit short of the target
            assert final[n] == int(ratio * group.num_units + 0.5)


def test_final_counts_respect_gqa_layout():
    structure = discover_structure(lora_model("llama-gqa-hd"), "query_head")  # 4 query heads per KV head
    attn = structure.attention[0]
    assert final_prune_count(attn, 0.5) == 4  # 2 per KV group
    assert final_prune_count(attn, 0.3) == 2  # round(1.2) = 1 per KV group
    assert final_prune_count(attn, 0.95) == 6  # at least one query head stays in every KV group
    kv = discover_structure(lora_model("llama-gqa-hd"), "kv_group").attention[0]
    assert final_prune_count(kv, 0.5) == 1 and final_prune_count(kv, 0.9) == 1  # one KV group always stays


def test_schedule_shape():
    s = PruningSchedule(total_steps=100, prune_freq=10, warmup_ratio=0.1, cooldown_ratio=0.2)
    assert (s.ramp_start, s.ramp_end) == (10, 80)
    assert s.progress(9) == 0.0 and s.progress(80) == 1.0 and s.progress(100) == 1.0
    assert s.progress(45) == pytest.approx(1 - 0.5**3)
    updates = [t for t in range(1, 101) if s.is_update_step(t)]
    assert updates == [10, 20, 30, 40, 50, 60, 70, 80]
    s2 = PruningSchedule(total_steps=100, prune_freq=15, warmup_ratio=0.1, cooldown_ratio=0.15)
    assert [t for t in range(1, 101) if s2.is_update_step(t)][-1] == 85  # the ramp's end is always an update
    one = PruningSchedule(total_steps=50, prune_freq=10, warmup_ratio=0.0, cooldown_ratio=0.0, kind="one_shot")
    assert [t for t in range(1, 51) if one.is_update_step(t)] == [1] and one.progress(1) == 1.0
