"""Compensation (issue 16): the refit's math against torch.linalg.lstsq, exact restoration when the
removed inputs are linear in the kept ones, FLAP's bias restoring the output mean, and the
guarantees with a refit at every mask update: masked == exported, exact resume, two processes ==
one, the reference format, one-shot pruning, and clear refusals."""

import json
import os
import socket
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from scripts.tiny_train import make_trainer
from tiny import VOCAB, tiny_model, tiny_text_dataset, tiny_tokenizer
from transformers import AutoModelForCausalLM

from loraprune_trainer import LoRAPruneConfig, load_masked_model
from loraprune_trainer.compensation import (MomentAccumulator, bias_shift, compensate, consumer, consumer_name,
                                            consumer_tensors, ridge_refit, unit_columns)
from loraprune_trainer.criteria.common import base_linear, merged_weight
from loraprune_trainer.distributed import UnsupportedBackendError, check_distributed_backend
from loraprune_trainer.oneshot import oneshot_prune
from loraprune_trainer.resume import COMPENSATION_STATE_NAME
from loraprune_trainer.structure import discover_structure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lora_model(arch="llama-gqa", seed=0):
    model = get_peft_model(tiny_model(arch, seed=seed),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # a non-zero B, so W' = W + s B A differs from W and the merge matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


# -- the math ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ridge", [0.0, 0.1])
def test_ridge_refit_equals_lstsq_on_the_same_activations(ridge):
    """Delta = W'_P C_PK (C_KK + lambda I)^-1 is the least-squares fit of the removed columns'
    contribution from the kept inputs; with a ridge, the same problem with sqrt(n lambda) I rows appended."""
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out = 200, 12, 5
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ torch.randn(d_in, d_in, generator=g,
                                                                            dtype=torch.float64)
    weight = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    pruned, kept = torch.tensor([1, 4, 7]), torch.tensor([0, 2, 3, 5, 6, 8, 9, 10, 11])  # 11 is kept; none earlier
    second = (x.T @ x / n).float()
    delta, lam = ridge_refit(weight.float(), second, kept, pruned, ridge)

    target = x[:, pruned] @ weight[:, pruned].T  # [n, out]: what the removed columns contributed
    design = x[:, kept]
    assert lam == pytest.approx(ridge * float(second[kept][:, kept].diagonal().mean()), rel=1e-6)
    if lam > 0:
        design = torch.cat([design, (n * lam) ** 0.5 * torch.eye(kept.numel(), dtype=torch.float64)])
        target = torch.cat([target, torch.zeros(kept.numel(), d_out, dtype=torch.float64)])
    expected = torch.linalg.lstsq(design, target).solution.T  # [out, k]
    torch.testing.assert_close(delta.double(), expected, rtol=2e-4, atol=2e-5)
    if ridge > 0:  # the ridge shrinks the refit
        assert delta.norm() < torch.linalg.lstsq(x[:, kept], x[:, pruned] @ weight[:, pruned].T).solution.norm()


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_refit_restores_output_exactly_when_removed_inputs_are_linear_in_kept(kind):
    """On a LoRA-wrapped consumer (down_proj / o_proj): if x_P = x_K M, the ridge-free refit makes the
    masked layer compute exactly what the unmasked one did; a unit removed earlier (zero input) and
    LoRA stay untouched."""
    model = _lora_model("llama-mha")  # 4 heads of 8 dims; 48 MLP channels
    structure = discover_structure(model)
    group = structure.mlp[0] if kind == "mlp" else structure.attention[0]
    module = consumer(structure, group)
    before = torch.ones(group.num_units, dtype=torch.bool)
    before[0] = False  # pruned earlier: its inputs are zero
    after = before.clone()
    after[[1, 2] if kind == "mlp" else [2]] = False
    kept, pruned = unit_columns(group, after), unit_columns(group, before & ~after)

    g = torch.Generator().manual_seed(1)
    d_in = base_linear(module).in_features
    x = torch.zeros(300, d_in)
    x[:, kept] = torch.randn(300, kept.numel(), generator=g)
    x[:, pruned] = x[:, kept] @ torch.randn(kept.numel(), pruned.numel(), generator=g) / kept.numel() ** 0.5
    lora_a = module.lora_A["default"].weight.clone()
    masked = x.clone()
    masked[:, pruned] = 0
    with torch.no_grad():
        expected, unrefit = module(x), module(masked)
    acc = MomentAccumulator(model, second_moments=True)
    acc.add(consumer_name(group), x)
    records = compensate(structure, {group.name: before}, {group.name: after}, acc.moments, "lstsq", ridge=0.0)
    assert [r["group"] for r in records] == [group.name] and records[0]["lambda"] == 0.0
    assert records[0]["error_after"] < 1e-6 * records[0]["error_before"]
    with torch.no_grad():
        got = module(masked)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (unrefit - expected).abs().max() > 1e-2  # without the refit the cut changes the output
    assert torch.equal(module.lora_A["default"].weight, lora_a)  # the delta went into the base weight


def test_bias_restores_output_mean():
    """FLAP: b += W'_P E[x_P] leaves the mean of the layer's output over the recorded tokens unchanged."""
    model = _lora_model("llama-gqa")
    structure = discover_structure(model)
    group = structure.mlp[1]
    module = consumer(structure, group)
    base_linear(module).bias = torch.nn.Parameter(torch.zeros(base_linear(module).out_features),
                                                  requires_grad=False)
    before = torch.ones(group.num_units, dtype=torch.bool)
    after = before.clone()
    after[::3] = False
    pruned = unit_columns(group, ~after)
    x = torch.randn(500, group.num_units, generator=torch.Generator().manual_seed(2)) + 0.7  # non-zero mean
    with torch.no_grad():
        expected = module(x).mean(dim=0)
        shift = bias_shift(merged_weight(module), x.mean(dim=0), pruned)
    acc = MomentAccumulator(model, second_moments=False)
    acc.add(consumer_name(group), x[:200])
    acc.add(consumer_name(group), x[200:])  # sums over several micro-batches
    assert acc.moments[consumer_name(group)].outer is None  # bias needs no [in, in] matrix
    compensate(structure, {group.name: before}, {group.name: after}, acc.moments, "bias", ridge=0.1)
    masked = x.clone()
    masked[:, pruned] = 0
    with torch.no_grad():
        got = module(masked).mean(dim=0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(base_linear(module).bias.detach(), shift, rtol=1e-5, atol=1e-6)
    assert shift.abs().max() > 1e-3


def test_accumulator_sums_real_tokens_of_model_calls():
    """The hooks see the consumer's actual input; padding tokens and calls outside a model forward
    (as gradient checkpointing's recomputation is) are left out."""
    model = _lora_model("llama-gqa")
    structure = discover_structure(model)
    group = structure.mlp[0]
    module = consumer(structure, group)
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    acc = MomentAccumulator(model, second_moments=True)
    acc.watch({consumer_name(group): module})
    ids = torch.randint(4, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        module(torch.randn(3, group.num_units))  # outside a model call: not counted
    handle.remove()
    x = seen[0][mask.bool()]  # [12, in]
    m = acc.moments[consumer_name(group)]
    assert float(m.tokens) == 12
    torch.testing.assert_close(m.total, x.sum(dim=0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.outer, x.T @ x, rtol=1e-5, atol=1e-5)
    acc.remove()


# -- in the trainer --------------------------------------------------------------------------------------

def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch,method,overrides", [
    ("llama-gqa", "lstsq", {}),
    ("qwen3-gqa", "lstsq", dict(attention_unit="query_head")),
    ("llama-gqa", "bias", {}),
    ("qwen3-gqa", "bias", dict(mlp_pruning_ratio=0.0)),  # Qwen3 configs can give o_proj a bias, not down_proj
])
def test_masked_equals_exported_with_compensation(tmp_path, arch, method, overrides):
    trainer = make_trainer(str(tmp_path / "run"), max_steps=8, arch=arch, compensation=method,
                           compensation_batches=3, **overrides)
    original = {consumer_name(g): base_linear(consumer(trainer.structure, g)).weight.detach().clone()
                for g in trainer.structure.groups()}
    trainer.train()
    history = trainer.compensation_callback.history
    assert history and {r["step"] for r in history} <= {1, 3, 5, 7}
    changed = consumer_tensors(trainer.structure, trainer.compensation_callback.refitted)
    if method == "lstsq":
        assert all(r["lambda"] > 0 and r["error_after"] < r["error_before"] for r in history)
        assert any(not torch.equal(changed[f"{n}.weight"], original[n]) for n in trainer.compensation_callback.refitted)
    else:
        assert any(changed[k].abs().max() > 0 for k in changed if k.endswith(".bias"))

    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    masked = _logits(trainer.model, ids)
    out = tmp_path / "pruned"
    report = trainer.save_pruned_model(str(out))
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # stock transformers
    assert (_logits(reloaded, ids) - masked).abs().max() < 1e-4
    assert report["settings"]["compensation"] == method and report["settings"]["compensation_history"]
    config = json.loads((out / "config.json").read_text())
    if method == "bias":
        assert config.get("mlp_bias", False) == (arch == "llama-gqa") and config["attention_bias"] is True
    # The refit is not a no-op: without it the same masks give other logits.
    trainer.model.eval()
    with torch.no_grad():
        for name, w in original.items():
            layer = {consumer_name(g): consumer(trainer.structure, g) for g in trainer.structure.groups()}[name]
            base_linear(layer).weight.copy_(w)
            if base_linear(layer).bias is not None:
                base_linear(layer).bias.zero_()
    assert (_logits(trainer.model, ids) - masked).abs().max() > 1e-4


@pytest.mark.parametrize("distill,checkpointing", [(0.0, False), (0.5, True)])
def test_statistics_come_only_from_the_window_before_each_update(tmp_path, distill, checkpointing):
    """Each refit sees exactly `compensation_batches` micro-batches (4 samples x 25 tokens), never more
    than those since the previous update; teacher forwards and checkpoint recomputation do not count;
    no hook and no sums remain after training."""
    trainer = make_trainer(str(tmp_path / "a"), max_steps=8, compensation="lstsq", compensation_batches=3,
                           distill_alpha=distill, activation_checkpointing=checkpointing)
    trainer.train()
    history = trainer.compensation_callback.history
    assert history and all(r["tokens"] == 3 * 4 * 25 for r in history)
    acc = trainer.compensation_callback.accumulator
    assert acc.watched == () and acc.moments == {}

    wide = make_trainer(str(tmp_path / "b"), max_steps=8, compensation="lstsq", compensation_batches=100)
    wide.train()
    tokens = {r["step"]: r["tokens"] for r in wide.compensation_callback.history}
    # The first cut (step 3) reaches back to the start (3 steps x 2 micro-batches); later ones to the
    # previous update (2 steps x 2 micro-batches).
    assert tokens[3] == 6 * 100 and all(t == 4 * 100 for s, t in tokens.items() if s > 3)


@pytest.mark.parametrize("method", ["lstsq", "bias"])
def test_resumed_run_matches_uninterrupted(tmp_path, method):
    """Checkpoint at step 4, inside the window of the step-5 update (3 micro-batches of 2 per step):
    the refitted base weights (biases) and the open window's sums travel with it."""
    kw = dict(max_steps=12, compensation=method, compensation_batches=3)
    straight = make_trainer(str(tmp_path / "straight"), **kw)
    straight.train()
    saving = make_trainer(str(tmp_path / "saving"), save_steps=4, **kw)
    saving.train()
    saved = load_file(str(tmp_path / "saving" / "checkpoint-4" / COMPENSATION_STATE_NAME))
    assert any(k.startswith("moments.") for k in saved) and any(k.startswith("consumer.") for k in saved)

    resumed = make_trainer(str(tmp_path / "saving"), save_steps=4, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "saving" / "checkpoint-4"))
    names = [consumer_name(g) for g in straight.structure.groups()]
    expected, got = consumer_tensors(straight.structure, names), consumer_tensors(resumed.structure, names)
    assert any(k.endswith(".bias") for k in expected) == (method == "bias")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7)
    for name, keep in straight.pruning_state.keep.items():
        assert torch.equal(resumed.pruning_state.keep[name], keep), name
    losses = {h["step"]: h["loss"] for h in straight.state.log_history if "loss" in h}
    for h in resumed.state.log_history:
        if "loss" in h and h["step"] > 4:
            assert h["loss"] == pytest.approx(losses[h["step"]], rel=1e-5), h["step"]
    assert [r["step"] for r in resumed.compensation_callback.history] == \
        [r["step"] for r in straight.compensation_callback.history]


def test_reference_format_restores_refitted_weights(tmp_path):
    trainer = make_trainer(str(tmp_path / "run"), max_steps=8, compensation="lstsq", compensation_batches=2)
    trainer.train()
    trainer.save_pruning_adapter(str(tmp_path / "adapter"))
    ids = torch.randint(4, VOCAB, (1, 10), generator=torch.Generator().manual_seed(6))
    expected = _logits(trainer.model, ids)
    peft_model, _, _ = load_masked_model(tiny_model("llama-gqa"), str(tmp_path / "adapter"))
    assert (_logits(peft_model, ids) - expected).abs().max() < 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_refits_identically_and_equal_to_single_process(tmp_path):
    """2 gloo processes x batch 4 == 1 process x batch 8: the moments are all-reduced before the solve."""
    from scripts.tiny_train import dump

    single = make_trainer(str(tmp_path / "single-out"), per_device_batch=8, grad_accum=2, compensation="lstsq",
                          compensation_batches=3)
    single.train()
    dump(single, str(tmp_path / "single"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), os.path.join(ROOT, "tests", "scripts", "tiny_train.py"),
           "--dump", str(tmp_path / "ddp"), "--output_dir", str(tmp_path / "ddp-out"), "--per_device_batch", "4",
           "--grad_accum", "2", "--compensation", "lstsq", "--compensation_batches", "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in range(2)]
    ref = load_file(str(tmp_path / "single" / "rank0.safetensors"))
    meta = [json.load(open(tmp_path / "ddp" / f"rank{r}.json")) for r in range(2)]
    ref_meta = json.load(open(tmp_path / "single" / "rank0.json"))
    consumers = [k for k in ref if k.startswith("consumer.")]
    assert consumers and ref_meta["compensation_history"]
    for k in [k for k in ref if k.startswith("keep.")]:
        assert torch.equal(ranks[0][k], ranks[1][k]) and torch.equal(ranks[0][k], ref[k]), k
    for k in consumers:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # every rank applied the same refit
        torch.testing.assert_close(ranks[0][k], ref[k], rtol=1e-4, atol=1e-6)
    # Each rank saw half the tokens; the refit used the sum over both, as the single process did.
    assert [r["tokens"] for r in meta[0]["compensation_history"]] == \
        [r["tokens"] for r in ref_meta["compensation_history"]]


# -- one-shot ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lstsq", "bias"])
def test_oneshot_compensation(method):
    texts = tiny_text_dataset(8, length=16, seed=3)["text"]
    model = tiny_model("llama-gqa", seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = oneshot_prune(model, tiny_tokenizer(), texts, criterion="wanda", pruning_ratio=0.5)
    refit = oneshot_prune(model, tiny_tokenizer(), texts, criterion="wanda", pruning_ratio=0.5,
                          compensation=method)
    # The caller's model is left exactly as it was, without the bias the refit needed.
    assert {n for n, _ in model.named_parameters()} == set(before)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert refit.report["compensation"] == method and len(refit.report["compensation_history"]) == 4
    # Same masks; only the consumers (and, for bias, the added biases) differ from plain deletion.
    plain_state, refit_state = plain.model.state_dict(), refit.model.state_dict()
    for key, value in plain_state.items():
        if key.endswith(("down_proj.weight", "o_proj.weight")) and method == "lstsq":
            assert not torch.equal(refit_state[key], value), key
        else:
            assert torch.equal(refit_state[key], value), key
    # On the calibration text, the refitted model stays closer to the dense model.
    from loraprune_trainer.oneshot import calibration_batches

    batch = calibration_batches(tiny_tokenizer(), texts, 128, 8)[0]
    with torch.no_grad():
        dense = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        err = {name: (r.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits - dense)
               .square().mean() for name, r in (("plain", plain), ("refit", refit))}
    assert err["refit"] < err["plain"]


# -- refusals and validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(compensation="ols"), "`compensation` must be one of"),
    (dict(compensation_batches=0), "`compensation_batches` must be an integer >= 1"),
    (dict(compensation_lambda=-0.1), "`compensation_lambda` must be a finite number >= 0"),
    (dict(compensation_lambda=float("nan")), "`compensation_lambda`"),
])
def test_config_validation(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAPruneConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **kwargs)


def test_settings_are_recorded_and_default_is_off(tmp_path):
    args = LoRAPruneConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    settings = args.pruning_settings()
    assert (settings["compensation"], settings["compensation_batches"], settings["compensation_lambda"]) == \
        ("none", 8, 0.1)
    trainer = make_trainer(str(tmp_path / "run"), max_steps=4)
    assert trainer.compensation_callback is None


@pytest.mark.parametrize("arch,overrides,message", [
    ("mistral-gqa", {}, "MistralConfig has no `attention_bias`"),
    ("qwen3-gqa", {}, "Qwen3Config has no `mlp_bias`"),
    ("qwen2-gqa", dict(mlp_pruning_ratio=0.0), "Qwen2Config has no `attention_bias`.*attention_pruning_ratio=0"),
])
def test_bias_is_refused_where_the_export_could_not_carry_it(tmp_path, arch, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(str(tmp_path / "run"), arch=arch, compensation="bias", **overrides)


def test_fsdp_is_refused():
    fake = SimpleNamespace(is_deepspeed_enabled=False, is_fsdp_enabled=True, args=SimpleNamespace(compensation="lstsq"),
                           accelerator=SimpleNamespace(state=SimpleNamespace(
                               fsdp_plugin=SimpleNamespace(fsdp_version=2))))
    with pytest.raises(UnsupportedBackendError, match="not supported under FSDP"):
        check_distributed_backend(fake)
    fake.args.compensation = "none"
    check_distributed_backend(fake)


def test_quantized_base_is_refused(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    folder = tmp_path / "fp32"
    tiny_model("llama-gqa", hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
               intermediate_size=128).save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                     device_map="cpu")
    with pytest.raises(ValueError, match="Int8Params.*re-quantizing"):
        make_trainer(str(tmp_path / "run"), model=model, compensation="lstsq")
