"""LoRAPrune's LoRA-guided criterion (Zhang et al., 2024).

PEFT's LoRA linear computes ``y = x W^T + s (x A^T) B^T`` with ``W: [out, in]``, ``A: [r, in]``,
``B: [out, r]``. One SGD step of A and B with learning rate 1 changes ``BA`` by
``-(gB A + B gA - gB gA)``, so the gradient of the merged weight is estimated as

    G = gB A + B gA - gB gA                                   (Eq. 7-9)

and the importance of every element of the merged weight ``W' = W + s B A`` as

    I = (G * W')^2            (Eq. 10; ``score_form="abs"`` uses |G * W'| like the authors' code)

A unit's importance is the sum of ``I`` over every weight it owns (Eq. 4); the trainer keeps an
exponential moving average of it across optimizer steps (Eq. 11).
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import full_tensor
from ..structure import ROWS, GroupMember, ModelStructure, UnitGroup
from . import common
from .common import Criterion, base_weight, lora_parts


def estimated_weight_grad(a, b, grad_a, grad_b):
    """``G = gB A + B gA - gB gA``: [out, in] from A, gA: [r, in] and B, gB: [out, r] (Eq. 7-9),
    computed as one rank-2r product ``[gB, B - gB] @ [A; gA]``."""
    return torch.cat([grad_b, b - grad_b], dim=1) @ torch.cat([a, grad_a], dim=0)


def lora_importance(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    score_form: str = "square",
) -> torch.Tensor:
    """Element importance ``(G * (W + s B A))^2`` (or ``abs``): [out, in], all inputs float32.
    The reference form of what :func:`lora_member_scores` computes in place."""
    merged = weight + scaling * (b @ a)
    prod = estimated_weight_grad(a, b, grad_a, grad_b) * merged
    return prod.square() if score_form == "square" else prod.abs()


def _workspace(cache: dict | None, rows: int, cols: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 [rows, cols] buffers, reused across matrices when ``cache`` is given: the score
    runs every optimizer step, and fresh [out, in] temporaries cost more than the arithmetic.
    One buffer per (cols, device), grown to the largest row count asked for (at most 2 x 64 MiB)."""
    key = (cols, str(device))
    buf = cache.get(key) if cache is not None else None
    if buf is None or buf.shape[1] < rows:
        buf = torch.empty(2, rows, cols, dtype=torch.float32, device=device)
        if cache is not None:
            cache[key] = buf
    return buf[0, :rows], buf[1, :rows]


@torch.no_grad()
def lora_member_scores(module: nn.Module, member: GroupMember, num_units: int, score_form: str,
                       workspace: dict | None = None) -> torch.Tensor:
    """Eq. 10 summed over each unit's block of ``member``: Tensor[num_units], float32.

    Works on row chunks of at most ``common.CHUNK_ELEMENTS`` in two reusable buffers (``workspace``),
    in place: ``W' = W + s B A`` and ``G = [gB, B - gB] [A; gA]``, then ``(G * W')^2``. The base
    weight's gradient is never requested from autograd.
    """
    parts = lora_parts(module)
    if parts is None:
        raise ValueError(f"{type(module).__name__} has no LoRA adapter; LoRAPrune needs one on every member.")
    a_param, b_param, scaling = parts
    if a_param.grad is None or b_param.grad is None:
        raise RuntimeError("LoRA gradients are missing; scores must be computed before optimizer.zero_grad().")
    # Under FSDP2 parameters and gradients are DTensor shards: gather this matrix's (collective).
    a, b = full_tensor(a_param.detach()).float(), full_tensor(b_param.detach()).float()
    grad_a, grad_b = full_tensor(a_param.grad.detach()).float(), full_tensor(b_param.grad.detach()).float()
    weight = base_weight(module).to(a.device)  # its own dtype: converted chunk by chunk below
    out_features, in_features = weight.shape
    left = torch.cat([grad_b, b - grad_b], dim=1)  # [out, 2r]
    right = torch.cat([a, grad_a], dim=0)  # [2r, in]
    chunk = min(out_features, max(1, common.CHUNK_ELEMENTS // in_features))
    merged_buf, prod_buf = _workspace(workspace, chunk, in_features, a.device)
    per_index = torch.zeros(weight.shape[member.dim], dtype=torch.float32, device=a.device)
    for start in range(0, out_features, chunk):
        rows = slice(start, min(start + chunk, out_features))
        n = rows.stop - rows.start
        merged = merged_buf[:n].copy_(weight[rows]).addmm_(b[rows], a, alpha=scaling)  # W' [n, in]
        prod = torch.mm(left[rows], right, out=prod_buf[:n]).mul_(merged)  # G * W' [n, in]
        imp = prod.square_() if score_form == "square" else prod.abs_()
        if member.dim == ROWS:
            per_index[rows] = imp.sum(dim=1)
        else:
            per_index += imp.sum(dim=0)
    return per_index.view(num_units, member.unit_size).sum(dim=1)


class LoRACriterion(Criterion):
    """LoRA-guided importance (Eq. 10) from the LoRA matrices' accumulated gradients."""

    name = "lora"
    needs_gradients = True
    needs_data = True

    def __init__(self, score_form: str = "square", normalize: bool = False, **_ignored):
        super().__init__(score_form, normalize)
        self._workspace: dict = {}  # reusable score buffers (see _workspace)

    def member_scores(self, structure: ModelStructure, group: UnitGroup, member: GroupMember) -> torch.Tensor:
        return lora_member_scores(structure.module(group, member), member, group.num_units, self.score_form,
                                  self._workspace)
