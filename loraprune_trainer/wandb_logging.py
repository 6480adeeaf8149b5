"""Weights & Biases extras for LoRAPrune runs (``report_to="wandb"``); wandb stays optional.

Scalars (``prune/*`` sparsity, parameter counts, score statistics, ``eval_perplexity``) go through
``LoRAPruneTrainer.log``, so Trainer's own ``WandbCallback`` sends them with the loss. This module
adds what is not a scalar:

* ``prune/layers``: a table with one row per decoder layer (whether it stays, attention units, query
  heads and MLP channels kept, layer score), and ``prune/masks``: a heatmap of the keep-masks (layers x units), both logged at
  every mask update and at the end of training;
* the exported ``pruning_report.json`` as a ``pruning-report`` artifact (:func:`log_report_artifact`);
* :func:`log_summary` for run-level numbers a script computes after training (e.g. final perplexity).

Only the main process logs. ``wandb`` is imported inside the functions, never at module import.
"""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback


def active_run():
    """The current ``wandb.run``, or ``None`` if wandb is not installed or no run is active."""
    try:
        import wandb
    except ImportError:
        return None
    return wandb.run


LAYER_COLUMNS = ["layer", "layer_kept", "attention_units_kept", "query_heads_kept", "mlp_channels_kept",
                 "layer_score"]


def layer_rows(pruning_state) -> list[list]:
    """One row per decoder layer (:data:`LAYER_COLUMNS`): ``[layer, 1 if the layer stays else 0, attention units
    kept, query heads kept, MLP channels kept, layer score]``; a removed layer keeps nothing."""
    structure = pruning_state.structure
    rows = []
    for attn, mlp in zip(structure.attention, structure.mlp):
        kept = bool(pruning_state.layer_keep[attn.layer_idx])
        units = int(pruning_state.keep[attn.name].sum()) if kept else 0
        channels = int(pruning_state.keep[mlp.name].sum()) if kept else 0
        rows.append([attn.layer_idx, int(kept), units, units * attn.heads_per_unit, channels,
                     float(pruning_state.layer_scores[attn.layer_idx])])
    return rows


def mask_heatmap(pruning_state):
    """A matplotlib figure of the keep-masks: attention units and MLP channels (x) by layer (y),
    kept = dark. Returns the figure (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: training nodes have no display
    import matplotlib.pyplot as plt

    structure = pruning_state.structure
    layer_keep = pruning_state.layer_keep.float()[:, None]  # a removed layer's row is empty
    attn = torch.stack([pruning_state.keep[g.name] for g in structure.attention]).float() * layer_keep  # [layers, units]
    mlp = torch.stack([pruning_state.keep[g.name] for g in structure.mlp]).float() * layer_keep  # [layers, channels]
    height = max(2.0, 0.25 * structure.num_layers + 1.0)
    fig, (ax_a, ax_m) = plt.subplots(1, 2, figsize=(10, height), gridspec_kw={"width_ratios": [1, 4]})
    for ax, data, title in ((ax_a, attn, f"attention ({structure.attention_unit})"), (ax_m, mlp, "MLP channels")):
        ax.imshow(data.numpy(), aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{title}: {int(data.sum())}/{data.numel()} kept", fontsize=9)
        ax.set_xlabel("unit")
    ax_a.set_ylabel("layer")
    fig.tight_layout()
    return fig


def log_masks(run, pruning_state, commit: bool = True) -> None:
    """Log the per-layer table (``prune/layers``) and the mask heatmap (``prune/masks``) to ``run``."""
    import matplotlib.pyplot as plt
    import wandb

    table = wandb.Table(columns=LAYER_COLUMNS, data=layer_rows(pruning_state))
    fig = mask_heatmap(pruning_state)
    try:
        run.log({"prune/layers": table, "prune/masks": wandb.Image(fig)}, commit=commit)
    finally:
        plt.close(fig)


class WandbPruningCallback(TrainerCallback):
    """Logs the mask table and heatmap after every mask update and at the end of training.

    Runs after the pruning callback (added later), so it sees the updated masks. Uses
    ``commit=False`` during training so the images join the step's row that Trainer's
    ``WandbCallback`` commits with the loss instead of adding a step of their own.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self._logged_version = None

    def on_step_end(self, args, state, control, **kwargs):
        run = active_run()
        pruning_state = self.trainer.pruning_state
        if run is None or not state.is_world_process_zero or pruning_state.version == self._logged_version:
            return
        self._logged_version = pruning_state.version
        log_masks(run, pruning_state, commit=False)

    def on_train_end(self, args, state, control, **kwargs):
        run = active_run()
        if run is None or not state.is_world_process_zero:
            return
        log_masks(run, self.trainer.pruning_state, commit=True)
        run.summary.update({f"prune/final_{k.split('/', 1)[1]}": v for k, v in self.trainer.pruning_metrics().items()})


def log_report_artifact(output_dir: str, report: dict) -> None:
    """Attach ``output_dir/pruning_report.json`` to the active run as a ``pruning-report`` artifact
    (metadata: the parameter counts). A no-op without an active run."""
    run = active_run()
    if run is None:
        return
    import wandb

    from .export import REPORT_NAME

    artifact = wandb.Artifact(f"pruning-report-{run.id}", type="pruning-report",
                              metadata={"parameters": report.get("parameters", {}),
                                        "config": report.get("config", {})})
    artifact.add_file(os.path.join(output_dir, REPORT_NAME))
    run.log_artifact(artifact)


def log_summary(metrics: dict) -> None:
    """Put run-level numbers (e.g. ``{"eval/perplexity": 21.3}``) into the active run's summary,
    where sweeps read their metric. A no-op without an active run."""
    run = active_run()
    if run is not None:
        run.summary.update(metrics)
