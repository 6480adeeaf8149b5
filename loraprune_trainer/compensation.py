"""Compensation: at a mask update, refit what the removed units fed (issue 16).

A unit's removal zeroes its slice of the input of its *consumer*: ``down_proj`` for an MLP channel,
``o_proj`` for an attention unit (see :mod:`loraprune_trainer.masks`). Instead of leaving LoRA to
relearn what those inputs carried, the consumer is refitted so that its output on recent inputs
changes as little as possible.

Notation, for one consumer with merged weight ``W' = W + s B A``: ``[out, in]`` and input
``x: [in]`` (one token):

* ``C = E[x x^T]``: ``[in, in]`` and ``mu = E[x]``: ``[in]``, float32, over the tokens of the last
  few micro-batches before the update, while the units being removed were still alive;
* ``K``: input columns that stay, ``P``: columns of the units removed at *this* update. Columns
  removed earlier are already zero in every input and take no part.

``lstsq`` (ThiNet / He et al. 2017, with a ridge)::

    Delta = W'_P C_PK (C_KK + lambda I)^-1          [out, |K|],   W_K <- W_K + Delta

the minimiser of ``E||W'_P x_P - Delta x_K||^2 + lambda ||Delta||_F^2``, i.e. the kept columns
take over the part of the removed columns' contribution that the kept inputs predict linearly.
``lambda = compensation_lambda * mean(diag(C_KK))`` makes the ridge scale-free.

``bias`` (FLAP, An et al. 2024)::

    b <- b + W'_P mu_P                               [out]

the removed contribution's mean, added as a bias. Both deltas go into the frozen *base* weight
(bias) under ``no_grad``; LoRA keeps training on top, and the masked model still equals the
physically pruned one because the export merges the (refitted) base weight exactly as before.

Cost (``d`` hidden size, ``d_ff`` MLP size, ``d_a = n_q * head_dim``, ``L`` layers, ``N =
compensation_batches``), ``lstsq``:

* memory, only during a window (the ``N`` micro-batches before an update, for the consumers that
  update shrinks): float32 ``[d_ff, d_ff] + [d_a, d_a]`` per layer, i.e. ``4 L (d_ff^2 + d_a^2)``
  bytes: 0.32 GB for SmolLM2-135M, 28 GB for Llama-3-8B (``d_ff`` = 14336: 822 MB per layer),
  which is where it stops being affordable next to the model on one GPU;
* time per token in a window: ``2 (d_ff^2 + d_a^2)`` flops per layer for ``x^T x``, against the
  layer's own forward of about ``2 (3 d d_ff + 2 d d_a + 2 d d_kv)``: comparable for Llama shapes
  (SmolLM2-135M: 5.4 vs 7.1 Mflop, so about +25% on a window micro-batch's forward + backward);
  outside windows nothing but a counter per micro-batch;
* per update and layer: a Cholesky solve of ``|K|^3 / 3`` plus ``O(|K|^2 d + |K| |P| d)`` flops, in
  float32 on the consumer's device.

``bias`` needs only ``sum x`` (``[in]`` per consumer) and ``O(in)`` per token. A checkpoint holds the
refitted consumers' base tensors (``d (d_a + d_ff)`` per layer, in the base dtype) and, if it falls
inside a window, that window's sums.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .criteria.common import base_linear, merged_weight
from .structure import COLUMNS, ModelStructure, UnitGroup

COMPENSATIONS = ("none", "bias", "lstsq")

# Config flag of a Llama-family config that gives the consumer of each kind a bias (it gives every
# projection of that kind one; the export fills the others with zeros, which changes nothing).
BIAS_FLAGS = {"mlp": "mlp_bias", "attention": "attention_bias"}


# -- which module and which columns -----------------------------------------------------------------

def consumer_member(group: UnitGroup):
    """The member whose input columns the group's units own (``down_proj`` / ``o_proj``)."""
    (member,) = [m for m in group.members if m.dim == COLUMNS]
    return member


def consumer(structure: ModelStructure, group: UnitGroup) -> nn.Module:
    """The live (LoRA-wrapped) consumer module of ``group``."""
    return structure.module(group, consumer_member(group))


def consumer_name(group: UnitGroup) -> str:
    """``layers.{i}.mlp.down_proj`` / ``layers.{i}.self_attn.o_proj``: keys of saved consumer tensors."""
    return f"layers.{group.layer_idx}.{consumer_member(group).module}"


def unit_columns(group: UnitGroup, units: torch.Tensor) -> torch.Tensor:
    """Input columns of the consumer owned by ``units`` (BoolTensor[num_units]): LongTensor[n * unit_size]."""
    return units.repeat_interleave(consumer_member(group).unit_size).nonzero().flatten()


# -- statistics ---------------------------------------------------------------------------------------

@dataclass
class Moments:
    """Running sums over tokens of one consumer's input: ``total = sum x`` float32 [in],
    ``outer = sum x x^T`` float32 [in, in] (``lstsq`` only, else ``None``), ``tokens`` float64 []."""

    total: torch.Tensor
    outer: torch.Tensor | None
    tokens: torch.Tensor

    def mean(self) -> torch.Tensor:
        return self.total / self.tokens.to(self.total.dtype)  # [in]

    def second(self) -> torch.Tensor:
        return self.outer / self.tokens.to(self.outer.dtype)  # [in, in]


class MomentAccumulator:
    """Forward hooks that sum consumer inputs: ``moments[name]`` for every module given to :meth:`watch`.

    A pre-hook on the top-level ``model`` tracks whether a model call is running (so layer forwards
    re-run by gradient checkpointing during backward, outside that call, never count twice), reads
    its ``attention_mask`` (padding tokens are left out when the mask matches the input's [B, T]),
    and asks ``accept(model)`` whether this call's tokens count (default: every call does).
    The consumer hooks run after the mask hooks (registered later): inputs of units removed earlier
    are zero there, the units that the coming update removes are still alive, which is what the
    refit needs.
    """

    def __init__(self, model: nn.Module, second_moments: bool, accept=None):
        self.second_moments = second_moments
        self.accept = accept
        self.moments: dict[str, Moments] = {}
        self._consumer_handles = []
        self._watched: tuple[str, ...] = ()
        self._depth = 0
        self._active = False
        self._token_mask = None
        self._model_handles = [model.register_forward_pre_hook(self._enter, with_kwargs=True),
                               model.register_forward_hook(self._leave, always_call=True)]

    @property
    def watched(self) -> tuple[str, ...]:
        return self._watched

    def watch(self, modules: dict[str, nn.Module]) -> None:
        """Sum the inputs of ``modules`` (name -> module) from now on; sums of other names are dropped."""
        self.unwatch()
        self.moments = {n: m for n, m in self.moments.items() if n in modules}
        for name, module in modules.items():
            self._consumer_handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        self._watched = tuple(modules)

    def unwatch(self) -> None:
        for h in self._consumer_handles:
            h.remove()
        self._consumer_handles, self._watched = [], ()

    def reset(self) -> None:
        self.moments = {}

    def remove(self) -> None:
        self.unwatch()
        for h in self._model_handles:
            h.remove()
        self._model_handles, self.moments = [], {}

    def _enter(self, module, args, kwargs):
        self._depth += 1
        if self._depth == 1:
            mask = kwargs.get("attention_mask")
            self._token_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            self._active = bool(self._consumer_handles) and (self.accept is None or self.accept(module))
        return None

    def _leave(self, module, args, output):
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self._token_mask, self._active = None, False

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args):
            if self._depth == 0 or not self._active:
                return None
            x = args[0].detach()
            mask = self._token_mask
            if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                x = x[mask.to(x.device).bool()]  # [tokens, in]: real tokens only
            self.add(name, x.reshape(-1, x.shape[-1]))
            return None

        return hook

    @torch.no_grad()
    def add(self, name: str, x: torch.Tensor) -> None:
        """Fold tokens ``x: [n, in]`` into ``moments[name]``."""
        x = x.float()
        total = x.sum(dim=0)  # [in]
        outer = x.T @ x if self.second_moments else None  # [in, in]
        tokens = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
        m = self.moments.get(name)
        if m is None:
            self.moments[name] = Moments(total, outer, tokens)
        else:
            m.total.add_(total)
            m.tokens.add_(tokens)
            if outer is not None:
                m.outer.add_(outer)

    # -- checkpoints: a window can span a checkpoint, so its partial sums travel with it --------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in self.moments.items():
            out[f"moments.{name}.total"] = m.total.detach().cpu()
            out[f"moments.{name}.tokens"] = m.tokens.detach().cpu()
            if m.outer is not None:
                out[f"moments.{name}.outer"] = m.outer.detach().cpu()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], devices: dict[str, torch.device]) -> None:
        self.moments = {}
        for key in state:
            if key.startswith("moments.") and key.endswith(".total"):
                name = key[len("moments."):-len(".total")]
                dev = devices[name]
                outer = state.get(f"moments.{name}.outer")
                self.moments[name] = Moments(state[key].to(dev), outer.to(dev) if outer is not None else None,
                                             state[f"moments.{name}.tokens"].to(dev))


def all_reduce_moments(moments: dict[str, Moments]) -> None:
    """Sum every rank's moments in place (no-op in one process): each rank then refits identically."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for name in sorted(moments):  # the same order on every rank, so the collectives line up
        m = moments[name]
        for t in (m.total, m.tokens, m.outer):
            if t is not None:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)


# -- the math -----------------------------------------------------------------------------------------

@torch.no_grad()
def ridge_refit(weight: torch.Tensor, second: torch.Tensor, kept: torch.Tensor, pruned: torch.Tensor,
                ridge: float) -> tuple[torch.Tensor, float]:
    """``Delta = W'_P C_PK (C_KK + lambda I)^-1``: ``[out, |K|]``, and ``lambda``.

    ``weight``: ``W'`` float32 [out, in]; ``second``: ``C`` float32 [in, in]; ``kept``/``pruned``:
    LongTensor column indices ``K`` [k] and ``P`` [p]; ``ridge``: ``lambda / mean(diag(C_KK))``.
    Solved as ``(C_KK + lambda I) Delta^T = C_KP W'_P^T`` by Cholesky; if that matrix is not
    positive definite (``ridge = 0`` and linearly dependent kept inputs), by a minimum-norm
    least-squares solve in float64.
    """
    c_kk = second[kept][:, kept]  # [k, k]
    c_kp = second[kept][:, pruned]  # [k, p]
    lam = float(ridge * c_kk.diagonal().mean())
    a = c_kk + lam * torch.eye(kept.numel(), dtype=c_kk.dtype, device=c_kk.device)
    rhs = c_kp @ weight[:, pruned].T  # [k, out]
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs, chol)  # [k, out]
    else:
        solution = torch.linalg.lstsq(a.double().cpu(), rhs.double().cpu(), driver="gelsd").solution
        solution = solution.to(rhs.dtype).to(rhs.device)
    return solution.T.contiguous(), lam


@torch.no_grad()
def bias_shift(weight: torch.Tensor, mean: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """FLAP: ``W'_P mu_P``: [out], the mean of what the removed columns contributed."""
    return weight[:, pruned] @ mean[pruned]


@torch.no_grad()
def output_error(weight: torch.Tensor, second: torch.Tensor, kept: torch.Tensor, pruned: torch.Tensor,
                 delta: torch.Tensor) -> tuple[float, float]:
    """Mean squared output error per token of the cut, before and after the refit:
    ``(E||W'_P x_P||^2, E||W'_P x_P - Delta x_K||^2)``, both from ``C`` (``tr(A C A^T)`` forms)."""
    w_p = weight[:, pruned]  # [out, p]
    before = float(((w_p @ second[pruned][:, pruned]) * w_p).sum())
    cross = float(((w_p @ second[pruned][:, kept]) * delta).sum())
    quad = float(((delta @ second[kept][:, kept]) * delta).sum())
    return before, max(before - 2.0 * cross + quad, 0.0)


def ensure_bias(module: nn.Module) -> bool:
    """Give the base linear of ``module`` a zero, frozen bias if it has none; True if one was added."""
    base = base_linear(module)
    if getattr(base, "bias", None) is not None:
        return False
    weight = base.weight
    base.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                             requires_grad=False)
    return True


def check_bias_supported(config, structure: ModelStructure, kinds) -> None:
    """``bias`` needs every consumer of ``kinds`` to carry a bias that a stock config can describe."""
    fields = config.to_dict()
    for kind in kinds:
        groups = structure.attention if kind == "attention" else structure.mlp
        if all(getattr(base_linear(consumer(structure, g)), "bias", None) is not None for g in groups):
            continue
        flag = BIAS_FLAGS[kind]
        if flag not in fields:
            member = consumer_member(groups[0]).module
            raise ValueError(
                f"`compensation=\"bias\"` needs a bias on {member}, and {type(config).__name__} has no `{flag}` "
                f"field: the exported model would not load with stock `from_pretrained`. Use "
                f"`compensation=\"lstsq\"` (no bias needed)"
                + (", or prune no attention units (`attention_pruning_ratio=0`)" if kind == "attention" else "")
                + "."
            )


# -- one refit of every changed group --------------------------------------------------------------------

@torch.no_grad()
def compensate(structure: ModelStructure, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
               moments: dict[str, Moments], method: str, ridge: float) -> list[dict]:
    """Refit the consumer of every group that lost units between the keep-masks ``before`` and
    ``after`` (``{group name: BoolTensor[num_units]}``; groups absent from either are skipped), from ``moments`` keyed by :func:`consumer_name`.

    Writes into the base weight (``lstsq``) or bias (``bias``). Returns one record per refitted
    group: ``group``, ``pruned`` (units), ``tokens``; ``lstsq`` adds ``lambda`` and
    ``error_before``/``error_after`` (:func:`output_error`), ``bias`` the norm of the shift."""
    records = []
    for group in structure.groups():
        if group.name not in before or group.name not in after:
            continue  # not given: unchanged
        newly = before[group.name] & ~after[group.name]
        if not bool(newly.any()):
            continue
        name = consumer_name(group)
        m = moments.get(name)
        if m is None or float(m.tokens) == 0:
            warnings.warn(f"No inputs of {name} were recorded before this mask update: its cut is not compensated.",
                          stacklevel=2)
            continue
        module = consumer(structure, group)
        base = base_linear(module)
        kept = unit_columns(group, after[group.name]).to(base.weight.device)
        pruned = unit_columns(group, newly).to(base.weight.device)
        weight = merged_weight(module).to(base.weight.device)  # W' [out, in] float32
        record = {"group": group.name, "pruned": int(newly.sum()), "tokens": int(m.tokens)}
        if method == "lstsq":
            second = m.second().to(weight.device)
            delta, lam = ridge_refit(weight, second, kept, pruned, ridge)
            if not bool(torch.isfinite(delta).all()):
                warnings.warn(f"Non-finite refit of {name}: its cut is not compensated.", stacklevel=2)
                continue
            record["error_before"], record["error_after"] = output_error(weight, second, kept, pruned, delta=delta)
            record["lambda"] = lam
            base.weight.index_add_(1, kept, delta.to(base.weight.dtype))
        elif method == "bias":
            if base.bias is None:
                raise RuntimeError(f"{name} has no bias: `compensation=\"bias\"` adds one when the trainer is built.")
            shift = bias_shift(weight, m.mean().to(weight.device), pruned)
            record["shift_norm"] = float(shift.norm())
            base.bias.add_(shift.to(base.bias.dtype))
        else:
            raise ValueError(f"`compensation` must be one of {COMPENSATIONS}, got {method!r}")
        records.append(record)
    return records


def consumer_tensors(structure: ModelStructure, names) -> dict[str, torch.Tensor]:
    """The current base weight (and bias) of the consumers ``names``: what a checkpoint must hold,
    since PEFT checkpoints save only the adapter. ``{name.weight: [out, in], name.bias: [out]}``."""
    by_name = {consumer_name(g): consumer(structure, g) for g in structure.groups()}
    out = {}
    for name in sorted(names):
        base = base_linear(by_name[name])
        out[f"{name}.weight"] = base.weight.detach().to("cpu", copy=True).contiguous()
        if base.bias is not None:
            out[f"{name}.bias"] = base.bias.detach().to("cpu", copy=True).contiguous()
    return out


@torch.no_grad()
def load_consumer_tensors(structure: ModelStructure, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Copy saved consumer weights/biases (:func:`consumer_tensors`) into the live model; adds a
    bias where one was saved and the module has none. Returns the consumer names restored."""
    by_name = {consumer_name(g): consumer(structure, g) for g in structure.groups()}
    restored = set()
    for key, value in tensors.items():
        name, _, leaf = key.rpartition(".")
        if name not in by_name or leaf not in ("weight", "bias"):
            continue
        base = base_linear(by_name[name])
        if leaf == "bias":
            ensure_bias(by_name[name])
        target = getattr(base, leaf)
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"Saved {key} has shape {tuple(value.shape)}, the model's is {tuple(target.shape)}.")
        target.copy_(value.to(target.device, target.dtype))
        restored.add(name)
    return sorted(restored)
