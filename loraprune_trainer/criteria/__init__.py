"""Importance criteria, one module per family; each maps a model's unit groups to scores.

=============  =======================================================  ===================
name           score of a unit (summed over its weights unless noted)   module
=============  =======================================================  ===================
``lora``       ``(G * W')^2``, ``G`` estimated from LoRA's gradients    :mod:`.lora`
``vanilla``    ``(dL/dW' * W')^2`` with the base weights' gradients     :mod:`.taylor`
``taylor_gate``  ``(dL/dm_u)^2``: gate gradient of the whole unit       :mod:`.taylor`
``wanda``      ``|W'| * ||X||_2`` (activation norms)                    :mod:`.activation`
``magnitude``  ``|W'|``                                                 :mod:`.weight`
``random``     i.i.d. uniform                                           :mod:`.weight`
=============  =======================================================  ===================

``W' = W + s B A`` is the merged weight. The registry lives here and only here: the family modules
never import this package back.
"""

from __future__ import annotations

from .activation import WandaCriterion
from .common import (SCORE_FORMS, Criterion, base_weight, combine_member_scores, dense_base_weight, lora_parts,
                     merged_weight)
from .lora import LoRACriterion, lora_importance, lora_member_scores
from .taylor import TaylorGateCriterion, VanillaCriterion
from .weight import MagnitudeCriterion, RandomCriterion

CRITERIA: dict[str, type[Criterion]] = {
    cls.name: cls
    for cls in (LoRACriterion, TaylorGateCriterion, VanillaCriterion, WandaCriterion, MagnitudeCriterion,
                RandomCriterion)
}


def build_criterion(name: str, score_form: str = "square", normalize: bool = False) -> Criterion:
    """A fresh criterion ``CRITERIA[name](score_form, normalize)``; a clear error for an unknown name."""
    if name not in CRITERIA:
        raise ValueError(f"`pruning_criterion` must be one of {sorted(CRITERIA)}, got {name!r}")
    return CRITERIA[name](score_form=score_form, normalize=normalize)


__all__ = [
    "CRITERIA", "SCORE_FORMS", "Criterion", "LoRACriterion", "MagnitudeCriterion", "RandomCriterion",
    "TaylorGateCriterion", "VanillaCriterion", "WandaCriterion", "base_weight", "build_criterion",
    "combine_member_scores", "dense_base_weight", "lora_importance", "lora_member_scores", "lora_parts",
    "merged_weight",
]
