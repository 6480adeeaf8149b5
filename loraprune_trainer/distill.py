"""Self-distillation from the free teacher: the model itself with the pruning masks switched off.

Per micro-batch, the loss becomes

    (1 - alpha) * CE(student) + alpha * T^2 * KL(teacher_T || student_T)

on the next-token distributions at temperature ``T``, summed over the positions whose label is not
-100 and divided by the same token count as the cross-entropy (so gradient accumulation and DDP
stay exact). The teacher is

* ``"base"``: the original model (LoRA adapters disabled, masks off): for compression of general text;
* ``"dense"``: the current fine-tuned model unpruned (adapters on, masks off): for task fine-tuning.

Both run under ``no_grad`` in eval mode (no LoRA dropout, and no criterion hook sees them) on the
same weights: no second copy of the model. Neither model's ``[tokens, vocab]`` logits are ever
whole: both forwards keep the backbone's last hidden states (``[B, T, hidden]``), and the LM head is
applied ``chunk_size`` positions at a time; with more than one chunk each chunk is checkpointed, so
the backward pass recomputes its logits instead of keeping them (Llama-3's 128k vocabulary).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .criteria.common import base_weight
from .distributed import full_tensor

DISTILL_TEACHERS = ("base", "dense")


class BackboneOutput:
    """Forward hook on a causal LM's backbone keeping ``last_hidden_state``: [B, T, hidden]."""

    def __init__(self, backbone: nn.Module):
        self.hidden = None
        self._handle = backbone.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def remove(self):
        self._handle.remove()


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder backbone and the LM head of a (PEFT/DDP-wrapped) causal LM."""
    from .structure import _unwrap

    hf = _unwrap(model)
    return hf.get_decoder() if hasattr(hf, "get_decoder") else hf.model, hf.get_output_embeddings()


def head_weights(lm_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W [vocab, hidden], b [vocab] or None)`` of the LM head, detached and whole (FSDP2 shards
    gathered, 8/4-bit weights de-quantized). The head is frozen: its weights carry no gradient."""
    if hasattr(lm_head, "lora_A"):
        raise ValueError("Distillation does not support a LoRA adapter on the LM head: leave `lm_head` out of the "
                         "LoRA `target_modules` (\"all-linear\" already does).")
    weight = base_weight(lm_head)  # its own dtype: a float32 copy of a 128k-vocabulary head costs GBs
    bias = getattr(lm_head, "bias", None)
    return weight, (full_tensor(bias.detach()) if bias is not None else None)


def distill_sums(hidden: torch.Tensor, teacher_hidden: torch.Tensor, labels: torch.Tensor,
                 head: tuple[torch.Tensor, torch.Tensor | None], temperature: float = 1.0,
                 chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ce_sum, kl_sum, num_tokens)`` over the positions whose next-token label is not -100.

    ``hidden``: student last hidden states [B, T, H] (with grad); ``teacher_hidden``: [B, T, H] (no
    grad); ``labels``: [B, T] unshifted (position t predicts ``labels[:, t + 1]``). ``ce_sum`` is the
    summed token cross-entropy at temperature 1; ``kl_sum`` the summed ``KL(p_T || q_T)`` of the
    teacher's and the student's temperature-``T`` distributions (multiply by ``T^2`` to keep its
    gradient scale independent of ``T``). ``head``: the frozen LM head's ``(W [vocab, H], b)``, the
    same for both (LoRA on the head is refused). Logits exist ``chunk_size`` positions at a time.
    """
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}")
    shifted = labels[:, 1:].reshape(-1)
    keep = (shifted != -100).nonzero().squeeze(1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep)  # [N, H]
    th = teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1]).index_select(0, keep)
    y = shifted.index_select(0, keep)
    ce_total = hidden.new_zeros((), dtype=torch.float32)
    kl_total = hidden.new_zeros((), dtype=torch.float32)
    many = h.shape[0] > chunk_size
    for start in range(0, h.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        args = (h[part], th[part], y[part], head[0], head[1], temperature)
        ce, kl = checkpoint(_chunk_loss, *args, use_reentrant=False) if many else _chunk_loss(*args)
        ce_total = ce_total + ce
        kl_total = kl_total + kl
    return ce_total, kl_total, torch.as_tensor(y.numel(), device=hidden.device)


def _chunk_loss(h, th, y, weight, bias, temperature):
    """Summed CE and KL of one chunk of positions: ``h``/``th`` [n, H], ``y`` [n]."""
    logits = F.linear(h.to(weight.dtype), weight, bias).float()  # [n, vocab]
    ce = F.cross_entropy(logits, y, reduction="sum")
    with torch.no_grad():
        teacher_logp = F.log_softmax(F.linear(th.to(weight.dtype), weight, bias).float() / temperature, dim=-1)
    student_logp = F.log_softmax(logits / temperature, dim=-1)
    kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")
    return ce, kl


@contextlib.contextmanager
def teacher_mode(model: nn.Module, mask_hooks, teacher: str):
    """Run ``model`` as the teacher inside the block: masks off, eval mode (no dropout, no criterion
    hooks), and for ``"base"`` the LoRA adapters disabled. Everything is restored on exit."""
    if teacher not in DISTILL_TEACHERS:
        raise ValueError(f"`distill_teacher` must be one of {DISTILL_TEACHERS}, got {teacher!r}")
    was_training = model.training
    adapters = model.disable_adapter() if teacher == "base" else contextlib.nullcontext()
    model.eval()
    try:
        with torch.no_grad(), mask_hooks.disabled(), adapters:
            yield
    finally:
        model.train(was_training)
