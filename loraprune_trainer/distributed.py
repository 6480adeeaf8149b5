"""Multi-process training: which Accelerate backends can score LoRAPrune groups, and keeping the
pruning state identical on every rank.

Why the scores agree across ranks without any extra communication under DDP: the callback scores
in ``on_pre_optimizer_step``, after the last micro-batch's backward has all-reduced (averaged) the
LoRA gradients, so every rank holds the same ``A``, ``B``, ``gA``, ``gB`` and base weight and runs
the same float32 arithmetic. Under FSDP2 the LoRA parameters, their gradients and the base weights
are DTensor shards; :func:`full_tensor` all-gathers them one matrix at a time (every rank scores the
groups in the same order, so the collectives line up). As a safety net against non-deterministic
kernels, :func:`sync_pruning_state` broadcasts rank 0's masks and scores after every mask update
and reports how many mask entries disagreed.

Not supported, with an error before training (:func:`check_distributed_backend`):

* FSDP1 (``fsdp_version: 1``) flattens parameters into ``FlatParameter`` shards, so one LoRA
  matrix's gradient is not addressable on its own;
* DeepSpeed ZeRO: Accelerate's DeepSpeed wrapper runs ``engine.step()`` inside
  ``accelerator.backward`` and the engine zeroes the gradients there, before any Trainer callback
  runs; ``param.grad`` is also not the gradient under ZeRO.
"""

from __future__ import annotations

import warnings

import torch


class UnsupportedBackendError(RuntimeError):
    """The Accelerate backend hides the full LoRA gradients from the pruning criterion."""


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind ``t``: a DTensor shard (FSDP2) is all-gathered, anything else is returned.

    Collective under FSDP2: every rank must call it for the same tensors in the same order.
    """
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_distributed_backend(trainer) -> None:
    """Raise :class:`UnsupportedBackendError` where the criterion cannot see full LoRA gradients."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise UnsupportedBackendError(
            "LoRAPrune does not run under DeepSpeed: Accelerate steps the DeepSpeed engine inside "
            "`accelerator.backward`, which zeroes the LoRA gradients before the pruning callback can read them "
            "(and under ZeRO `param.grad` is partitioned). Use DDP (accelerate_configs/multi_gpu.yaml; LoRA states "
            "are small) or FSDP2 (accelerate_configs/fsdp2.yaml) to shard the frozen base model."
        )
    compensation = getattr(getattr(trainer, "args", None), "compensation", "none")
    if compensation != "none" and getattr(trainer, "is_fsdp_enabled", False):
        raise UnsupportedBackendError(
            f"`compensation={compensation!r}` is not supported under FSDP: the refit writes into base weights that "
            "FSDP shards across ranks, and each rank would need the whole refitted matrix scattered back into its "
            "shard. Use DDP (accelerate_configs/multi_gpu.yaml), or `compensation=\"none\"` under FSDP2."
        )
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
        version = getattr(plugin, "fsdp_version", 1)
        if version != 2:
            raise UnsupportedBackendError(
                f"LoRAPrune needs FSDP2 (fsdp_version: 2), got fsdp_version={version}: FSDP1 flattens LoRA matrices "
                "into FlatParameter shards, so the criterion cannot read one matrix's gradient. Set `fsdp_version: 2` "
                "in the accelerate config (see accelerate_configs/fsdp2.yaml)."
            )


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sync_pruning_state(pruning_state, device: torch.device | str = "cpu") -> int:
    """Overwrite every rank's masks and moving-average scores with rank 0's.

    Two broadcasts of ``sum(num_units) + num_layers`` elements (uint8 masks, float32 scores) on ``device`` (the
    process group's device: CUDA for NCCL). Returns the number of mask entries in which this rank
    differed from rank 0 before the broadcast (0 when the scores were deterministic); warns if any.
    A no-op returning 0 outside a multi-process run.
    """
    if _world() == 1:
        return 0
    dist = torch.distributed
    names = sorted(pruning_state.groups)
    sizes = [pruning_state.groups[n].num_units for n in names] + [pruning_state.layer_keep.numel()]
    # [sum(num_units) + num_layers]: the width masks, then the layer mask
    keep = torch.cat([pruning_state.keep[n].to(torch.uint8) for n in names]
                     + [pruning_state.layer_keep.to(torch.uint8)]).to(device)
    scores = torch.cat([pruning_state.scores[n] for n in names] + [pruning_state.layer_scores]).to(device)
    local = keep.clone()
    dist.broadcast(keep, src=0)
    dist.broadcast(scores, src=0)
    differing = int((keep != local).sum())
    if differing:
        warnings.warn(
            f"Rank {dist.get_rank()}: {differing} mask entries differed from rank 0 before synchronisation "
            "(non-deterministic scores); rank 0's masks are used.",
            stacklevel=2,
        )
    for name, k, s in zip(names + [None], keep.cpu().split(sizes), scores.cpu().split(sizes)):
        (pruning_state.keep[name] if name else pruning_state.layer_keep).copy_(k.bool())
        (pruning_state.scores[name] if name else pruning_state.layer_scores).copy_(s)
    pruning_state.version += 1  # cached mask tensors in the hooks must be rebuilt
    return differing
