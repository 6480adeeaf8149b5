"""How many units are pruned at each optimizer step: pure functions of the step.

Cubic schedule (Zhu & Gupta, 2017), as in the LoRAPrune code, in three phases over ``total_steps``:

1. steps ``[0, ramp_start)``: nothing pruned (warm-up);
2. steps ``[ramp_start, ramp_end]``: progress ``1 - (1 - t)^3`` with ``t`` going 0 -> 1;
3. steps ``[ramp_end, total_steps]``: the full target is pruned (cool-down, recovery).

Masks are updated every ``prune_freq`` steps inside the ramp and always at ``ramp_end``, so the
target is reached exactly (the authors' code stops one unit short). ``one_shot`` prunes the whole
target at the first step of phase 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .structure import UnitGroup

SCHEDULES = ("cubic", "one_shot")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _aligned(group: UnitGroup, count: int, width_multiple: int) -> int:
    """``count`` raised (never lowered) so that the MLP channels kept are a multiple of ``width_multiple``;
    attention groups are left alone (their widths are whole heads, multiples of ``head_dim``). No change
    when nothing is pruned or when fewer than ``width_multiple`` channels would stay."""
    if group.kind != "mlp" or width_multiple <= 1 or count == 0:
        return count
    kept = group.num_units - count
    aligned = (kept // width_multiple) * width_multiple
    return count if aligned == 0 else group.num_units - aligned


def final_prune_count(group: UnitGroup, ratio: float, width_multiple: int = 1) -> int:
    """Units of ``group`` to prune for ``ratio``, rounded to what the group's layout allows.

    Units sharing one key/value head (``query_head`` under GQA) are removed evenly from every KV
    group so that heads-per-KV stays uniform; at least one unit (per KV group) always remains. With
    ``width_multiple`` > 1 the MLP channels kept are rounded down to a multiple of it.
    """
    per_kv = group.units_per_kv_group
    num_kv_groups = group.num_units // per_kv
    per_group = min(_round_half_up(ratio * per_kv), per_kv - 1) if per_kv > 1 else None
    if per_group is not None:
        return per_group * num_kv_groups
    return _aligned(group, min(_round_half_up(ratio * group.num_units), group.num_units - 1), width_multiple)


def allowed_prune_counts(group: UnitGroup, width_multiple: int = 1) -> list[int]:
    """Every final count :func:`final_prune_count` can return for ``group``, ascending."""
    per_kv = group.units_per_kv_group
    if per_kv > 1:
        num_kv_groups = group.num_units // per_kv
        return [k * num_kv_groups for k in range(per_kv)]
    return sorted({_aligned(group, c, width_multiple) for c in range(group.num_units)})


class UnreachableBudgetError(ValueError):
    """No unit counts the layout allows remove the requested share of parameters."""


def budget_prune_counts(attention: UnitGroup, mlp: UnitGroup, attention_unit_params: int, mlp_unit_params: int,
                        num_layers: int, decoder_params: int, param_ratio: float,
                        attention_ratio: float | None = None, mlp_ratio: float | None = None,
                        width_multiple: int = 1) -> tuple[int, int]:
    """Per-layer ``(attention units, MLP channels)`` to prune so that at least ``param_ratio`` of the
    decoder layers' ``decoder_params`` parameters go, as little above it as the layout allows.

    Every layer prunes the same counts. A given per-kind ratio fixes that kind (rounded like
    :func:`final_prune_count`) and the other kind is solved for; with neither, attention is pruned at
    the budget's own ratio (at most what the budget allows) and the MLP channels, the fine-grained
    kind, make up the rest. Raises :class:`UnreachableBudgetError` when even pruning all but one unit
    of the free kind falls short.
    """
    target = param_ratio * decoder_params

    def removed(a: int, m: int) -> int:
        return num_layers * (a * attention_unit_params + m * mlp_unit_params)

    def fail(detail: str, most: int):
        raise UnreachableBudgetError(
            f"`param_pruning_ratio`={param_ratio:g} is out of reach: {detail}, so at most {most / decoder_params:.1%} "
            "of the decoder parameters can go. Lower the budget, or leave the other kind of unit free.")

    mlp_counts = allowed_prune_counts(mlp, width_multiple)

    def mlp_channels_for(a: int) -> int:
        need = max(0, math.ceil((target - removed(a, 0)) / (num_layers * mlp_unit_params)))
        return next((c for c in mlp_counts if c >= need), need)  # aligned widths: the next allowed count up

    max_a, max_m = max(allowed_prune_counts(attention)), max(mlp_counts)
    if attention_ratio is not None:
        a = final_prune_count(attention, attention_ratio)
        if mlp_channels_for(a) > max_m:
            fail(f"with {a} of {attention.num_units} attention units per layer fixed, the MLPs would need "
                 f"{mlp_channels_for(a)} of {mlp.num_units} channels", removed(a, max_m))
        return a, mlp_channels_for(a)
    if mlp_ratio is not None:
        m = final_prune_count(mlp, mlp_ratio, width_multiple)
        for a in allowed_prune_counts(attention):
            if removed(a, m) >= target:
                return a, m
        fail(f"with {m} of {mlp.num_units} MLP channels per layer fixed, attention cannot make up the rest",
             removed(max_a, m))
    # Attention at the budget's ratio (no more than the budget itself), the MLPs fill the rest; if they
    # cannot, more attention units go.
    first = min(final_prune_count(attention, param_ratio),
                max(c for c in allowed_prune_counts(attention) if removed(c, 0) <= target))
    for a in [c for c in allowed_prune_counts(attention) if c >= first]:
        if mlp_channels_for(a) <= max_m:
            return a, mlp_channels_for(a)
    fail("pruning all but one unit of each kind per layer falls short", removed(max_a, max_m))


def scheduled_prune_count(group: UnitGroup, final_count: int, progress: float) -> int:
    """Units pruned at ``progress`` in [0, 1] on the way to ``final_count`` (a multiple of the number
    of KV groups when units share KV heads); exactly ``final_count`` at progress 1."""
    assert 0.0 <= progress <= 1.0, progress
    num_kv_groups = group.num_units // group.units_per_kv_group
    if group.units_per_kv_group > 1:
        per_group = final_count // num_kv_groups
        return _round_half_up(progress * per_group) * num_kv_groups
    return _round_half_up(progress * final_count)


@dataclass(frozen=True)
class PruningSchedule:
    """When masks change. Steps are optimizer steps counted from 1 (``state.global_step`` after
    the step), so step ``total_steps`` is the last one."""

    total_steps: int
    prune_freq: int = 10
    warmup_ratio: float = 0.1
    cooldown_ratio: float = 0.1
    kind: str = "cubic"

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")

    @property
    def ramp_start(self) -> int:
        return max(1, _round_half_up(self.warmup_ratio * self.total_steps))

    @property
    def ramp_end(self) -> int:
        if self.kind == "one_shot":
            return self.ramp_start
        end = self.total_steps - _round_half_up(self.cooldown_ratio * self.total_steps)
        return min(self.total_steps, max(end, self.ramp_start))

    def progress(self, step: int) -> float:
        """Fraction of the final prune count reached after optimizer step ``step``."""
        if step < self.ramp_start:
            return 0.0
        if step >= self.ramp_end:
            return 1.0
        t = (step - self.ramp_start) / (self.ramp_end - self.ramp_start)
        return 1.0 - (1.0 - t) ** 3

    def is_update_step(self, step: int) -> bool:
        """Whether masks are recomputed after optimizer step ``step``."""
        if step < self.ramp_start or step > self.ramp_end:
            return False
        return step == self.ramp_end or (step - self.ramp_start) % self.prune_freq == 0
