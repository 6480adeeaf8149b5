"""Depth pruning: whole decoder layers as prunable units, scored while LoRA trains.

A removed layer is the identity: neither its attention output nor its MLP output is added to the
residual stream (``h + attn(h) -> h``, ``h + mlp(h) -> h``), which is exactly what deleting the
layer computes. :class:`~loraprune_trainer.masks.MaskHooks` applies the layer masks; the export
drops the layers and renumbers the rest.

Which layers go (lowest score first; scores are float32 ``[num_layers]``):

* ``taylor_gate``: a scalar gate ``m_l`` on both residual contributions of layer ``l`` (as if it
  multiplied them; :func:`~loraprune_trainer.criteria.taylor.gate_probe` computes only its gradient). At
  ``m = 1`` nothing changes, and ``-dL/dm_l`` is the first-order loss change of removing the layer
  (both paths, and the attention's effect on the MLP's input, through one scalar):

      dL/dm_l = sum over tokens of  a_l . dL/da_l + f_l . dL/df_l

  with ``a_l``, ``f_l`` the attention and MLP outputs ``[batch, seq, hidden]``. Summed over the
  step's micro-batches, squared (or ``abs``), then the moving average of every other unit; layers go
  along the same cubic schedule as heads and channels.
* ``block_influence`` (ShortGPT, Men et al. 2024): ``1 - mean cos(h_in, h_out)`` over the tokens of
  the training forwards before the first mask update; all layers go at that update (one-shot).
* ``last``: the layers just before the final one (the final layer is kept); all at the first update.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .structure import ModelStructure

LAYER_CRITERIA = ("taylor_gate", "block_influence", "last")
LAYERS = "layers"  # the name of the layer "group" in score dicts, masks files and checkpoints


def final_layer_count(num_layers: int, ratio: float) -> int:
    """Decoder layers to remove for ``layer_pruning_ratio`` (rounded half up); at least one layer stays."""
    count = int(math.floor(ratio * num_layers + 0.5))
    if count >= num_layers:
        raise ValueError(f"`layer_pruning_ratio`={ratio:g} removes {count} of {num_layers} decoder layers; at least "
                         "one must stay. Lower it.")
    return count


def scheduled_layer_count(final_count: int, progress: float, one_shot: bool) -> int:
    """Layers removed at a mask update with schedule ``progress`` in [0, 1]: the schedule's share of
    ``final_count``, or all of them from the first update on (``one_shot`` criteria)."""
    return final_count if one_shot else int(math.floor(progress * final_count + 0.5))


def layer_parameters(structure: ModelStructure, layer_idx: int) -> int:
    """Base-model parameters of decoder layer ``layer_idx`` (LoRA excluded; logical shapes of 8/4-bit
    weights): what removing the layer removes."""
    total = 0
    for name, p in structure.layers[layer_idx].named_parameters():
        if "lora_" in name:
            continue
        total += int(torch.Size(p.quant_state.shape).numel()) if hasattr(p, "quant_state") else p.numel()
    return total


def residual_branches(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The two modules whose outputs a LLaMA-family decoder layer adds to the residual stream."""
    return layer.self_attn, layer.mlp


def zero_output(output):
    """The module output with its (first) tensor filled with zeros: the branch adds nothing. A fill, not a
    product with 0, so that an inf or NaN in a removed layer cannot leak into the residual stream; and not a
    fresh zeros tensor, so the layer's LoRA parameters stay in the graph (with zero gradients), as DDP
    requires of every parameter that trains."""
    def fill(t):
        return t.masked_fill(torch.ones((), dtype=torch.bool, device=t.device), 0.0)

    if isinstance(output, tuple):
        return (fill(output[0]), *output[1:])
    return fill(output)


class LayerScorer:
    """Base class of the layer criteria. ``score()`` is called once per optimizer step (in
    ``on_pre_optimizer_step``) and returns float32 ``[num_layers]`` or ``None`` (nothing new);
    ``ema``: whether the scores go through the moving average (else they replace it);
    ``one_shot``: whether all layers go at the first mask update."""

    name = ""
    ema = True
    one_shot = False

    def attach(self, structure: ModelStructure, accept=None, state=None) -> None:
        """Install what the scorer needs on ``structure.layers``; ``accept()`` says whether the forward
        being run is a training forward to count (default: gradients enabled); ``state`` is the
        :class:`~loraprune_trainer.masks.PruningState` whose ``layer_stats`` hold running sums (so that
        checkpoints carry them)."""
        from .masks import PruningState

        self.structure = structure
        self.accept = accept or _training_forward
        self.state = state if state is not None else PruningState(structure)

    def detach(self) -> None:
        pass

    def score(self) -> torch.Tensor | None:
        raise NotImplementedError


def _training_forward(module: nn.Module | None = None) -> bool:
    return torch.is_grad_enabled() and (module is None or module.training)


class LayerGateScorer(LayerScorer):
    """``taylor_gate`` for layers: a float32 gate ``m: [num_layers]`` of ones (a leaf that requires grad,
    not a model parameter: it stays out of the optimizer, clipping, checkpoints and FSDP), put on each
    layer's attention and MLP outputs by forward hooks in training forwards with gradients, through
    :func:`~loraprune_trainer.criteria.taylor.gate_probe` (the outputs are unchanged; the gate gets
    the gradient of ``output * m`` at ``m = 1``)."""

    name = "taylor_gate"

    def __init__(self, score_form: str = "square", loss_scale_fn=None):
        self.score_form = score_form
        self.loss_scale_fn = loss_scale_fn
        self.gate: torch.Tensor | None = None
        self._handles = []

    def attach(self, structure, accept=None, state=None):
        super().attach(structure, accept, state)
        self.detach()
        device = next(structure.layers[0].parameters()).device
        self.gate = torch.ones(structure.num_layers, dtype=torch.float32, device=device, requires_grad=True)
        for idx, layer in enumerate(structure.layers):
            for branch in residual_branches(layer):
                self._handles.append(branch.register_forward_hook(self._hook(idx)))

    def _hook(self, idx: int):
        def hook(module, args, output):
            if not (module.training and torch.is_grad_enabled()):
                return None
            from .criteria.taylor import gate_probe

            if isinstance(output, tuple):
                return (gate_probe(output[0], self.gate[idx]), *output[1:])
            return gate_probe(output, self.gate[idx])

        return hook

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def gate_gradient(self) -> torch.Tensor | None:
        """``dL/dm`` since the last :meth:`score`, float32 ``[num_layers]``, averaged over processes and
        divided by the loss scale; ``None`` when no training backward ran."""
        from .criteria.taylor import _mean_over_processes

        if self.gate is None:
            raise RuntimeError("The layer gates are not attached: call `attach(structure)` first.")
        grad = self.gate.grad
        flat = torch.zeros_like(self.gate) if grad is None else grad.detach().clone()
        flat = _mean_over_processes(flat)  # every rank joins, even one whose micro-batch had no gradient
        if grad is None and not bool(flat.any()):
            return None
        if self.loss_scale_fn is not None:
            flat = flat / float(self.loss_scale_fn())
        return flat

    @torch.no_grad()
    def score(self):
        grad = self.gate_gradient()
        if self.gate is not None:
            self.gate.grad = None
        if grad is None:
            return None
        return (grad.square() if self.score_form == "square" else grad.abs()).float().cpu()


class BlockInfluenceScorer(LayerScorer):
    """ShortGPT's block influence ``1 - mean over tokens of cos(h_in, h_out)`` of every layer, from the
    training forwards seen so far (frozen by :meth:`freeze` at the first mask update). A layer that
    barely turns its input scores low and goes first."""

    name = "block_influence"
    ema = False
    one_shot = True

    def __init__(self):
        self._handles = []

    def attach(self, structure, accept=None, state=None):
        super().attach(structure, accept, state)
        self.detach()
        stats = self.state.layer_stats
        stats.setdefault("cos_sum", torch.zeros(structure.num_layers, dtype=torch.float64))  # sum of cos
        stats.setdefault("tokens", torch.zeros(structure.num_layers, dtype=torch.float64))  # tokens summed
        for idx, layer in enumerate(structure.layers):
            self._handles.append(layer.register_forward_hook(self._hook(idx), with_kwargs=True))

    @property
    def frozen(self) -> bool:
        """Once layers are removed the choice is made: no more statistics (also after a resume)."""
        return self.state.num_pruned_layers() > 0

    def _hook(self, idx: int):
        def hook(module, args, kwargs, output):
            if self.frozen or not module.training or not self.accept():
                return None
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():
                cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # [batch, seq]
                self.state.layer_stats["cos_sum"][idx] += float(cos.sum())
                self.state.layer_stats["tokens"][idx] += cos.numel()
            return None

        return hook

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def score(self):
        stats = self.state.layer_stats
        if self.frozen:
            self.detach()
            return None
        from .criteria.taylor import _mean_over_processes

        # Every rank joins the reduction each step (a collective), even before it has seen tokens.
        sums = _mean_over_processes(torch.stack([stats["cos_sum"], stats["tokens"]]))
        if not bool(sums[1].any()):
            return None
        return (1.0 - sums[0] / sums[1].clamp(min=1)).float()


class LastLayersScorer(LayerScorer):
    """"Prune the last layers": scores rise towards the front and the final layer is kept, so the
    layers just before the final one go first (a baseline of Gromov et al. 2024 / Lu et al. 2024)."""

    name = "last"
    ema = False
    one_shot = True

    def score(self):
        n = self.structure.num_layers
        scores = torch.arange(n, 0, -1, dtype=torch.float32)  # layer 0 highest
        scores[-1] = n + 1.0  # above every other layer (finite: the moving-average update refuses inf)
        return scores


def build_layer_scorer(name: str, score_form: str = "square") -> LayerScorer:
    if name == "taylor_gate":
        return LayerGateScorer(score_form)
    if name == "block_influence":
        return BlockInfluenceScorer()
    if name == "last":
        return LastLayersScorer()
    raise ValueError(f"`layer_criterion` must be one of {LAYER_CRITERIA}, got {name!r}")


def kept_layer_indices(pruning_state) -> list[int]:
    """Original indices of the decoder layers that stay."""
    return pruning_state.layer_keep.nonzero().flatten().tolist()


# Per-layer config entries besides `layer_types` that some config classes carry (sliced on export).
PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")


def sliced_layer_config(config: dict, kept: list[int], num_layers: int) -> dict:
    """The config dict of a model that keeps decoder layers ``kept`` (original indices, ascending) of
    ``num_layers``: ``num_hidden_layers``, every per-layer list, and Qwen's ``max_window_layers`` (layers at
    or above it use sliding-window attention; after renumbering, the kept layers below it)."""
    new = dict(config)
    new["num_hidden_layers"] = len(kept)
    for key, value in config.items():
        if key in PER_LAYER_CONFIG_LISTS and isinstance(value, (list, tuple)) and len(value) == num_layers:
            new[key] = [value[i] for i in kept]
    if isinstance(config.get("max_window_layers"), int):
        new["max_window_layers"] = sum(1 for i in kept if i < config["max_window_layers"])
    return new
