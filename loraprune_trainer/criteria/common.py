"""What every criterion shares: reading (de-quantized, gathered) weights and LoRA parts, summing
element scores over units, and the ``Criterion`` base class with its trainer plumbing.

The contract: ``score(structure) -> {group.name: Tensor[num_units]}`` (float32), called by the
callback in ``on_pre_optimizer_step`` while the step's gradients are accumulated and not yet
zeroed; ``setup(trainer)`` once after the trainer is built; outside a trainer (one-shot scoring)
``attach(structure, model)`` does what ``setup`` does. Units, masks, the schedule and export are
shared by every criterion; only the numbers differ.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from ..distributed import full_tensor
from ..structure import GroupMember, ModelStructure, UnitGroup

SCORE_FORMS = ("square", "abs")

# Largest [chunk, in] float32 temporary built while scoring one matrix (64 MiB).
CHUNK_ELEMENTS = 1 << 24


def base_weight(module: nn.Module) -> torch.Tensor:
    """The base weight ``W: [out, in]`` of a (LoRA-wrapped, possibly 8/4-bit) linear, detached, in its
    own floating dtype (8/4-bit weights are de-quantized; FSDP2 shards are gathered, one matrix at a time)."""
    base = base_linear(module)
    weight = base.weight
    kind = weight.__class__.__name__
    if kind == "Params4bit":
        import bitsandbytes as bnb

        weight = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    elif kind == "Int8Params":
        weight = _dequantize_int8(base)
    return full_tensor(weight.detach())


def dense_base_weight(module: nn.Module) -> torch.Tensor:
    """:func:`base_weight` as float32: [out, in]."""
    return base_weight(module).float()


def _dequantize_int8(base: nn.Module) -> torch.Tensor:
    """``W = CB * SCB / 127`` of a bitsandbytes ``Linear8bitLt``: [out, in] float32, read without side effects.

    Not peft's ``dequantize_module_weight``: on a CPU it re-assigns ``module.weight`` and so drops the
    row scales (SCB) that bitsandbytes moved into ``module.state`` at the first forward, and the next
    forward fails (bitsandbytes 0.50, peft 0.21). Before the first forward CB/SCB live on the weight.
    """
    state = getattr(base, "state", None)
    scb = state.SCB if state is not None and state.SCB is not None else base.weight.SCB  # [out]
    cb = state.CB if state is not None and state.CB is not None else base.weight.data  # [out, in] int8
    if scb is None:
        raise RuntimeError(f"{type(base).__name__} has no int8 row scales (SCB): is it quantized?")
    return cb.float() * (scb.float().to(cb.device) / 127.0).unsqueeze(1)


def base_linear(module: nn.Module) -> nn.Module:
    """The plain (or quantized) linear inside a PEFT LoRA layer, or ``module`` itself."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def lora_parts(module: nn.Module, adapter_name: str | None = None):
    """``(A [r, in], B [out, r], scaling)`` of the active adapter of a PEFT LoRA layer, or ``None``."""
    if not hasattr(module, "lora_A"):
        return None
    if adapter_name is None:
        active = getattr(module, "active_adapters", None) or ["default"]
        adapter_name = active[0]
    if adapter_name not in module.lora_A:
        return None
    return module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight, module.scaling[adapter_name]


def merged_weight(module: nn.Module) -> torch.Tensor:
    """``W' = W + s B A`` of a (LoRA-wrapped) linear: float32 ``[out, in]``, detached."""
    weight = dense_base_weight(module)
    parts = lora_parts(module)
    if parts is None:
        return weight
    a, b, scaling = parts
    return weight + scaling * (b.detach().float() @ a.detach().float()).to(weight.device)


def unit_sums(element_scores: torch.Tensor, member: GroupMember, num_units: int) -> torch.Tensor:
    """Sum ``[out, in]`` element scores over each unit's block of rows/columns: Tensor[num_units]."""
    per_index = element_scores.sum(dim=1 - member.dim)  # [out] for row members, [in] for column members
    return per_index.view(num_units, member.unit_size).sum(dim=1)


def combine_member_scores(member_scores: list[torch.Tensor], normalize: bool) -> torch.Tensor:
    """Sum the per-matrix unit scores of one group (Eq. 4); with ``normalize`` each matrix's vector
    is first divided by its L2 norm (the authors' code), so no single matrix dominates."""
    if normalize:
        member_scores = [s / s.norm().clamp_min(torch.finfo(s.dtype).tiny) for s in member_scores]
    return torch.stack(member_scores).sum(dim=0)


def group_members(structure: ModelStructure):
    """``(group, member, module)`` for every member of every group."""
    for group in structure.groups():
        for member in group.members:
            yield group, member, structure.module(group, member)


class StepCounter:
    """Tells accumulators when a new optimizer step began, so they restart from zero.

    ``step_fn`` returns the current optimizer step (``trainer.state.global_step``); ``None`` means
    one everlasting step (one-shot scoring: accumulate over every calibration batch)."""

    def __init__(self, step_fn=None):
        self.step_fn = step_fn or (lambda: 0)
        self.last = None

    def new_step(self) -> bool:
        step = self.step_fn()
        fresh = step != self.last
        self.last = step
        return fresh


class Criterion:
    """Base class: a group's score is the (optionally normalised) sum of its members' scores.

    Subclasses set ``name``, ``needs_gradients`` (a backward pass must run before :meth:`score`) and
    ``needs_data`` (calibration batches must run at all), and implement :meth:`member_scores` or
    override :meth:`score`; criteria that install hooks implement :meth:`attach`/:meth:`detach`.
    """

    name = "criterion"
    needs_gradients = False
    needs_data = False

    def __init__(self, score_form: str = "square", normalize: bool = False, **_ignored):
        if score_form not in SCORE_FORMS:
            raise ValueError(f"`score_form` must be one of {SCORE_FORMS}, got {score_form!r}")
        self.score_form = score_form
        self.normalize = normalize

    def member_scores(self, structure: ModelStructure, group: UnitGroup, member: GroupMember) -> torch.Tensor:
        raise NotImplementedError

    def group_scores(self, structure: ModelStructure, group: UnitGroup) -> torch.Tensor:
        """Tensor[num_units] for one group (Eq. 4)."""
        return combine_member_scores([self.member_scores(structure, group, m) for m in group.members], self.normalize)

    @torch.no_grad()
    def score(self, structure: ModelStructure) -> dict[str, torch.Tensor]:
        """``{group.name: Tensor[num_units]}`` for every group, layer by layer."""
        return {g.name: self.group_scores(structure, g) for g in structure.groups()}

    def setup(self, trainer) -> None:
        """Called by the trainer once after construction: attach to its model, and detach once the
        pruning ramp is over (later scores are never used; for ``vanilla`` this stops paying for
        the base weights' gradients during recovery fine-tuning)."""
        self.attach(trainer.structure, trainer.model, step_fn=lambda: trainer.state.global_step)
        trainer.add_callback(DetachAfterRamp(self, trainer))

    def attach(self, structure: ModelStructure, model: nn.Module, step_fn=None) -> None:
        """Install whatever the criterion needs on ``model`` (nothing for weight-only criteria)."""

    def detach(self) -> None:
        """Remove what :meth:`attach` installed."""

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters this criterion made ``requires_grad`` that the optimizer must not train."""
        return []


class DetachAfterRamp(TrainerCallback):
    """Detaches a criterion after the optimizer step that ends the pruning ramp (the callback
    scores up to and including that step)."""

    def __init__(self, criterion, trainer):
        self.criterion, self.trainer = criterion, trainer

    def on_step_end(self, args, state, control, **kwargs):
        schedule = getattr(self.trainer.pruning_callback, "schedule", None)
        if schedule is not None and state.global_step >= schedule.ramp_end:
            self.criterion.detach()
