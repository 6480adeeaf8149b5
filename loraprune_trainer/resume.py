"""Exact resume: the pruning state that a Trainer checkpoint needs besides weights and optimizer.

A LoRAPrune run is defined by three things that Trainer's own checkpoint does not hold:

* the keep-masks (``PruningState.keep``: BoolTensor[num_units] per group),
* the moving-average scores of Eq. 11 (``PruningState.scores``: float32 [num_units] per group),
* the schedule position, which is a pure function of ``state.global_step`` (restored by Trainer)
  and of the total number of steps and the pruning settings (both recorded here and checked).

With ``compensation``, the refits change the frozen base weights, which a PEFT checkpoint does not
hold: ``compensation_state.safetensors`` keeps the refitted consumers' current base weights (and
biases) exactly, in their own dtype, plus the running input sums of a statistics window that the
checkpoint falls into; ``compensation_state.json`` the window's target step and the refit history.

``LoRAPruneTrainer._save_checkpoint`` writes ``pruning_state.safetensors`` and
``pruning_settings.json`` into every ``checkpoint-N`` folder; ``LoRAPruneTrainer.train`` loads
them when ``resume_from_checkpoint`` is given, and refuses a checkpoint written with other settings.
"""

from __future__ import annotations

import json
import os

from safetensors.torch import load_file, save_file
from transformers.trainer_utils import get_last_checkpoint

from .masks import PruningState

PRUNING_STATE_NAME = "pruning_state.safetensors"
PRUNING_SETTINGS_NAME = "pruning_settings.json"
COMPENSATION_STATE_NAME = "compensation_state.safetensors"
COMPENSATION_META_NAME = "compensation_state.json"

# Settings added after checkpoints were first written, with the value that reproduces the older runs.
_LATER_SETTINGS = {"compensation": "none", "compensation_batches": 8, "compensation_lambda": 0.1,
                   "layer_pruning_ratio": 0.0, "layer_criterion": "taylor_gate", "width_multiple": 1}


class ResumeError(ValueError):
    """A checkpoint cannot continue this pruning run (missing pruning state or different settings)."""


def save_pruning_checkpoint(folder: str, pruning_state: PruningState, settings: dict, total_steps: int) -> None:
    """Write the masks, moving-average scores and the settings that fix the schedule into ``folder``.

    ``settings`` is ``LoRAPruneConfig.pruning_settings()``; ``total_steps`` is ``state.max_steps``.
    """
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in pruning_state.state_dict().items()}
    save_file(tensors, os.path.join(folder, PRUNING_STATE_NAME))
    meta = {
        "settings": settings,
        "total_steps": int(total_steps),
        "groups": {name: group.num_units for name, group in pruning_state.groups.items()},
        "attention_unit": pruning_state.structure.attention_unit,
    }
    with open(os.path.join(folder, PRUNING_SETTINGS_NAME), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def resolve_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint folder that ``Trainer.train(resume_from_checkpoint=...)`` will use, or ``None``
    (``True`` means the last ``checkpoint-N`` in ``output_dir``, as in Trainer)."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        folder = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if folder is None:
            raise ResumeError(f"`resume_from_checkpoint=True` but {output_dir!r} holds no checkpoint-N folder.")
        return folder
    if not os.path.isdir(resume_from_checkpoint):
        raise ResumeError(f"Checkpoint folder {resume_from_checkpoint!r} does not exist.")
    return str(resume_from_checkpoint)


def _differences(saved: dict, current: dict) -> dict:
    keys = sorted(set(saved) | set(current))
    return {k: (saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)}


def load_pruning_checkpoint(folder: str, pruning_state: PruningState, settings: dict) -> dict:
    """Restore masks and scores from ``folder`` into ``pruning_state``; returns the saved metadata
    (with ``total_steps``, which the caller checks against the resumed run's step count).

    Raises :class:`ResumeError` if the folder has no pruning state or was written with different
    pruning settings or for a different model structure.
    """
    state_file = os.path.join(folder, PRUNING_STATE_NAME)
    meta_file = os.path.join(folder, PRUNING_SETTINGS_NAME)
    if not (os.path.isfile(state_file) and os.path.isfile(meta_file)):
        raise ResumeError(
            f"{folder!r} has no {PRUNING_STATE_NAME}/{PRUNING_SETTINGS_NAME}: it was not written by "
            "LoRAPruneTrainer, so the masks and scores of the interrupted run are unknown. Resume from a "
            "LoRAPruneTrainer checkpoint, or start a new run without `resume_from_checkpoint`."
        )
    with open(meta_file) as f:
        meta = json.load(f)
    # JSON turns tuples into lists; compare through the same round trip.
    current = json.loads(json.dumps(settings))
    saved = {**{k: v for k, v in _LATER_SETTINGS.items() if k in current}, **meta.get("settings", {})}
    diff = _differences(saved, current)
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ResumeError(
            f"Checkpoint {folder!r} was written with different pruning settings ({detail}). Resume with the "
            "checkpoint's settings, or start a new run in another `output_dir`."
        )
    groups = {name: group.num_units for name, group in pruning_state.groups.items()}
    if meta.get("groups") != groups or meta.get("attention_unit") != pruning_state.structure.attention_unit:
        raise ResumeError(
            f"Checkpoint {folder!r} was written for another model structure (units per group "
            f"{meta.get('groups')} with attention_unit={meta.get('attention_unit')!r}, this model has {groups} with "
            f"attention_unit={pruning_state.structure.attention_unit!r})."
        )
    pruning_state.load_state_dict(load_file(state_file))
    return meta


def check_total_steps(meta: dict | None, total_steps: int) -> None:
    """The schedule is a function of the total step count: a resumed run must keep it."""
    if meta is not None and int(meta["total_steps"]) != int(total_steps):
        raise ResumeError(
            f"The checkpoint's run had {meta['total_steps']} training steps, this one has {total_steps}: the pruning "
            "schedule would change mid-run. Keep `max_steps` (or epochs, batch size and dataset) as they were."
        )


def save_compensation_checkpoint(folder: str, tensors: dict, meta: dict) -> None:
    """Write the compensation state (refitted consumer tensors, an open window's sums) into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, COMPENSATION_STATE_NAME))
    with open(os.path.join(folder, COMPENSATION_META_NAME), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def load_compensation_checkpoint(folder: str) -> tuple[dict, dict]:
    """``(tensors, meta)`` written by :func:`save_compensation_checkpoint`; :class:`ResumeError` if absent."""
    state_file = os.path.join(folder, COMPENSATION_STATE_NAME)
    meta_file = os.path.join(folder, COMPENSATION_META_NAME)
    if not (os.path.isfile(state_file) and os.path.isfile(meta_file)):
        raise ResumeError(
            f"{folder!r} has no {COMPENSATION_STATE_NAME}: the refitted base weights of the interrupted run are "
            "unknown, so it cannot be resumed exactly."
        )
    with open(meta_file) as f:
        meta = json.load(f)
    return load_file(state_file), meta
