"""The Trainer callback that runs LoRAPrune inside the training loop.

* ``on_pre_optimizer_step``: gradients are fully accumulated, synchronised across processes,
  unscaled and clipped, and not yet zeroed: score every group and update the moving average.
* ``on_step_end``: every ``prune_freq`` steps of the ramp (and at its end), grow the masks to the
  scheduled count, then (``compensation``) refit the consumers of the removed units.

:class:`CompensationCallback` opens the statistics window of the next mask update in
``on_step_begin`` and holds the running sums until that update.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from .compensation import (MomentAccumulator, all_reduce_moments, compensate, consumer, consumer_name,
                           consumer_tensors)
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
        state, structure = self.pruner.pruning_state, self.pruner.structure
        if not bool(state.layer_keep.all()):  # removed layers have no gradients; their width scores no longer matter
            structure = structure.only_layers(state.layer_keep)
        state.update_scores(self.pruner.criterion.score(structure), args.ema_lambda)
        layer_scorer = getattr(self.pruner, "layer_scorer", None)
        # Once every layer is chosen the scores stop (also right after resuming from such a checkpoint).
        if layer_scorer is not None and state.num_pruned_layers() < self.pruner.final_layer_count:
            layer_scores = layer_scorer.score()
            if layer_scores is not None:
                state.update_layer_scores(layer_scores, args.ema_lambda if layer_scorer.ema else 0.0)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.schedule is None or not self.schedule.is_update_step(step):
            return
        compensation = getattr(self.pruner, "compensation_callback", None)
        before = {n: k.clone() for n, k in self.pruner.pruning_state.keep.items()} if compensation else None
        self.pruner.apply_schedule(self.schedule.progress(step))
        # Every rank scored identical all-reduced gradients; broadcasting rank 0's state guards
        # against non-deterministic kernels (a no-op in a single process).
        accelerator = getattr(self.pruner, "accelerator", None)
        self.rank_mismatches += sync_pruning_state(self.pruner.pruning_state,
                                                   accelerator.device if accelerator is not None else "cpu")
        if compensation is not None:  # after the broadcast, so every rank refits for rank 0's masks
            compensation.refit(before, step)


def update_masks(pruning_state, final_counts: dict[str, int], progress: float) -> dict[str, list[int]]:
    """Grow every group's mask to its scheduled count at ``progress``; returns the new pruned indices."""
    changed = {}
    for name, group in pruning_state.groups.items():
        count = scheduled_prune_count(group, final_counts[name], progress)
        newly = pruning_state.prune_to(name, count)
        if newly:
            changed[name] = newly
    return changed


class CompensationCallback(TrainerCallback):
    """Collects consumer inputs in the window before each mask update; :meth:`refit` uses them.

    The window of update step ``u`` is the last ``compensation_batches`` micro-batches of the steps
    after the previous update and up to ``u``, and watches only the consumers of groups that ``u``
    will shrink (their scheduled count is known in advance). Outside windows no consumer hook is
    installed; the only per-forward cost is a counter in a pre-hook on the top-level model.
    Micro-batches are the training-mode model calls with gradients and masks on: the distillation
    teacher (masks off, no grad), metrics and evaluation forwards are not counted.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        args = trainer.args
        self.method, self.batches, self.ridge = args.compensation, args.compensation_batches, args.compensation_lambda
        self.accumulator = MomentAccumulator(trainer.model, second_moments=self.method == "lstsq",
                                             accept=self._accept)
        self.target_step: int | None = None  # the mask update the open window feeds
        self.refitted: set[str] = set()  # consumers whose base tensors changed (checkpoints must hold them)
        self.history: list[dict] = []  # one record per refitted group and update (lambda, errors)
        self._start: int | None = None  # first micro-batch of this step inside the window
        self._index = 0  # micro-batches of this step seen so far
        self._plan_cache = None

    def _accept(self, model) -> bool:
        if not (model.training and torch.is_grad_enabled() and self.trainer.mask_hooks.enabled):
            return False
        index, self._index = self._index, self._index + 1
        return self._start is not None and index >= self._start

    def plan(self, next_step: int):
        """``(update step, consumer names)`` of the first mask update at or after ``next_step`` that
        removes units, or ``None``. Cached until masks change or that step is passed."""
        state = self.trainer.pruning_state
        cached = self._plan_cache
        if cached is not None and cached[0] == state.version and next_step <= cached[1]:
            return cached[2]
        schedule = self.trainer.pruning_callback.schedule
        result = None
        for step in range(max(next_step, schedule.ramp_start), schedule.ramp_end + 1):
            if not schedule.is_update_step(step):
                continue
            progress = schedule.progress(step)
            names = [consumer_name(g) for g in state.groups.values()
                     if scheduled_prune_count(g, self.trainer.final_prune_counts[g.name], progress)
                     > state.num_pruned(g.name)]
            if names:
                result = (step, names)
                break
        self._plan_cache = (state.version, result[0] if result else schedule.total_steps, result)
        return result

    def on_step_begin(self, args, state, control, **kwargs):
        self._index, self._start = 0, None
        if self.trainer.pruning_callback.schedule is None:
            return
        next_step = state.global_step + 1
        plan = self.plan(next_step)
        if plan is None:
            self.accumulator.unwatch()
            return
        target, names = plan
        this_step = getattr(self.trainer, "current_gradient_accumulation_steps", None) or \
            args.gradient_accumulation_steps
        remaining = this_step + (target - next_step) * args.gradient_accumulation_steps  # micro-batches up to the update
        start = remaining - self.batches
        if start >= this_step:
            return  # the window opens in a later step
        if self.target_step != target:  # a new window (a resumed one keeps its restored sums)
            self.accumulator.reset()
            self.target_step = target
        if set(self.accumulator.watched) != set(names):
            groups = {consumer_name(g): g for g in self.trainer.structure.groups()}
            self.accumulator.watch({n: consumer(self.trainer.structure, groups[n]) for n in names})
        self._start = max(0, start)

    def refit(self, before: dict, step: int) -> list[dict]:
        """Refit every consumer whose group lost units since ``before`` (keep-masks); frees the window."""
        keep = self.trainer.pruning_state.keep
        if all(torch.equal(before[n], keep[n]) for n in keep):
            return []  # an update step that removed nothing: the open window feeds a later one
        moments = self.accumulator.moments
        all_reduce_moments(moments)
        records = compensate(self.trainer.structure, before, self.trainer.pruning_state.keep, moments,
                             self.method, self.ridge)
        self.accumulator.unwatch()
        self.accumulator.reset()
        self.target_step, self._start = None, None
        for r in records:
            self.refitted.add(consumer_name(self.trainer.pruning_state.groups[r["group"]]))
            self.history.append({"step": step, **r})
        if records:
            logger.info("LoRAPrune: %s-compensated %d groups at step %d", self.method, len(records), step)
        return records

    def metrics(self) -> dict[str, float]:
        """Of the last refit: mean ridge ``lambda`` and output error after / before (``lstsq``)."""
        if not self.history:
            return {}
        last = [r for r in self.history if r["step"] == self.history[-1]["step"]]
        out = {"prune/compensation_step": float(last[0]["step"])}
        if self.method == "lstsq":
            out["prune/compensation_lambda"] = sum(r["lambda"] for r in last) / len(last)
            before = sum(r["error_before"] for r in last)
            out["prune/compensation_error_ratio"] = sum(r["error_after"] for r in last) / before if before else 0.0
        return out

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict]:
        """``(tensors, meta)``: refitted consumer weights/biases and an open window's sums; the
        window's target step, the refitted names and the history."""
        tensors = {f"consumer.{k}": v for k, v in consumer_tensors(self.trainer.structure, self.refitted).items()}
        tensors.update(self.accumulator.state_dict() if self.target_step is not None else {})
        meta = {"target_step": self.target_step, "refitted": sorted(self.refitted), "history": self.history,
                "watched": list(self.accumulator.watched)}
        return tensors, meta

    def load_state_dict(self, tensors: dict, meta: dict) -> None:
        from .compensation import load_consumer_tensors
        from .criteria.common import base_linear

        structure = self.trainer.structure
        load_consumer_tensors(structure, {k[len("consumer."):]: v for k, v in tensors.items()
                                          if k.startswith("consumer.")})
        self.refitted = set(meta.get("refitted", []))
        self.history = list(meta.get("history", []))
        self.target_step = meta.get("target_step")
        devices = {consumer_name(g): base_linear(consumer(structure, g)).weight.device for g in structure.groups()}
        self.accumulator.load_state_dict({k: v for k, v in tensors.items() if k.startswith("moments.")}, devices)
