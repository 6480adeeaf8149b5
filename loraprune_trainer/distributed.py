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
* DeepSpeed, for the criteria that read parameter gradients (``lora``, ``vanilla``): Accelerate's
  DeepSpeed wrapper runs ``engine.step()`` inside ``accelerator.backward`` and the engine consumes
  and zeroes the gradients there, before any Trainer callback runs; ``param.grad`` is also not the
  gradient under ZeRO. ``taylor_gate`` (gate gradients: plain tensors outside the engine, all-reduced
  by the criterion), ``wanda``, ``magnitude`` and ``random`` run under ZeRO-1/2; ZeRO-3 is refused
  (it partitions the weights the export and weight criteria read whole), as is ``compensation``.
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
        check_deepspeed(trainer)
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


# Criteria that read no parameter gradient: gate gradients (plain tensors the engine never touches), input
# activations, or the weights themselves (whole on every rank under ZeRO-1/2).
DEEPSPEED_CRITERIA = ("taylor_gate", "wanda", "magnitude", "random")


def check_deepspeed(trainer) -> None:
    """What runs under DeepSpeed ZeRO-1/2 and what is refused, criterion by criterion (before training)."""
    args = trainer.args
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None)
    if stage is not None and stage >= 3:
        raise UnsupportedBackendError(
            "LoRAPrune does not run under DeepSpeed ZeRO-3: it partitions the frozen base weights and LoRA matrices "
            "across ranks, which the export (cut + merge) and the weight-based criteria read whole. Use ZeRO-2 "
            "(accelerate_configs/deepspeed_zero2.yaml) with `pruning_criterion=\"taylor_gate\"`, or FSDP2 "
            "(accelerate_configs/fsdp2.yaml) to shard the base model.")
    if args.pruning_criterion not in DEEPSPEED_CRITERIA:
        raise UnsupportedBackendError(
            f"`pruning_criterion={args.pruning_criterion!r}` does not run under DeepSpeed: it reads the LoRA (or base) "
            "parameters' gradients, and Accelerate steps the DeepSpeed engine inside `accelerator.backward`, which "
            "consumes and zeroes them (partitioned under ZeRO) before the pruning callback runs. Use "
            f"`pruning_criterion=\"taylor_gate\"` (its gates are not parameters; one of {DEEPSPEED_CRITERIA}), or "
            "DDP (accelerate_configs/multi_gpu.yaml) / FSDP2 (accelerate_configs/fsdp2.yaml) for the paper's `lora`.")
    if args.compensation != "none":
        raise UnsupportedBackendError(
            f"`compensation={args.compensation!r}` is not supported under DeepSpeed: the refit writes into frozen "
            "base weights, which the engine holds (and may cast or partition) itself. Use DDP, or "
            "`compensation=\"none\"`.")


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
