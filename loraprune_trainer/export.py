"""Cut the pruned units out, merge LoRA, and write a checkpoint that stock transformers loads.

Also the reference format (LoRA adapter + masks), loadable back onto the original base model.
Every write goes to a temporary sibling folder that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from importlib.metadata import version

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from .criteria import dense_base_weight, lora_parts
from .depth import LAYERS, sliced_layer_config
from .masks import MaskHooks, PruningState
from .structure import ROWS, _unwrap, discover_structure

REPORT_NAME = "pruning_report.json"
MASKS_NAME = "pruning_masks.safetensors"
PRUNING_CONFIG_NAME = "pruning_config.json"
CONSUMERS_NAME = "compensated_consumers.safetensors"


class ExportError(RuntimeError):
    """The pruned model cannot be written in a form that stock transformers loads."""


@contextlib.contextmanager
def atomic_directory(output_dir: str):
    """Yield a temporary folder beside ``output_dir``; on success it replaces ``output_dir``
    (an existing one is swapped out only after the new one is complete), on failure it is deleted."""
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"Cannot write into {parent!r}: choose a writable output directory.")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(output_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=parent)
        os.rmdir(old)
        os.replace(output_dir, old)
    os.replace(tmp, output_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _unit_index(keep: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Row/column indices of the kept units: [num_kept * unit_size]."""
    kept = keep.nonzero().flatten()
    return (kept[:, None] * unit_size + torch.arange(unit_size)).flatten()


def merged_state_dict(model) -> tuple[dict[str, torch.Tensor], dict]:
    """Plain-transformers state dict of ``model`` with every LoRA adapter merged (``W + s B A``,
    float32) and PEFT's wrapper names removed; also returns ``{module name: module}`` of the model."""
    hf = _unwrap(model)
    state = {}
    for key, tensor in hf.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        key = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        state[key] = tensor
    modules = dict(hf.named_modules())
    for name, module in modules.items():
        parts = lora_parts(module)
        if parts is None:
            continue
        a, b, scaling = parts
        weight = dense_base_weight(module)
        with torch.no_grad():
            state[f"{name}.weight"] = weight + scaling * (b.detach().float() @ a.detach().float()).to(weight.device)
        for extra in [k for k in state if k.startswith(f"{name}.weight.") or k in (f"{name}.SCB", f"{name}.weight_format")]:
            del state[extra]  # quantization side tensors of the base weight
    return state, modules


def _pad_heads(tensor: torch.Tensor, dim: int, num_kv: int, have: int, want: int, head_dim: int) -> torch.Tensor:
    """Append zero heads at the end of every KV group along ``dim``: kv-major layout
    [num_kv * have * head_dim] -> [num_kv * want * head_dim]. Zero q rows and zero o columns make
    the extra heads contribute exactly nothing."""
    t = tensor.movedim(dim, 0)
    rest = t.shape[1:]
    t = t.reshape(num_kv, have * head_dim, *rest)
    pad = torch.zeros(num_kv, (want - have) * head_dim, *rest, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1).reshape(num_kv * want * head_dim, *rest).movedim(0, dim)


def _loadable_head_count(config, num_kv: int, heads_per_kv: int) -> tuple[int, object]:
    """Smallest heads-per-KV-group >= ``heads_per_kv`` whose config the model's config class accepts
    (LlamaConfig demands hidden_size % num_attention_heads == 0). Returns (heads_per_kv, config)."""
    errors = []
    for per_kv in range(heads_per_kv, config.hidden_size + 1):
        candidate = config.to_dict()
        candidate.update(num_attention_heads=num_kv * per_kv, num_key_value_heads=num_kv)
        try:
            return per_kv, type(config).from_dict(candidate)
        except (ValueError, TypeError, StrictDataclassError) as err:  # strict config validation
            errors.append(str(err))
    raise ExportError(
        f"{type(config).__name__} accepts no head count for {num_kv} KV heads with {heads_per_kv} query heads each "
        f"(last error: {errors[-1] if errors else 'none'}); the pruned model cannot be written loadably."
    )


def build_pruned_state(model, pruning_state: PruningState, dtype: torch.dtype | None = None):
    """Cut, merge and (if the config class demands it) pad: returns ``(state_dict, config, info)``."""
    structure = pruning_state.structure
    state, modules = merged_state_dict(model)
    hf = _unwrap(model)
    layer_names = {id(m): n for n, m in modules.items()}
    config = hf.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    before = {"model": _count(state, tied=tied), "decoder_layers": _count(state, ".layers.")}

    layer_keep = pruning_state.layer_keep
    kept_q_per_kv, kept_kv, kept_mlp = set(), set(), set()
    for name, group in pruning_state.groups.items():
        if not bool(layer_keep[group.layer_idx]):
            continue  # the whole layer goes below: its width masks do not matter
        keep = pruning_state.keep[name]
        prefix = layer_names[id(structure.layers[group.layer_idx])]
        if group.kind == "attention":
            if group.units_per_kv_group > 1:  # query heads within KV groups
                per_kv = keep.view(-1, group.units_per_kv_group).sum(dim=1)
                if len(set(per_kv.tolist())) != 1:
                    raise ExportError(f"{name}: uneven query heads per KV group {per_kv.tolist()}")
                kept_q_per_kv.add(int(per_kv[0]))
                kept_kv.add(structure.num_kv_heads)
            else:
                kept_q_per_kv.add(structure.heads_per_kv)
                kept_kv.add(int(keep.sum()))
        else:
            kept_mlp.add(int(keep.sum()))
        for member in group.members:
            index = _unit_index(keep, member.unit_size)
            key = f"{prefix}.{member.module}"
            state[f"{key}.weight"] = state[f"{key}.weight"].index_select(member.dim, index.to(state[f"{key}.weight"].device))
            if member.dim == ROWS and f"{key}.bias" in state:
                state[f"{key}.bias"] = state[f"{key}.bias"].index_select(0, index.to(state[f"{key}.bias"].device))
    if len(kept_q_per_kv) != 1 or len(kept_kv) != 1 or len(kept_mlp) != 1:
        raise ExportError(
            "Layers ended with different sizes (heads per KV group "
            f"{sorted(kept_q_per_kv)}, KV heads {sorted(kept_kv)}, MLP channels {sorted(kept_mlp)}); transformers "
            "configs hold one size for all layers."
        )
    q_per_kv, num_kv, intermediate = kept_q_per_kv.pop(), kept_kv.pop(), kept_mlp.pop()

    new = config.to_dict()
    new.pop("quantization_config", None)
    new.update(head_dim=structure.head_dim, intermediate_size=intermediate)
    kept_layers = layer_keep.nonzero().flatten().tolist()
    if len(kept_layers) < structure.num_layers:
        new = sliced_layer_config(new, kept_layers, structure.num_layers)
    bias_flags = _bias_flags(state, new)
    new.update(bias_flags)
    base_config = type(config).from_dict({**new, "num_attention_heads": structure.num_heads,
                                          "num_key_value_heads": structure.num_kv_heads})
    padded_per_kv, new_config = _loadable_head_count(base_config, num_kv, q_per_kv)
    if padded_per_kv != q_per_kv:
        for name, group in pruning_state.groups.items():
            if group.kind != "attention" or not bool(layer_keep[group.layer_idx]):
                continue
            prefix = layer_names[id(structure.layers[group.layer_idx])]
            for proj, dim in (("q_proj.weight", 0), ("q_proj.bias", 0), ("o_proj.weight", 1)):
                key = f"{prefix}.self_attn.{proj}"
                if key in state:
                    state[key] = _pad_heads(state[key], dim, num_kv, q_per_kv, padded_per_kv, structure.head_dim)
    if len(kept_layers) < structure.num_layers:
        prefixes = [layer_names[id(layer)] for layer in structure.layers]
        state = _drop_and_renumber_layers(state, prefixes, kept_layers)
    if bias_flags:
        _add_zero_biases(state, new_config)
    target_dtype = dtype or getattr(config, "dtype", None) or next(hf.parameters()).dtype
    if isinstance(target_dtype, str):
        target_dtype = getattr(torch, target_dtype)
    state = {k: (v.to(target_dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    new_config.dtype = target_dtype
    info = {
        "num_attention_heads": num_kv * q_per_kv,
        "num_key_value_heads": num_kv,
        "intermediate_size": intermediate,
        "zero_heads_added_for_config": num_kv * (padded_per_kv - q_per_kv),
        "num_hidden_layers": len(kept_layers),
        "kept_layers": kept_layers,
        "dtype": str(target_dtype).replace("torch.", ""),
        "parameters_before": before,
    }
    return state, new_config, info


def _drop_and_renumber_layers(state: dict[str, torch.Tensor], prefixes: list[str], kept: list[int]):
    """``state`` without the tensors of removed decoder layers, the kept ones renumbered 0..len(kept)-1.
    ``prefixes[i]`` is layer ``i``'s module name (``model.layers.i``); the layer list's own name is the
    part before the final index."""
    out = {}
    owner = {}
    for idx, prefix in enumerate(prefixes):
        owner[prefix + "."] = idx
    new_index = {old: new for new, old in enumerate(kept)}
    for key, tensor in state.items():
        match = next((p for p in owner if key.startswith(p)), None)
        if match is None:
            out[key] = tensor
            continue
        idx = owner[match]
        if idx not in new_index:
            continue  # a removed layer
        list_name = match[:-1].rpartition(".")[0]
        out[f"{list_name}.{new_index[idx]}.{key[len(match):]}"] = tensor
    return out


# Which config flag gives a Llama-family consumer a bias: it gives every projection of its kind one.
_BIAS_FLAGS = {".mlp.down_proj.bias": "mlp_bias", ".self_attn.o_proj.bias": "attention_bias"}


def _bias_flags(state: dict[str, torch.Tensor], config: dict) -> dict[str, bool]:
    """Config flags to switch on because a consumer carries a bias the config does not describe
    (``compensation="bias"`` adds one); :class:`ExportError` if the config class has no such flag."""
    flags = {}
    for suffix, flag in _BIAS_FLAGS.items():
        if not any(k.endswith(suffix) for k in state) or config.get(flag):
            continue
        if flag not in config:
            raise ExportError(f"The model has {suffix.strip('.')} biases but its config has no `{flag}` field: stock "
                              "transformers would drop them.")
        flags[flag] = True
    return flags


def _add_zero_biases(state: dict[str, torch.Tensor], config) -> None:
    """Zero biases for every bias the (flag-switched) config expects and ``state`` lacks: the
    sibling projections of a biased consumer. Zeros change no output."""
    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(config).state_dict()
    for key, tensor in expected.items():
        if key.endswith(".bias") and key not in state:
            weight = state[key[:-len("bias")] + "weight"]
            state[key] = torch.zeros(tensor.shape, dtype=weight.dtype, device=weight.device)


def _count(state: dict[str, torch.Tensor], prefix_filter=None, tied: bool = False) -> int:
    total = 0
    for key, t in state.items():
        if tied and key.endswith("lm_head.weight"):
            continue
        if prefix_filter is None or prefix_filter in key:
            total += t.numel()
    return total


def _verify_checkpoint(folder: str) -> None:
    """The folder's config loads and every tensor has the shape the model built from it expects."""
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    found = {}
    for file in os.listdir(folder):
        if file.endswith(".safetensors") and file != MASKS_NAME:
            with safe_open(os.path.join(folder, file), "pt") as f:
                found.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    for key, shape in found.items():
        if key in expected and expected[key] != shape:
            raise ExportError(f"Written tensor {key} has shape {shape}, the config implies {expected[key]}.")
    missing = [k for k in expected if k not in found and not k.endswith("lm_head.weight")]
    if missing:
        raise ExportError(f"Written checkpoint lacks {missing[:3]}")


def build_pruned_model(model, pruning_state: PruningState, dtype: torch.dtype | str | None = None):
    """The physically pruned, LoRA-merged model in memory (what :func:`save_pruned_model` writes)
    and the export info, with ``parameters_before`` and ``parameters_after`` counts."""
    hf = _unwrap(model)
    state, new_config, info = build_pruned_state(model, pruning_state, dtype)
    tied = bool(getattr(new_config, "tie_word_embeddings", False))
    info["parameters_after"] = {"model": _count(state, tied=tied), "decoder_layers": _count(state, ".layers.")}
    with torch.device("meta"):  # no random init of weights that are replaced right away
        pruned = AutoModelForCausalLM.from_config(new_config)
    if tied:
        state.pop("lm_head.weight", None)
    pruned.load_state_dict(state, strict=False, assign=True)
    leftover = [k for k, v in pruned.state_dict().items() if v.is_meta and not (tied and k.endswith("lm_head.weight"))]
    if leftover:
        raise ExportError(f"The pruned state lacks {leftover[:3]}")
    if tied:
        pruned.tie_weights()
    # Non-persistent buffers (rotary inv_freq) are not in the state dict: take them from the source.
    source_buffers = dict(hf.named_buffers())
    for name, buf in list(pruned.named_buffers()):
        if buf.is_meta and name in source_buffers:
            owner, _, leaf = name.rpartition(".")
            pruned.get_submodule(owner).register_buffer(leaf, source_buffers[name].clone(), persistent=False)
    if getattr(hf, "generation_config", None) is not None:
        pruned.generation_config = hf.generation_config
    return pruned, info


def save_pruned_model(model, pruning_state: PruningState, output_dir: str, tokenizer=None,
                      dtype: torch.dtype | str | None = None, settings: dict | None = None,
                      verify: bool = True) -> dict:
    """Write the compacted, LoRA-merged model to ``output_dir`` (atomically) with
    ``pruning_report.json``; returns the report."""
    pruned, info = build_pruned_model(model, pruning_state, dtype)

    report = {
        "format": "loraprune-trainer pruned model (LoRA merged, units physically removed)",
        "parameters": {
            "model_before": info["parameters_before"]["model"],
            "model_after": info["parameters_after"]["model"],
            "decoder_layers_before": info["parameters_before"]["decoder_layers"],
            "decoder_layers_after": info["parameters_after"]["decoder_layers"],
        },
        "config": {k: v for k, v in info.items() if not k.startswith("parameters_")},
        "layers": [],
        "settings": settings or {},
        "versions": {p: version(p) for p in ("torch", "transformers", "peft", "trl")},
    }
    p = report["parameters"]
    p["model_ratio"] = p["model_after"] / p["model_before"]
    p["decoder_layers_ratio"] = p["decoder_layers_after"] / p["decoder_layers_before"]
    structure = pruning_state.structure
    report["kept_layers"] = info["kept_layers"]
    report["removed_layers"] = [i for i in range(structure.num_layers) if i not in info["kept_layers"]]
    for attn, mlp in zip(structure.attention, structure.mlp):
        if attn.layer_idx not in info["kept_layers"]:
            continue
        kept_units = pruning_state.kept_indices(attn.name)
        report["layers"].append({
            "layer": attn.layer_idx,
            "exported_as": info["kept_layers"].index(attn.layer_idx),
            "attention_units_kept": kept_units.tolist(),
            "query_heads_kept": int(kept_units.numel() * attn.heads_per_unit),
            "mlp_channels_kept": int(pruning_state.keep[mlp.name].sum()),
        })

    with atomic_directory(output_dir) as tmp:
        pruned.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, REPORT_NAME), "w") as f:
            json.dump(report, f, indent=2, default=str)
        if verify:
            _verify_checkpoint(tmp)
    return report


def save_adapter_and_masks(model, pruning_state: PruningState, output_dir: str, settings: dict,
                           consumers: dict[str, torch.Tensor] | None = None) -> None:
    """The reference format: PEFT adapter (full base shapes) + boolean masks + pruning settings;
    with ``compensation``, also the refitted consumers' base weights/biases (``consumers``, from
    :func:`loraprune_trainer.compensation.consumer_tensors`), which the adapter does not hold."""
    structure = pruning_state.structure
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp)
        if consumers:
            save_file({k: v.contiguous() for k, v in consumers.items()}, os.path.join(tmp, CONSUMERS_NAME))
        masks = {f"keep.{n}": k.to(torch.uint8) for n, k in pruning_state.keep.items()}
        masks[f"keep.{LAYERS}"] = pruning_state.layer_keep.to(torch.uint8)
        save_file(masks, os.path.join(tmp, MASKS_NAME))
        with open(os.path.join(tmp, PRUNING_CONFIG_NAME), "w") as f:
            json.dump({"attention_unit": structure.attention_unit, "num_layers": structure.num_layers,
                       "settings": settings}, f, indent=2)


def load_masked_model(base_model, adapter_dir: str):
    """Load an adapter + masks folder onto the original base model.

    Returns ``(peft_model, pruning_state, hooks)``: the model computes what the pruned model
    computes (base weights refitted by ``compensation`` are restored from the folder); pass it with ``pruning_state`` to :func:`save_pruned_model` to compact it.
    """
    from peft import PeftModel

    with open(os.path.join(adapter_dir, PRUNING_CONFIG_NAME)) as f:
        meta = json.load(f)
    peft_model = PeftModel.from_pretrained(base_model, adapter_dir)
    structure = discover_structure(peft_model, meta["attention_unit"])
    state = PruningState(structure)
    masks = load_file(os.path.join(adapter_dir, MASKS_NAME))
    for name in state.groups:
        if masks[f"keep.{name}"].shape != state.keep[name].shape:
            raise ValueError(f"Mask {name} does not fit this base model: {tuple(masks[f'keep.{name}'].shape)} "
                             f"vs {tuple(state.keep[name].shape)}")
        state.keep[name].copy_(masks[f"keep.{name}"].bool())
    if f"keep.{LAYERS}" in masks:  # folders written before depth pruning have no layer mask: all kept
        if masks[f"keep.{LAYERS}"].shape != state.layer_keep.shape:
            raise ValueError(f"The layer mask has {masks[f'keep.{LAYERS}'].numel()} layers, this base model "
                             f"{state.layer_keep.numel()}.")
        state.layer_keep.copy_(masks[f"keep.{LAYERS}"].bool())
    state.version += 1
    consumers_file = os.path.join(adapter_dir, CONSUMERS_NAME)
    if os.path.isfile(consumers_file):  # compensation refitted these base weights: put them back
        from .compensation import load_consumer_tensors

        load_consumer_tensors(structure, load_file(consumers_file))
    return peft_model, state, MaskHooks(state, layers=not bool(state.layer_keep.all()))
