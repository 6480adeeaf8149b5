"""The Trainer callback that runs LoRAPrune inside the training loop.

* ``on_pre_optimizer_step``: gradients are fully accumulated, synchronised across processes,
  unscaled and clipped, and not yet zeroed: score every group and update the moving average.
* ``on_step_end``: every ``prune_freq`` steps of the ramp (and at its end), grow the masks to the
  scheduled count.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from .distributed import sync_pruning_state
from .schedule import PruningSchedule, scheduled_prune_count

logger = logging.getLogger(__name__)


class LoRAPruneCallback(TrainerCallback):
    """Drives a :class:`~loraprune_trainer.trainer.LoRAPruneTrainer`'s pruning state.

    ``pruner`` needs ``pruning_state``, ``criterion``, ``final_prune_counts``, ``args`` and
    ``make_schedule(total_steps)``; the trainer provides all of them.
    """

    def __init__(self, pruner):
        self.pruner = pruner
        self.schedule: PruningSchedule | None = None
        self.rank_mismatches = 0  # mask entries that differed from rank 0 at synchronisation (should stay 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.schedule = self.pruner.make_schedule(state.max_steps)
        logger.info(
            "LoRAPrune schedule: %s, ramp over steps %d..%d of %d, masks updated every %d steps",
            self.schedule.kind, self.schedule.ramp_start, self.schedule.ramp_end, self.schedule.total_steps,
            self.schedule.prune_freq,
        )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # Scores after the final step's ramp are not used: skip their cost during recovery.
        if self.schedule is not None and state.global_step + 1 > self.schedule.ramp_end:
            return
        scores = self.pruner.criterion.score(self.pruner.structure)
        self.pruner.pruning_state.update_scores(scores, args.ema_lambda)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.schedule is None or not self.schedule.is_update_step(step):
            return
        self.pruner.apply_schedule(self.schedule.progress(step))
        # Every rank scored identical all-reduced gradients; broadcasting rank 0's state guards
        # against non-deterministic kernels (a no-op in a single process).
        accelerator = getattr(self.pruner, "accelerator", None)
        self.rank_mismatches += sync_pruning_state(self.pruner.pruning_state,
                                                   accelerator.device if accelerator is not None else "cpu")


def update_masks(pruning_state, final_counts: dict[str, int], progress: float) -> dict[str, list[int]]:
    """Grow every group's mask to its scheduled count at ``progress``; returns the new pruned indices."""
    changed = {}
    for name, group in pruning_state.groups.items():
        count = scheduled_prune_count(group, final_counts[name], progress)
        newly = pruning_state.prune_to(name, count)
        if newly:
            changed[name] = newly
    return changed
