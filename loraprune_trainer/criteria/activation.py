"""Activation-aware criteria: structured Wanda (Sun et al., 2024).

``|W'_ij| * ||X_j||_2`` summed over each unit's weights, with ``||X_j||_2`` the L2 norm over the
step's tokens of input feature ``j`` of that matrix and ``W' = W + s B A``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..structure import ROWS
from .common import Criterion, StepCounter, group_members, merged_weight


class WandaCriterion(Criterion):
    """Structured Wanda: ``|W'_ij| * ||X_j||_2`` summed over each unit's weights.

    ``||X_j||_2`` is the L2 norm of input feature ``j`` over every token the matrix saw during the
    current optimizer step (all its micro-batches; padding tokens included). Forward pre-hooks on
    the members accumulate ``sum_tokens x_j^2``. Only forwards that run inside the top-level model
    call in training mode count: gradient checkpointing re-runs layer forwards during backward,
    outside that call, and evaluation runs in eval mode, so each training token counts exactly once.
    Hooks are registered after the mask hooks, so a pruned column's norm is 0.
    """

    name = "wanda"
    needs_data = True

    def __init__(self, score_form: str = "square", normalize: bool = False, **_ignored):
        super().__init__(score_form, normalize)
        self._handles = []
        self._sumsq: dict[int, torch.Tensor] = {}  # id(module) -> float32 [in]
        self._fresh: set[int] = set()
        self._steps: StepCounter | None = None
        self._depth = 0  # > 0 while the top-level model forward runs

    def attach(self, structure, model, step_fn=None):
        self.detach()
        self._steps = StepCounter(step_fn)
        self._handles.append(model.register_forward_pre_hook(self._enter))
        self._handles.append(model.register_forward_hook(self._leave, always_call=True))
        seen = set()
        for _, _, module in group_members(structure):
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
