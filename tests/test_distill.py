"""Self-distillation from the unpruned model: teachers, exactness, gradients, chunking, logging."""

import pytest
import torch
import torch.nn.functional as F
from scripts.tiny_train import make_trainer
from tiny import VOCAB, tiny_model

from loraprune_trainer import LoRAPruneConfig
from loraprune_trainer.criteria import lora_parts
from loraprune_trainer.distill import BackboneOutput, backbone_and_head, distill_sums, head_weights, teacher_mode


def _perturbed_trainer(tmp_path, **extra):
    """A trainer whose LoRA B is non-zero and whose masks already prune units, so that the
    student, the base model and the dense model all compute different things."""
    trainer = make_trainer(str(tmp_path / "out"), max_steps=4, **extra)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    state = trainer.pruning_state
    for name, group in state.groups.items():
        state.scores[name] = torch.rand(group.num_units)
        state.prune_to(name, trainer.final_prune_counts[name])
    trainer.model.train()
    return trainer


def _ids(seed=0, shape=(4, 16)):
    return torch.randint(4, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_base_teacher_is_the_original_model_and_dense_teacher_the_merged_unmasked_one(tmp_path):
    trainer = _perturbed_trainer(tmp_path)
    model, ids = trainer.model, _ids()
    stock = tiny_model("llama-gqa")  # make_trainer's model: same seed, untouched
    dense = tiny_model("llama-gqa")  # W + s B A written into a plain copy: the adapted model, nothing masked
    with torch.no_grad():
        for name, module in model.named_modules():
            parts = lora_parts(module) if hasattr(module, "lora_A") else None
            if parts is not None:
                a, b, s = parts
                target = dense.get_submodule(name.replace("base_model.model.", "", 1))
                target.weight += s * b @ a
    with torch.no_grad():
        want_base, want_dense = stock(input_ids=ids).logits, dense(input_ids=ids).logits
        student = model(input_ids=ids).logits
    for teacher, want in (("base", want_base), ("dense", want_dense)):
        with teacher_mode(model, trainer.mask_hooks, teacher):
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, student, atol=1e-3)  # the student really differs
    assert model.training and trainer.mask_hooks.enabled  # restored after the block


def test_backbone_hidden_times_head_gives_the_logits(tmp_path):
    trainer = _perturbed_trainer(tmp_path)
    model, ids = trainer.model, _ids()
    backbone, lm_head = backbone_and_head(model)
    recorder = BackboneOutput(backbone)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    recorder.remove()
    weight, bias = head_weights(lm_head)
    torch.testing.assert_close(F.linear(recorder.hidden, weight, bias), logits)


def _reference_loss(trainer, ids, alpha, temperature):
    """The distillation loss from full logits: student = the masked adapted model, teacher = a stock copy."""
    model = trainer.model
    teacher = tiny_model("llama-gqa")
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB)
    s_logits = model(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB)
    labels = ids[:, 1:].reshape(-1)
    ce = F.cross_entropy(s_logits, labels)
    kl = F.kl_div(F.log_softmax(s_logits / temperature, -1), F.log_softmax(t_logits / temperature, -1),
                  log_target=True, reduction="sum") / labels.numel()
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


@pytest.mark.parametrize("alpha,temperature", [(0.7, 2.0), (1.0, 1.0)])
def test_distillation_loss_and_gradient_match_autograd_on_full_logits(tmp_path, alpha, temperature):
    trainer = _perturbed_trainer(tmp_path, distill_alpha=alpha, distill_temperature=temperature,
                                 distill_chunk_size=5)  # several chunks: the checkpointed path
    model, ids = trainer.model, _ids()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}

    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    got = {n: p.grad.clone() for n, p in lora.items()}
    model.zero_grad()
    want_loss = _reference_loss(trainer, ids, alpha, temperature)
    want_loss.backward()
    torch.testing.assert_close(loss.detach(), want_loss.detach(), rtol=1e-5, atol=1e-6)
    assert sum(float(p.grad.norm()) for p in lora.values()) > 0  # the KL term trains the adapters (alpha 1 too)
    for n, p in lora.items():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7)


def test_chunk_size_does_not_change_the_loss_or_its_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 8, requires_grad=True)
    teacher = torch.randn(3, 11, 8)
    labels = torch.randint(0, 20, (3, 11))
    labels[0, 4:] = -100  # padding
    head = (torch.randn(20, 8), torch.randn(20))
    results = []
    for chunk in (1, 4, 7, 1000):
        hidden.grad = None
        ce, kl, n = distill_sums(hidden, teacher, labels, head, temperature=1.5, chunk_size=chunk)
        (ce + 2 * kl).backward()
        results.append((ce.detach(), kl.detach(), int(n), hidden.grad.clone()))
    assert results[0][2] == 3 * 10 - 7
    for ce, kl, n, grad in results[1:]:
        torch.testing.assert_close(ce, results[0][0])
        torch.testing.assert_close(kl, results[0][1])
        torch.testing.assert_close(grad, results[0][3])


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_alpha_zero_is_exactly_plain_training(tmp_path):
    plain = make_trainer(str(tmp_path / "plain"), max_steps=4)
    plain.train()
    zero = make_trainer(str(tmp_path / "zero"), max_steps=4, distill_alpha=0.0, distill_temperature=3.0,
                        distill_teacher="dense")
    zero.train()
    assert _losses(zero) == _losses(plain)
    assert not any("distill/kl" in h for h in zero.state.log_history)


def test_distillation_trains_logs_and_accumulates_like_one_big_batch(tmp_path):
    big = make_trainer(str(tmp_path / "big"), max_steps=4, per_device_batch=8, grad_accum=1, distill_alpha=0.5)
    big.train()
    accum = make_trainer(str(tmp_path / "accum"), max_steps=4, per_device_batch=4, grad_accum=2, distill_alpha=0.5)
    accum.train()
    logs = [h for h in accum.state.log_history if "loss" in h]
    assert all("distill/kl" in h and "distill/ce" in h for h in logs)
    assert all(h["grad_norm"] > 0 for h in logs)
    assert _losses(accum) == pytest.approx(_losses(big), rel=1e-4)
    for name, keep in big.pruning_state.keep.items():
        assert torch.equal(accum.pruning_state.keep[name], keep)


def test_distill_config_errors():
    for bad, match in ((dict(distill_alpha=1.5), "distill_alpha"), (dict(distill_temperature=0.0), "distill_temperature"),
                       (dict(distill_teacher="other"), "distill_teacher"), (dict(distill_chunk_size=0), "chunk_size")):
        with pytest.raises(ValueError, match=match):
            LoRAPruneConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, **bad)


def test_lora_on_the_lm_head_is_refused():
    """TRL's SFTTrainer refuses it first; the distillation code does too, for models wrapped elsewhere."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama-gqa"), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="LM head"):
        head_weights(backbone_and_head(model)[1])


def test_resume_with_distillation_matches_uninterrupted(tmp_path):
    straight = make_trainer(str(tmp_path / "straight"), max_steps=8, distill_alpha=0.5)
    straight.train()
    saving = make_trainer(str(tmp_path / "saving"), max_steps=8, save_steps=4, distill_alpha=0.5)
    saving.train()
    resumed = make_trainer(str(tmp_path / "saving"), max_steps=8, save_steps=4, distill_alpha=0.5)
    resumed.train(resume_from_checkpoint=str(tmp_path / "saving" / "checkpoint-4"))
    assert _losses(resumed)[4:] == pytest.approx(_losses(straight)[4:], rel=1e-5)
    for name, keep in straight.pruning_state.keep.items():
        assert torch.equal(resumed.pruning_state.keep[name], keep)
