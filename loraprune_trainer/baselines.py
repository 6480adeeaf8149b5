"""Baseline importance criteria to compare LoRAPrune's LoRA-gradient criterion against.

Every criterion has the same contract as :class:`~loraprune_trainer.criterion.LoRACriterion`:
``score(structure) -> {group.name: Tensor[num_units]}`` (float32, CPU or the weights' device),
called by the callback in ``on_pre_optimizer_step`` while gradients are accumulated and not yet
zeroed, plus optional ``setup(trainer)``. Outside a trainer (one-shot pruning),
:meth:`attach` does what ``setup`` does given the structure and the model. Units, masks, the
schedule and export are shared with ``lora``; only the numbers differ.

``W' = W + s B A`` is the merged weight of a member ``[out, in]`` (``W`` alone when the member has
no LoRA). A unit's score is the sum of the element importances over every row/column it owns in
every member (Eq. 4), optionally with each member's unit vector L2-normalised first.

* ``vanilla`` (Eq. 3): ``(dL/dW' * W')^2`` with the *true* gradient of the base weight. Autograd
  must produce an ``[out, in]`` gradient for every projection: the memory cost that LoRAPrune's
  estimate avoids. The base weights are made ``requires_grad`` but kept out of the optimizer.
* ``magnitude``: ``|W'|``.
* ``wanda`` (structured Wanda, Sun et al. 2024): ``|W'_ij| * ||X_j||_2``, with ``||X_j||_2`` the L2
  norm over the step's tokens of input feature ``j`` of that matrix.
* ``random``: i.i.d. uniform scores from a seeded generator.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from .criterion import SCORE_FORMS, combine_member_scores, dense_base_weight, lora_parts
from .structure import ROWS, GroupMember, ModelStructure, UnitGroup

# Largest [chunk, in] float32 temporary built while scoring one matrix (64 MiB), as in criterion.py.
_CHUNK_ELEMENTS = 1 << 24


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


def _base_linear(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _members(structure: ModelStructure):
    """``(group, member, module)`` for every member of every group."""
    for group in structure.groups():
        for member in group.members:
            yield group, member, structure.module(group, member)


class _StepCounter:
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


class _BaselineCriterion:
    """Shared plumbing: group scores are the (optionally normalised) sum of member scores."""

    name = "baseline"
    needs_gradients = False

    def __init__(self, score_form: str = "square", normalize: bool = False, **_ignored):
        if score_form not in SCORE_FORMS:
            raise ValueError(f"`score_form` must be one of {SCORE_FORMS}, got {score_form!r}")
        self.score_form = score_form
        self.normalize = normalize

    def member_scores(self, structure: ModelStructure, group: UnitGroup, member: GroupMember) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, structure: ModelStructure) -> dict[str, torch.Tensor]:
        """``{group.name: Tensor[num_units]}`` for every group, layer by layer."""
        return {
            g.name: combine_member_scores([self.member_scores(structure, g, m) for m in g.members], self.normalize)
            for g in structure.groups()
        }

    def setup(self, trainer) -> None:
        """Called by the trainer once after construction: attach to its model, and detach once the
        pruning ramp is over (later scores are never used; for ``vanilla`` this stops paying for
        the base weights' gradients during recovery fine-tuning)."""
        self.attach(trainer.structure, trainer.model, step_fn=lambda: trainer.state.global_step)
        trainer.add_callback(_DetachAfterRamp(self, trainer))

    def attach(self, structure: ModelStructure, model: nn.Module, step_fn=None) -> None:
        """Install whatever the criterion needs on ``model`` (nothing for weight-only criteria)."""

    def detach(self) -> None:
        """Remove what :meth:`attach` installed."""

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters this criterion made ``requires_grad`` that the optimizer must not train."""
        return []


class _DetachAfterRamp(TrainerCallback):
    """Detaches a criterion after the optimizer step that ends the pruning ramp (the callback
    scores up to and including that step)."""

    def __init__(self, criterion, trainer):
        self.criterion, self.trainer = criterion, trainer

    def on_step_end(self, args, state, control, **kwargs):
        schedule = getattr(self.trainer.pruning_callback, "schedule", None)
        if schedule is not None and state.global_step >= schedule.ramp_end:
            self.criterion.detach()


class MagnitudeCriterion(_BaselineCriterion):
    """``|W + s B A|`` summed over each unit's weights. No gradients, no data."""

    name = "magnitude"

    def member_scores(self, structure, group, member):
        module = structure.module(group, member)
        return unit_sums(merged_weight(module).abs(), member, group.num_units)


class RandomCriterion(_BaselineCriterion):
    """I.i.d. uniform [0, 1) scores from a generator seeded once (``seed``, or the trainer's
    ``args.seed`` in :meth:`setup`), so a run is reproducible."""

    name = "random"

    def __init__(self, score_form: str = "square", normalize: bool = False, seed: int = 0, **_ignored):
        super().__init__(score_form, normalize)
        self.generator = torch.Generator().manual_seed(seed)

    def setup(self, trainer) -> None:
        self.generator.manual_seed(int(trainer.args.seed))
        super().setup(trainer)

    @torch.no_grad()
    def score(self, structure: ModelStructure) -> dict[str, torch.Tensor]:
        # Normalising i.i.d. noise changes nothing: the member sum is noise already.
        return {g.name: torch.rand(g.num_units, generator=self.generator) for g in structure.groups()}


class VanillaCriterion(_BaselineCriterion):
    """First-order Taylor with the base weights' true gradients (Eq. 3): ``(dL/dW' * W')^2``.

    ``dL/dW' = dL/dW`` because ``W`` and ``s B A`` enter the layer as a sum (up to LoRA dropout,
    which only the LoRA path sees). :meth:`attach` sets ``requires_grad`` on every member's base
    weight and registers a post-accumulate hook that moves each freshly accumulated gradient into
    a float32 buffer of the criterion and clears ``weight.grad``: so the base weights never carry
    a ``.grad`` that gradient clipping or an optimizer could see, and
    :meth:`frozen_parameters` lets the trainer keep them out of the optimizer. The buffer holds the
    current optimizer step's gradient, summed over its micro-batches (unclipped).
    """

    name = "vanilla"
    needs_gradients = True

    def __init__(self, score_form: str = "square", normalize: bool = False, **_ignored):
        super().__init__(score_form, normalize)
        self._weights: list[nn.Parameter] = []
        self._handles = []
        self._grads: dict[int, torch.Tensor] = {}  # id(weight) -> accumulated dL/dW, float32 [out, in]
        self._steps: _StepCounter | None = None
        self._fresh: set[int] = set()

    def attach(self, structure, model, step_fn=None):
        self.detach()
        self._steps = _StepCounter(step_fn)
        for _, _, module in _members(structure):
            weight = _base_linear(module).weight
            if weight.__class__.__name__ in ("Int8Params", "Params4bit"):
                raise ValueError(
                    "The `vanilla` criterion needs the base weights' gradients, which 8-bit/4-bit weights do not "
                    "have: load the base model in float32/bfloat16 or use `pruning_criterion=\"lora\"`."
                )
            if id(weight) in {id(w) for w in self._weights}:
                continue
            weight.requires_grad_(True)
            self._weights.append(weight)
            self._handles.append(weight.register_post_accumulate_grad_hook(self._collect))

    def _collect(self, weight: torch.Tensor) -> None:
        if self._steps.new_step():  # first gradient of a new optimizer step: forget the previous one
            self._fresh.clear()
        key = id(weight)
        grad = weight.grad.detach()
        if key in self._fresh:
            self._grads[key].add_(grad.float())
        else:
            # Safe without a copy: once .grad is None, autograd never writes into this tensor again.
            self._grads[key] = grad.float()
            self._fresh.add(key)
        weight.grad = None

    def detach(self):
        for h in self._handles:
            h.remove()
        for w in self._weights:
            w.requires_grad_(False)
            w.grad = None
        self._handles, self._weights, self._grads, self._fresh = [], [], {}, set()

    def frozen_parameters(self):
        return list(self._weights)

    def weight_grad(self, module: nn.Module) -> torch.Tensor:
        """The accumulated ``dL/dW`` of a member's base weight this step: float32 ``[out, in]``."""
        key = id(_base_linear(module).weight)
        if key not in self._grads or key not in self._fresh:
            raise RuntimeError(
                "No base-weight gradient was recorded for this step: the `vanilla` criterion needs `setup(trainer)` "
                "(or `attach(structure, model)`) before the backward pass, and scores before the next step begins."
            )
        return self._grads[key]

    def member_scores(self, structure, group, member):
        module = structure.module(group, member)
        grad = self.weight_grad(module)
        weight = merged_weight(module).to(grad.device)
        out_features, in_features = weight.shape
        chunk = max(1, _CHUNK_ELEMENTS // in_features)
        per_index = torch.zeros(weight.shape[member.dim], dtype=torch.float32, device=weight.device)
        for start in range(0, out_features, chunk):
            rows = slice(start, min(start + chunk, out_features))
            prod = grad[rows] * weight[rows]  # [chunk, in]
            imp = prod.square() if self.score_form == "square" else prod.abs()
            if member.dim == ROWS:
                per_index[rows] = imp.sum(dim=1)
            else:
                per_index += imp.sum(dim=0)
        return per_index.view(group.num_units, member.unit_size).sum(dim=1)


class WandaCriterion(_BaselineCriterion):
    """Structured Wanda: ``|W'_ij| * ||X_j||_2`` summed over each unit's weights.

    ``||X_j||_2`` is the L2 norm of input feature ``j`` over every token the matrix saw during the
    current optimizer step (all its micro-batches; padding tokens included). Forward pre-hooks on
    the members accumulate ``sum_tokens x_j^2``. Only forwards that run inside the top-level model
    call in training mode count: gradient checkpointing re-runs layer forwards during backward,
    outside that call, and evaluation runs in eval mode, so each training token counts exactly once.
    Hooks are registered after the mask hooks, so a pruned column's norm is 0.
    """

    name = "wanda"

    def __init__(self, score_form: str = "square", normalize: bool = False, **_ignored):
        super().__init__(score_form, normalize)
        self._handles = []
        self._sumsq: dict[int, torch.Tensor] = {}  # id(module) -> float32 [in]
        self._fresh: set[int] = set()
        self._steps: _StepCounter | None = None
        self._depth = 0  # > 0 while the top-level model forward runs

    def attach(self, structure, model, step_fn=None):
        self.detach()
        self._steps = _StepCounter(step_fn)
        top = model
        self._handles.append(top.register_forward_pre_hook(self._enter))
        self._handles.append(top.register_forward_hook(self._leave, always_call=True))
        seen = set()
        for _, _, module in _members(structure):
            if id(module) in seen:
                continue
            seen.add(id(module))
            self._handles.append(module.register_forward_pre_hook(self._collect))

    def _enter(self, module, args):
        self._depth += 1

    def _leave(self, module, args, output):
        self._depth = max(0, self._depth - 1)

    def _collect(self, module: nn.Module, args) -> None:
        if self._depth == 0 or not module.training:
            return
        if self._steps.new_step():
            self._fresh.clear()
        x = args[0].detach()
        sumsq = x.float().square().reshape(-1, x.shape[-1]).sum(dim=0)  # [in]
        key = id(module)
        if key in self._fresh:
            self._sumsq[key].add_(sumsq)
        else:
            self._sumsq[key] = sumsq
            self._fresh.add(key)

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles, self._sumsq, self._fresh, self._depth = [], {}, set(), 0

    def activation_norm(self, module: nn.Module) -> torch.Tensor:
        """``||X_j||_2`` over this step's tokens for every input feature of ``module``: float32 [in]."""
        key = id(module)
        if key not in self._sumsq or key not in self._fresh:
            raise RuntimeError(
                "No input activations were recorded for this step: the `wanda` criterion needs `setup(trainer)` "
                "(or `attach(structure, model)`) and a training-mode forward before scoring."
            )
        return self._sumsq[key].sqrt()

    def member_scores(self, structure, group, member):
        module = structure.module(group, member)
        norm = self.activation_norm(module)
        weight = merged_weight(module).to(norm.device)
        if member.dim == ROWS:  # unit = rows: sum_j |W'_ij| ||X_j||
            per_index = weight.abs() @ norm  # [out]
        else:  # unit = input columns: ||X_c|| sum_i |W'_ic|
            per_index = weight.abs().sum(dim=0) * norm  # [in]
        return per_index.view(group.num_units, member.unit_size).sum(dim=1)


BASELINE_CRITERIA = {
    "vanilla": VanillaCriterion,
    "magnitude": MagnitudeCriterion,
    "wanda": WandaCriterion,
    "random": RandomCriterion,
}
