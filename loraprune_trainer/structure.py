"""Which rows and columns of which matrices form one prunable unit (an attention head group or an
MLP channel) in a LLaMA-family decoder layer.

A unit group is plain data. Walk through one case, SmolLM2-135M (hidden 576, 9 query heads over 3
key/value heads, head_dim 64, MLP 1536) with ``attention_unit="kv_group"``:

* attention: 3 units per layer. Unit ``g`` owns rows ``g*192:(g+1)*192`` of ``q_proj.weight``
  ([576, 576]: the three query heads that read key/value head ``g``), rows ``g*64:(g+1)*64`` of
  ``k_proj.weight`` and ``v_proj.weight`` ([192, 576]) and columns ``g*192:(g+1)*192`` of
  ``o_proj.weight`` ([576, 576]).
* MLP: 1536 units per layer. Channel ``c`` owns row ``c`` of ``gate_proj`` and ``up_proj``
  ([1536, 576]) and column ``c`` of ``down_proj`` ([576, 1536]).

Every member splits one dimension of a weight into ``num_units`` equal contiguous blocks, which is
what makes scoring (a reshape and a sum) and cutting (an index_select) simple.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# model_type -> nothing else needed: these share the Llama decoder layer layout
# (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, repeat_kv head order).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

ATTENTION_UNITS = ("kv_group", "query_head")

ATTENTION_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_PROJECTIONS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ALL_PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS

# Weight layout is [out_features, in_features]: dim 0 cuts output rows, dim 1 input columns.
ROWS, COLUMNS = 0, 1


class UnsupportedModelError(ValueError):
    """The model is not a LLaMA-family decoder that this library knows how to prune."""


@dataclass(frozen=True)
class GroupMember:
    """One weight that a unit group spans: ``module`` (path inside the decoder layer), the weight
    dimension it is cut along (``ROWS`` or ``COLUMNS``), and the block size per unit along it."""

    module: str
    dim: int
    unit_size: int


@dataclass
class UnitGroup:
    """All units of one kind in one decoder layer.

    ``num_units`` units, each spanning ``unit_size`` contiguous rows/columns of every member.
    ``kind`` is ``"attention"`` or ``"mlp"``. ``heads_per_unit`` is the number of query heads a
    unit removes (attention only; 0 for MLP). ``units_per_kv_group`` is the number of units that
    share one key/value head (``query_head`` units under GQA), 1 otherwise.
    """

    layer_idx: int
    kind: str
    num_units: int
    members: tuple[GroupMember, ...]
    heads_per_unit: int = 0
    units_per_kv_group: int = 1

    @property
    def name(self) -> str:
        return f"layers.{self.layer_idx}.{self.kind}"


@dataclass
class ModelStructure:
    """The prunable structure of a decoder-only model: one attention and one MLP group per layer.

    ``layers[i]`` is the ``nn.Module`` of decoder layer ``i`` inside the (possibly PEFT-wrapped)
    model, so ``layers[i].get_submodule(member.module)`` is the live projection.
    """

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    attention_unit: str
    layers: list[nn.Module] = field(repr=False)
    attention: list[UnitGroup] = field(repr=False)
    mlp: list[UnitGroup] = field(repr=False)

    @property
    def heads_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def groups(self) -> list[UnitGroup]:
        return [g for pair in zip(self.attention, self.mlp) for g in pair]

    def module(self, group: UnitGroup, member: GroupMember) -> nn.Module:
        return self.layers[group.layer_idx].get_submodule(member.module)

    def only_layers(self, keep) -> "ModelStructure":
        """The same structure with the groups of the layers where ``keep[layer]`` is false left out (removed
        decoder layers get no gradients, so criteria must not score them); ``layers`` stays whole, so
        indices keep their meaning."""
        from dataclasses import replace

        return replace(self, attention=[g for g in self.attention if bool(keep[g.layer_idx])],
                       mlp=[g for g in self.mlp if bool(keep[g.layer_idx])])


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel or DDP/FSDP wrapper (or the model itself)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module  # DistributedDataParallel
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def check_supported_config(config) -> None:
    """Raise :class:`UnsupportedModelError` naming what is missing, before any work starts."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"loraprune-trainer prunes LLaMA-family decoders ({', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"got model_type={model_type!r}. Its decoder layers must expose self_attn.{{q,k,v,o}}_proj and "
            "mlp.{gate,up,down}_proj with grouped-query head order."
        )
    for attr in ("num_attention_heads", "hidden_size", "intermediate_size", "num_hidden_layers"):
        if getattr(config, attr, None) is None:
            raise UnsupportedModelError(f"The model config has no `{attr}`; cannot discover prunable groups.")
    n_q = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    if n_q % n_kv != 0:
        raise UnsupportedModelError(f"num_attention_heads={n_q} is not a multiple of num_key_value_heads={n_kv}.")


def _find_decoder_layers(model: nn.Module) -> list[nn.Module]:
    base = _unwrap(model)
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if layers is None:
        raise UnsupportedModelError(
            f"Could not find decoder layers at `model.layers` in {type(base).__name__}; "
            "pass a *ForCausalLM model of a supported family."
        )
    return list(layers)


def discover_structure(model: nn.Module, attention_unit: str = "kv_group") -> ModelStructure:
    """Find every prunable group of a LLaMA-family causal LM (plain, PEFT-wrapped or DDP-wrapped).

    Head sizes are read from the attention modules (``head_dim``) and checked against the
    projection shapes, never assumed.
    """
    if attention_unit not in ATTENTION_UNITS:
        raise ValueError(f"`attention_unit` must be one of {ATTENTION_UNITS}, got {attention_unit!r}")
    base = _unwrap(model)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    check_supported_config(config)
    layers = _find_decoder_layers(model)

    n_q = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    n_rep = n_q // n_kv
    first = layers[0]
    for path in ALL_PROJECTIONS:
        try:
            first.get_submodule(path)
        except AttributeError as err:
            raise UnsupportedModelError(f"Decoder layer {type(first).__name__} has no `{path}`.") from err
    head_dim = getattr(first.self_attn, "head_dim", None) or getattr(config, "head_dim", None)
    if head_dim is None:
        raise UnsupportedModelError("Could not read `head_dim` from the attention module or the config.")

    intermediate = config.intermediate_size
    # Under MHA both unit kinds are whole heads with their own key/value head.
    if attention_unit == "kv_group" or n_rep == 1:
        num_attn_units, heads_per_unit, units_per_kv = n_kv, n_rep, 1
        attn_members = (
            GroupMember("self_attn.q_proj", ROWS, n_rep * head_dim),
            GroupMember("self_attn.k_proj", ROWS, head_dim),
            GroupMember("self_attn.v_proj", ROWS, head_dim),
            GroupMember("self_attn.o_proj", COLUMNS, n_rep * head_dim),
        )
    else:  # query heads inside every KV group; key/value heads are shared, never cut
        num_attn_units, heads_per_unit, units_per_kv = n_q, 1, n_rep
        attn_members = (
            GroupMember("self_attn.q_proj", ROWS, head_dim),
            GroupMember("self_attn.o_proj", COLUMNS, head_dim),
        )
    mlp_members = (
        GroupMember("mlp.gate_proj", ROWS, 1),
        GroupMember("mlp.up_proj", ROWS, 1),
        GroupMember("mlp.down_proj", COLUMNS, 1),
    )

    expected = {
        "self_attn.q_proj": (n_q * head_dim, config.hidden_size),
        "self_attn.k_proj": (n_kv * head_dim, config.hidden_size),
        "self_attn.v_proj": (n_kv * head_dim, config.hidden_size),
        "self_attn.o_proj": (config.hidden_size, n_q * head_dim),
        "mlp.gate_proj": (intermediate, config.hidden_size),
        "mlp.up_proj": (intermediate, config.hidden_size),
        "mlp.down_proj": (config.hidden_size, intermediate),
    }
    attention, mlp = [], []
    for idx, layer in enumerate(layers):
        for path, (out_f, in_f) in expected.items():
            mod = layer.get_submodule(path)
            base_layer = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
            got = (getattr(base_layer, "out_features", None), getattr(base_layer, "in_features", None))
            if got != (out_f, in_f):
                raise UnsupportedModelError(
                    f"layers.{idx}.{path} has shape [out, in]={list(got)}, expected {[out_f, in_f]} from the "
                    "config; per-layer sizes (an already pruned model?) are not supported."
                )
        attention.append(UnitGroup(idx, "attention", num_attn_units, attn_members, heads_per_unit, units_per_kv))
        mlp.append(UnitGroup(idx, "mlp", intermediate, mlp_members, 0, 1))

    return ModelStructure(
        model_type=config.model_type,
        num_layers=len(layers),
        hidden_size=config.hidden_size,
        num_heads=n_q,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=intermediate,
        attention_unit="kv_group" if n_rep == 1 else attention_unit,
        layers=layers,
        attention=attention,
        mlp=mlp,
    )


def unit_parameters(structure: ModelStructure, group: UnitGroup) -> int:
    """Base-model parameters (weights and biases) that cutting one unit of ``group`` removes."""
    total = 0
    for member in group.members:
        module = structure.module(group, member)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        other = base.out_features if member.dim == COLUMNS else base.in_features
        total += member.unit_size * other
        if member.dim == ROWS and getattr(base, "bias", None) is not None:
            total += member.unit_size
    return total


def decoder_parameters(structure: ModelStructure) -> int:
    """Base-model parameters of all decoder layers (LoRA excluded; logical shapes of 8/4-bit weights)."""
    total = 0
    for layer in structure.layers:
        for name, p in layer.named_parameters():
            if "lora_" in name:
                continue
            total += int(torch.Size(p.quant_state.shape).numel()) if hasattr(p, "quant_state") else p.numel()
    return total


def lora_coverage_problems(target_modules, model_structure_paths=ALL_PROJECTIONS) -> list[str]:
    """Projection names a LoRA ``target_modules`` setting leaves without an adapter.

    ``target_modules`` is PEFT's field: ``"all-linear"``, a regex string, or a list of suffixes.
    """
    import re

    if target_modules is None:
        return [p.split(".")[-1] for p in model_structure_paths]
    if target_modules == "all-linear":
        return []
    missing = []
    for path in model_structure_paths:
        leaf = path.split(".")[-1]
        if isinstance(target_modules, str):
            ok = re.fullmatch(target_modules, f"model.layers.0.{path}") is not None
        else:
            ok = any(leaf == t or path.endswith(t) for t in target_modules)
        if not ok:
            missing.append(leaf)
    return missing
