"""Data-free criteria: weight magnitude and random scores (the floor any criterion must beat)."""

from __future__ import annotations

import torch

from ..structure import ModelStructure
from .common import Criterion, merged_weight, unit_sums


class MagnitudeCriterion(Criterion):
    """``|W + s B A|`` summed over each unit's weights. No gradients, no data."""

    name = "magnitude"

    def member_scores(self, structure, group, member):
        module = structure.module(group, member)
        return unit_sums(merged_weight(module).abs(), member, group.num_units)


class RandomCriterion(Criterion):
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
