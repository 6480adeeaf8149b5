"""The `taylor_gate` criterion: per-unit gate gradients against brute force, in float64."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import VOCAB, tiny_model

from loraprune_trainer.criteria import TaylorGateCriterion, build_criterion
from loraprune_trainer.masks import MaskHooks, PruningState
from loraprune_trainer.structure import COLUMNS, discover_structure


def lora_model(name="llama-gqa", seed=0, dtype=torch.float64, unit="kv_group"):
    model = get_peft_model(tiny_model(name, seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # non-zero B: the adapters change what the units compute
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model = model.to(dtype).train()  # LoRA dropout is 0: training mode is deterministic
    return model, discover_structure(model, unit)


def batches(n=2, shape=(2, 10)):
    return [torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(s)) for s in range(n)]


def lm_loss(model, ids):
    """Next-token cross-entropy in the model's dtype (transformers' loss upcasts only to float32,
    too coarse for finite differences)."""
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def loss_of(model, ids_list):
    return sum(lm_loss(model, ids) for ids in ids_list) / len(ids_list)


def column_module(structure, group):
    (member,) = [m for m in group.members if m.dim == COLUMNS]
    return structure.module(group, member), member.unit_size


def gate_grads(model, structure, ids_list):
    crit = TaylorGateCriterion()
    crit.attach(structure, model)
    for ids in ids_list:  # micro-batches of one step: their gradients add up
        (lm_loss(model, ids) / len(ids_list)).backward()
    grads = crit.gate_gradients()
    crit.detach()
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("arch,unit", [("llama-gqa", "kv_group"), ("llama-gqa-hd", "query_head"),
                                       ("qwen2-gqa", "query_head"), ("llama-mha", "kv_group")])
def test_gate_gradient_is_sum_of_x_times_dl_dx(arch, unit):
    """The exact autograd identity dL/dm_u = sum over tokens of x_u . dL/dx_u, at every column member."""
    model, structure = lora_model(arch, unit=unit)
    ids_list = batches()
    grads = gate_grads(model, structure, ids_list)

    inputs, handles = {}, []
    for group in structure.groups():
        module, _ = column_module(structure, group)

        def keep_input(mod, args, name=group.name):
            args[0].retain_grad()
            inputs.setdefault(name, []).append(args[0])

        handles.append(module.register_forward_pre_hook(keep_input))
    loss_of(model, ids_list).backward()
    for h in handles:
        h.remove()
    for group in structure.groups():
        _, unit_size = column_module(structure, group)
        want = sum((x.detach() * x.grad).reshape(-1, group.num_units, unit_size).sum(dim=(0, 2)) for x in inputs[group.name])
        assert want.abs().max() > 0
        torch.testing.assert_close(grads[group.name].double(), want.double(), rtol=1e-5, atol=1e-9)


def _scaled_loss(model, structure, ids_list, group, unit, factor):
    """The loss with unit ``unit`` of ``group`` scaled by ``factor`` (0 removes it)."""
    module, unit_size = column_module(structure, group)
    scale = torch.ones(group.num_units * unit_size, dtype=torch.float64)
    scale[unit * unit_size:(unit + 1) * unit_size] = factor
    handle = module.register_forward_pre_hook(lambda mod, args: (args[0] * scale, *args[1:]))
    try:
        with torch.no_grad():
            return float(loss_of(model, ids_list))
    finally:
        handle.remove()


def test_gate_gradient_matches_finite_differences():
    model, structure = lora_model("llama-gqa", unit="query_head")
    ids_list = batches()
    grads = gate_grads(model, structure, ids_list)
    # Central differences with a step of 3%: Llama's RMSNorm computes in float32 even in a float64
    # model, so much smaller steps drown in rounding (the truncation error here is ~0.2%).
    eps = 0.03
    for group in structure.groups():
        for unit in range(0, group.num_units, max(1, group.num_units // 7)):
            up = _scaled_loss(model, structure, ids_list, group, unit, 1 + eps)
            down = _scaled_loss(model, structure, ids_list, group, unit, 1 - eps)
            fd = (up - down) / (2 * eps)
            assert float(grads[group.name][unit]) == pytest.approx(fd, rel=5e-3, abs=1e-8), (group.name, unit)


def test_first_order_prediction_tracks_removing_each_unit():
    """Removing a unit (m_u: 1 -> 0) changes the loss by about -dL/dm_u: the prediction ranks the
    true loss changes of single MLP-channel removals almost perfectly on a tiny model."""
    model, structure = lora_model("llama-gqa")
    ids_list = batches()
    grads = gate_grads(model, structure, ids_list)
    base = _scaled_loss(model, structure, ids_list, structure.mlp[0], 0, 1.0)
    for group in structure.mlp:
        actual = torch.tensor([_scaled_loss(model, structure, ids_list, group, u, 0.0) - base
                               for u in range(group.num_units)], dtype=torch.float64)
        predicted = -grads[group.name].double()
        corr = torch.corrcoef(torch.stack([actual, predicted]))[0, 1]
        assert corr > 0.95, float(corr)
        # And the squared score orders units by the size of their true effect.
        rank = lambda t: t.argsort().argsort().double()
        assert torch.corrcoef(torch.stack([rank(actual.abs()), rank(predicted.abs())]))[0, 1] > 0.8


def test_scores_square_or_abs_and_reset_each_step():
    model, structure = lora_model("llama-gqa", dtype=torch.float32)
    ids_list = batches()
    grads = gate_grads(model, structure, ids_list)
    for form in ("square", "abs"):
        crit = build_criterion("taylor_gate", score_form=form)
        crit.attach(structure, model)
        for step in range(2):  # score() clears the gates, so the second step is not added to the first
            for ids in ids_list:
                (model(input_ids=ids, labels=ids).loss / len(ids_list)).backward()
            scores = crit.score(structure)
            model.zero_grad(set_to_none=True)
            for name, g in grads.items():
                want = g.square() if form == "square" else g.abs()
                torch.testing.assert_close(scores[name], want.float(), rtol=1e-5, atol=1e-12)
        crit.detach()


def test_masked_units_score_zero_and_eval_forwards_do_not_count():
    model, structure = lora_model("llama-gqa", dtype=torch.float32)
    state = PruningState(structure)
    name = structure.mlp[0].name
    state.scores[name] = torch.arange(structure.mlp[0].num_units, dtype=torch.float32)
    state.prune_to(name, 5)
    hooks = MaskHooks(state)
    crit = TaylorGateCriterion()
    crit.attach(structure, model)
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    scores = crit.score(structure)
    assert torch.all(scores[name][~state.keep[name]] == 0)
    assert torch.all(scores[name][state.keep[name]] > 0)
    hooks.remove()
    crit.detach()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_counts_each_token_once(reentrant):
    def grads(checkpointing):
        model, structure = lora_model("llama-gqa", dtype=torch.float32)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        return gate_grads(model, structure, batches())

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-10)


def test_loss_scale_is_divided_out():
    model, structure = lora_model("llama-gqa", dtype=torch.float32)
    ids = batches(1)[0]
    plain = gate_grads(model, structure, [ids])
    crit = TaylorGateCriterion()
    crit.attach(structure, model)
    crit._loss_scale_fn = lambda: 1024.0  # what an fp16 GradScaler would report
    (model(input_ids=ids, labels=ids).loss * 1024.0).backward()
    scaled = crit.gate_gradients()
    for name in plain:
        torch.testing.assert_close(scaled[name], plain[name], rtol=1e-5, atol=1e-12)


def test_scoring_without_a_backward_pass_is_a_clear_error():
    model, structure = lora_model("llama-gqa", dtype=torch.float32)
    crit = TaylorGateCriterion()
    with pytest.raises(RuntimeError, match="not attached"):
        crit.score(structure)
    crit.attach(structure, model)
    with pytest.raises(RuntimeError, match="No gate gradient"):
        crit.score(structure)


@pytest.mark.parametrize("unit_size,num_units", [(1, 12), (4, 3), (12, 1)])
def test_gate_probe_equals_the_gate_product_it_replaces(unit_size, num_units):
    """``gate_probe(x, m)`` is ``x`` itself in the forward and passes ``dL/dx`` through unchanged,
    while ``m`` gets exactly the gradient of ``x * repeat_interleave(m)`` at ``m = 1``
    (a scalar gate over the whole last dimension too, as the layer gates use)."""
    from loraprune_trainer.criteria.taylor import gate_probe

    torch.manual_seed(0)
    x = torch.randn(3, 5, unit_size * num_units, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(unit_size * num_units, 7, dtype=torch.float64)
    results = []
    for probe in (True, False):
        gate = torch.ones(num_units if num_units > 1 or unit_size != 12 else (), dtype=torch.float32,
                          requires_grad=True)
        x.grad = None
        if probe:
            y = gate_probe(x, gate)
            assert torch.equal(y, x)
        else:
            y = x * gate.double().reshape(-1).repeat_interleave(unit_size)
        (torch.tanh(y @ weight).sum()).backward()
        assert gate.grad.shape == gate.shape and gate.grad.dtype == torch.float32
        results.append((gate.grad.clone(), x.grad.clone()))
    (probe_gate, probe_x), (product_gate, product_x) = results
    assert torch.allclose(probe_gate, product_gate, rtol=1e-6, atol=1e-9)
    assert torch.equal(probe_x, product_x)
