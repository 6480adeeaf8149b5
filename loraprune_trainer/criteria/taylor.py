"""First-order Taylor criteria with *true* gradients, the references the LoRA estimate approximates.

* ``vanilla`` (LoRAPrune's Eq. 3): element-wise ``(dL/dW' * W')^2`` summed over a unit's weights,
  with the base weights' real ``[out, in]`` gradients: the memory cost LoRAPrune avoids.
* ``taylor_gate``: the group (vector-wise) form of Eq. 6. A unit (MLP channel or attention head
  group) is removed by zeroing its slice ``x_u`` of the input of ``down_proj``/``o_proj``, i.e. by
  setting a scalar gate ``m_u`` on that slice from 1 to 0. To first order the loss changes by
  ``-dL/dm_u``, and at ``m = 1``

      dL/dm_u = sum over tokens of  x_u . dL/dx_u

  which autograd computes almost for free, since LoRA upstream needs ``dL/dx`` anyway: no
  base-weight gradient, no rank-r estimate, no ``[out, in]`` temporaries. Per optimizer step the
  gate gradient is summed over micro-batches (so gradient accumulation equals one big batch) and
  then squared (Molchanov et al., 2019), or taken in absolute value with ``score_form="abs"``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..structure import COLUMNS, ROWS, ModelStructure
from . import common
from .common import Criterion, StepCounter, base_linear, combine_member_scores, group_members, merged_weight


class VanillaCriterion(Criterion):
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
    needs_data = True

    def __init__(self, score_form: str = "square", normalize: bool = False, **_ignored):
        super().__init__(score_form, normalize)
        self._weights: list[nn.Parameter] = []
        self._handles = []
        self._grads: dict[int, torch.Tensor] = {}  # id(weight) -> accumulated dL/dW, float32 [out, in]
        self._steps: StepCounter | None = None
        self._fresh: set[int] = set()

    def attach(self, structure, model, step_fn=None):
        self.detach()
        self._steps = StepCounter(step_fn)
        for _, _, module in group_members(structure):
            weight = base_linear(module).weight
            if weight.__class__.__name__ in ("Int8Params", "Params4bit"):
                raise ValueError(
                    "The `vanilla` criterion needs the base weights' gradients, which 8-bit/4-bit weights do not "
                    "have: load the base model in float32/bfloat16, or use `pruning_criterion=\"lora\"` or "
                    "\"taylor_gate\"."
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
        key = id(base_linear(module).weight)
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
        chunk = max(1, common.CHUNK_ELEMENTS // in_features)
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


class TaylorGateCriterion(Criterion):
    """Group Taylor from per-unit gate gradients: ``(sum over the step's tokens of x_u . dL/dx_u)^2``.

    :meth:`attach` gives every group a float32 gate ``m: [num_units]`` of ones, a leaf tensor that
    requires grad, and a forward pre-hook on the group's column member (``o_proj`` / ``down_proj``,
    registered after the mask hooks) that passes ``x`` through :func:`gate_probe`: the layer sees ``x``
    itself (no product in the forward, none on ``dL/dx`` in the backward), and autograd accumulates
    ``dL/dm`` into ``m.grad`` over the step's micro-batches, exactly as for ``x * m`` at ``m = 1``.

    The gates are deliberately *not* model parameters: so they stay out of the optimizer, gradient
    clipping's norm, checkpoints, the export and FSDP sharding. The price is one all-reduce of the
    gate gradients per scored step under multi-process training (the mean over ranks, as DDP does
    for parameters); :meth:`score` does it. Gradient checkpointing keeps counting each token once:
    a recomputed forward probes with the same gate, but autograd backpropagates one graph.
    Scores are of unclipped gradients, divided by the loss scale of an fp16 ``GradScaler``.
    """

    name = "taylor_gate"
    needs_gradients = True
    needs_data = True

    def __init__(self, score_form: str = "square", normalize: bool = False, **_ignored):
        super().__init__(score_form, normalize)
        self._gates: dict[str, torch.Tensor] = {}  # group name -> float32 leaf [num_units]
        self._handles = []
        self._loss_scale_fn = None

    def setup(self, trainer) -> None:
        super().setup(trainer)
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            self._loss_scale_fn = scaler.get_scale

    def attach(self, structure: ModelStructure, model: nn.Module, step_fn=None) -> None:
        self.detach()
        for group in structure.groups():
            (member,) = [m for m in group.members if m.dim == COLUMNS]
            module = structure.module(group, member)
            device = base_linear(module).weight.device
            gate = torch.ones(group.num_units, dtype=torch.float32, device=device, requires_grad=True)
            self._gates[group.name] = gate
            hook = functools.partial(_apply_gate, gate=gate)
            self._handles.append(module.register_forward_pre_hook(hook))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._gates = [], {}

    def gate_gradients(self) -> dict[str, torch.Tensor]:
        """``dL/dm`` accumulated since the last :meth:`score`: ``{group.name: float32 [num_units]}``,
        averaged over processes and divided by the loss scale."""
        if not self._gates:
            raise RuntimeError("The `taylor_gate` criterion is not attached: call `setup(trainer)` or "
                               "`attach(structure, model)` before the backward pass.")
        names = list(self._gates)
        missing = [n for n in names if self._gates[n].grad is None]
        if len(missing) == len(names):
            raise RuntimeError("No gate gradient was recorded: run a training-mode forward and backward pass "
                               "(with gradients enabled) before scoring.")
        flat = torch.cat([self._gates[n].grad if self._gates[n].grad is not None
                          else torch.zeros_like(self._gates[n]) for n in names])
        flat = _mean_over_processes(flat)
        if self._loss_scale_fn is not None:
            flat = flat / float(self._loss_scale_fn())
        return dict(zip(names, flat.split([self._gates[n].numel() for n in names])))

    @torch.no_grad()
    def score(self, structure: ModelStructure) -> dict[str, torch.Tensor]:
        grads = self.gate_gradients()
        for gate in self._gates.values():  # the next step starts from zero
            gate.grad = None
        out = {}
        for group in structure.groups():
            g = grads[group.name].float()
            out[group.name] = combine_member_scores([g.square() if self.score_form == "square" else g.abs()],
                                                    self.normalize)
        return out


class _GateProbe(torch.autograd.Function):
    """``y = x``; the gate ``m: [num_units]`` gets the gradient it would get from ``y = x * m_expanded``
    at ``m = 1``, where ``m_expanded = repeat_interleave(m, in // num_units)`` covers ``x``'s last dim."""

    @staticmethod
    def forward(ctx, x, gate):
        ctx.save_for_backward(x)  # a saved tensor, so gradient checkpointing recomputes it like the others
        ctx.gate_shape, ctx.gate_device, ctx.gate_dtype = gate.shape, gate.device, gate.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad_gate = None
        if ctx.needs_input_grad[1]:
            num_units = ctx.gate_shape.numel()  # 1 for a scalar gate
            per_unit = (x * grad).reshape(-1, num_units, x.shape[-1] // num_units)  # [tokens, units, unit_size]
            total = per_unit.sum(dim=(0, 2), dtype=torch.promote_types(x.dtype, torch.float32))
            grad_gate = total.reshape(ctx.gate_shape).to(ctx.gate_device, ctx.gate_dtype)
        return grad, grad_gate


def gate_probe(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged, with ``gate`` (float32 ``[num_units]`` or a scalar, ``x.shape[-1]`` a multiple of
    its size) in the graph: backward leaves ``dL/dx`` as it is and gives the gate
    ``dL/dm_u = sum over tokens of x_u . dL/dx_u`` (one product and a sum, no forward work), the
    gradient of ``x * repeat_interleave(m)`` at ``m = 1``."""
    return _GateProbe.apply(x, gate)


def _apply_gate(module: nn.Module, args, *, gate: torch.Tensor):
    """Forward pre-hook: ``x`` through :func:`gate_probe` (one gate per unit of ``x``'s last dimension).
    Only in training-mode forwards that build a graph: evaluation pays nothing, and the no-grad first
    pass of reentrant checkpointing is skipped (its recomputation, with grad, counts instead)."""
    if not (module.training and torch.is_grad_enabled()):
        return None
    return (gate_probe(args[0], gate), *args[1:])


def _mean_over_processes(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over all processes of the default group (``t`` itself in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()
