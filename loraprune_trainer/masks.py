"""Pruning state (moving-average scores and keep-masks) and the hooks that apply the masks.

Invariant: the masked model computes exactly what the physically pruned model computes. The
masks zero the *inputs* of ``o_proj`` (per head) and ``down_proj`` (per channel), which is the same
as deleting those columns of the base weight and of LoRA's ``A``; zeroing q/k alone would not do
(softmax of zero logits is uniform, so the head would still average V). Masks only grow.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from .structure import COLUMNS, ModelStructure, UnitGroup, unit_parameters


class PruningState:
    """Per group: ``keep[name]`` BoolTensor[num_units] and ``scores[name]`` float32 [num_units]
    (the moving average of Eq. 11: ``S <- lambda S + (1 - lambda) I``). Whole decoder layers
    (:mod:`loraprune_trainer.depth`): ``layer_keep`` BoolTensor[num_layers] and ``layer_scores``
    float32 [num_layers]; a removed layer's width masks no longer matter."""

    def __init__(self, structure: ModelStructure):
        self.structure = structure
        self.groups = {g.name: g for g in structure.groups()}
        self.keep = {n: torch.ones(g.num_units, dtype=torch.bool) for n, g in self.groups.items()}
        self.scores = {n: torch.zeros(g.num_units, dtype=torch.float32) for n, g in self.groups.items()}
        self.layer_keep = torch.ones(structure.num_layers, dtype=torch.bool)
        self.layer_scores = torch.zeros(structure.num_layers, dtype=torch.float32)
        self.layer_stats: dict[str, torch.Tensor] = {}  # running sums of a layer criterion (block influence)
        self.num_score_updates = 0
        self.version = 0  # bumped whenever a mask changes, so hooks refresh their cached tensors

    # -- scores --------------------------------------------------------------------------------
    def update_scores(self, new_scores: dict[str, torch.Tensor], ema_lambda: float) -> bool:
        """Fold one step's scores into the moving average; skip (return False) if any is not finite."""
        bad = [n for n, s in new_scores.items() if not torch.isfinite(s).all()]
        if bad:
            warnings.warn(
                f"Skipping an importance update: non-finite scores in {bad[:3]}{'...' if len(bad) > 3 else ''}.",
                stacklevel=2,
            )
            return False
        for name, s in new_scores.items():
            s = s.detach().float().cpu()
            self.scores[name].mul_(ema_lambda).add_(s, alpha=1.0 - ema_lambda)
        self.num_score_updates += 1
        return True

    def update_layer_scores(self, scores: torch.Tensor, ema_lambda: float) -> bool:
        """Fold one step's layer scores ``[num_layers]`` into ``layer_scores`` (``ema_lambda=0`` replaces
        them); skip (return False) if any is not finite."""
        if not torch.isfinite(scores).all():
            warnings.warn("Skipping a layer importance update: non-finite scores.", stacklevel=2)
            return False
        self.layer_scores.mul_(ema_lambda).add_(scores.detach().float().cpu(), alpha=1.0 - ema_lambda)
        return True

    # -- masks ---------------------------------------------------------------------------------
    def num_pruned_layers(self) -> int:
        return int((~self.layer_keep).sum())

    def prune_layers_to(self, count: int) -> list[int]:
        """Remove decoder layers, lowest ``layer_scores`` first among those kept, until ``count`` are
        removed (masks only grow). Returns the newly removed layer indices."""
        need = count - self.num_pruned_layers()
        if need <= 0:
            return []
        candidates = self.layer_scores.masked_fill(~self.layer_keep, float("inf"))
        newly = torch.argsort(candidates, stable=True)[:need]
        self.layer_keep[newly] = False
        self.version += 1
        return sorted(newly.tolist())

    def num_pruned(self, name: str) -> int:
        return int((~self.keep[name]).sum())

    def prune_to(self, name: str, count: int) -> list[int]:
        """Grow the mask of group ``name`` until ``count`` units are pruned, removing the lowest
        moving-average scores among the units still kept. Returns the newly pruned indices.

        Units that share a key/value head are pruned evenly: ``count / num_kv_groups`` per KV group.
        """
        group = self.groups[name]
        keep, scores = self.keep[name], self.scores[name]
        # One block per KV group when units share KV heads, else a single block of all units.
        per_block = group.units_per_kv_group if group.units_per_kv_group > 1 else group.num_units
        num_blocks = group.num_units // per_block
        if count % num_blocks:
            raise ValueError(f"{name}: {count} units cannot be split evenly over {num_blocks} KV groups")
        target_per_block = count // num_blocks
        blocks, block_scores = keep.view(num_blocks, per_block), scores.view(num_blocks, per_block)
        newly = []
        for b in range(blocks.shape[0]):
            need = target_per_block - int((~blocks[b]).sum())
            if need <= 0:
                continue  # masks only grow
            candidates = block_scores[b].masked_fill(~blocks[b], float("inf"))
            order = torch.argsort(candidates, stable=True)[:need]
            blocks[b, order] = False
            newly.extend((b * blocks.shape[1] + order).tolist())
        if newly:
            self.version += 1
        return sorted(newly)

    def kept_indices(self, name: str) -> torch.Tensor:
        return self.keep[name].nonzero().flatten()

    # -- (de)serialisation for checkpoints -----------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"keep.{n}": k.clone() for n, k in self.keep.items()}
        out.update({f"scores.{n}": s.clone() for n, s in self.scores.items()})
        out.update({f"layer_stats.{k}": v.clone() for k, v in self.layer_stats.items()})
        out["keep.layers"] = self.layer_keep.clone()
        out["scores.layers"] = self.layer_scores.clone()
        out["num_score_updates"] = torch.tensor(self.num_score_updates)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n in self.groups:
            if self.keep[n].shape != state[f"keep.{n}"].shape:
                raise ValueError(f"Saved mask for {n} has shape {tuple(state[f'keep.{n}'].shape)}, expected "
                                 f"{tuple(self.keep[n].shape)}: it was made for a different model or attention unit.")
            self.keep[n].copy_(state[f"keep.{n}"].bool())
            self.scores[n].copy_(state[f"scores.{n}"].float())
        if "keep.layers" in state:  # absent from checkpoints written before depth pruning: all layers kept
            if state["keep.layers"].shape != self.layer_keep.shape:
                raise ValueError(f"Saved layer mask has {state['keep.layers'].numel()} layers, the model "
                                 f"{self.layer_keep.numel()}: it was made for a different model.")
            self.layer_keep.copy_(state["keep.layers"].bool())
            self.layer_scores.copy_(state["scores.layers"].float())
        for key, value in state.items():
            if key.startswith("layer_stats."):
                self.layer_stats[key[len("layer_stats."):]] = value.clone()
        self.num_score_updates = int(state["num_score_updates"])
        self.version += 1

    # -- summaries -----------------------------------------------------------------------------
    def sparsity(self, kind: str) -> float:
        names = [n for n, g in self.groups.items() if g.kind == kind]
        total = sum(self.groups[n].num_units for n in names)
        return sum(self.num_pruned(n) for n in names) / max(total, 1)

    def pruned_heads(self) -> int:
        return sum(self.num_pruned(n) * g.heads_per_unit for n, g in self.groups.items() if g.kind == "attention")

    def pruned_channels(self) -> int:
        return sum(self.num_pruned(n) for n, g in self.groups.items() if g.kind == "mlp")

    def removed_parameters(self) -> int:
        """Base-model parameters (weights and biases) that cutting the pruned units and dropping the
        removed layers removes (a removed layer counts whole, its pruned units not again)."""
        from .depth import layer_parameters

        removed = 0
        for idx in range(self.structure.num_layers):
            if not bool(self.layer_keep[idx]):
                removed += layer_parameters(self.structure, idx)
        return removed + sum(self.num_pruned(name) * unit_parameters(self.structure, group)
                             for name, group in self.groups.items() if bool(self.layer_keep[group.layer_idx]))


def _expanded_mask(group: UnitGroup, keep: torch.Tensor, member_unit_size: int) -> torch.Tensor:
    return keep.repeat_interleave(member_unit_size)  # [num_units * unit_size] = [in_features]


class MaskHooks:
    """Forward pre-hooks that zero the input columns of every group's column member
    (``o_proj`` per head, ``down_proj`` per channel); with ``layers=True`` also forward hooks that
    zero the attention and MLP outputs of removed decoder layers (the layer becomes the identity).
    Remove with :meth:`remove`."""

    def __init__(self, state: PruningState, layers: bool = False):
        self.state = state
        self.enabled = True
        self.handles = []
        self._cache: dict[tuple, torch.Tensor] = {}
        self._masked: tuple[int, set[str]] | None = None  # (state version, names of groups with cuts)
        for name, group in state.groups.items():
            for member in group.members:
                if member.dim == COLUMNS:
                    module = state.structure.module(group, member)
                    self.handles.append(module.register_forward_pre_hook(self._make_hook(name, group, member)))
        if layers:
            from .depth import residual_branches

            for idx, layer in enumerate(state.structure.layers):
                for branch in residual_branches(layer):
                    self.handles.append(branch.register_forward_hook(self._make_layer_hook(idx)))

    def _make_layer_hook(self, idx: int):
        from .depth import zero_output

        def hook(module: nn.Module, args, output):
            if not self.enabled or bool(self.state.layer_keep[idx]):
                return None
            return zero_output(output)

        return hook

    def _make_hook(self, name: str, group: UnitGroup, member):
        def hook(module: nn.Module, args):
            if not self.enabled or name not in self._masked_groups():
                return None  # nothing cut here yet: no product, no extra tensor
            x = args[0]
            key = (name, self.state.version, x.device, x.dtype)
            mask = self._cache.get(key)
            if mask is None:
                self._cache = {k: v for k, v in self._cache.items() if k[1] == self.state.version}
                mask = _expanded_mask(group, self.state.keep[name], member.unit_size).to(x.device, x.dtype)
                self._cache[key] = mask
            return (x * mask, *args[1:])  # [..., in_features] * [in_features]

        return hook

    def _masked_groups(self) -> set[str]:
        """Names of the groups with at least one unit cut, recomputed only when the masks change."""
        if self._masked is None or self._masked[0] != self.state.version:
            self._masked = (self.state.version, {n for n, k in self.state.keep.items() if not bool(k.all())})
        return self._masked[1]

    @contextlib.contextmanager
    def disabled(self):
        """Inside the block the model computes as if nothing were pruned (the distillation teacher)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._cache.clear()
