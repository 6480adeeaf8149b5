"""One-shot pruning: score once on calibration text, prune to the target in one go, cut the
units out, then (optionally) recover with a plain LoRA fine-tune of the compact model.

This is the "prune, then fine-tune" baseline that LoRAPrune's "prune while fine-tuning" is
compared against at an equal number of training tokens (same dataset, steps, batch and
``max_length`` for both). Any criterion of :data:`~loraprune_trainer.criteria.CRITERIA` works:

* ``lora``: one backward pass (gradients summed over the calibration batches) through a freshly
  initialised LoRA adapter. ``lora_B`` starts at zero, so ``gA = 0`` and Eq. 7-9 reduce to
  ``G = gB A``; ``gB`` is not zero, so the scores are informative.
* ``vanilla``: the same backward pass with the base weights' true gradients.
* ``taylor_gate``: the same backward pass; per-unit gate gradients summed over all batches.
* ``wanda``: forward passes only (activation norms); ``magnitude``/``random``: no data at all.

``compensation="lstsq"`` / ``"bias"`` refits the consumers of the removed units before the cut
(:mod:`loraprune_trainer.compensation`), with input moments from one more forward pass over the
calibration batches through the unpruned model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .compensation import (COMPENSATIONS, MomentAccumulator, check_bias_supported, compensate, consumer,
                           consumer_name, consumer_tensors, ensure_bias, load_consumer_tensors)
from .criteria import build_criterion
from .criteria.common import base_linear
from .depth import BlockInfluenceScorer, LayerGateScorer, build_layer_scorer, final_layer_count
from .masks import PruningState
from .schedule import final_prune_count
from .structure import _unwrap, discover_structure


@dataclass
class OneShotResult:
    """``model``: the compact model (units removed; plain transformers, no adapter).
    ``pruning_state``: masks and scores on the *original* model's unit indices.
    ``report``: parameter counts, unit counts, criterion and calibration settings."""

    model: nn.Module
    pruning_state: PruningState
    report: dict = field(default_factory=dict)


def default_lora_config(r: int = 8, alpha: int = 16, dropout: float = 0.05):
    """LoRA on all seven projections, the paper's r = 8, alpha = 16 (dropout 0.05 for training)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")


def calibration_batches(tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 4) -> list[dict]:
    """Tokenize ``texts`` (one sample each, truncated to ``max_length``) into padded batches:
    ``input_ids``/``attention_mask``: LongTensor[B, T], ``labels``: [B, T] with -100 on padding."""
    if not texts:
        raise ValueError("`texts` is empty: pass at least one calibration sample.")
    if tokenizer.pad_token is None:
        raise ValueError("The tokenizer has no pad token: set `tokenizer.pad_token = tokenizer.eos_token`.")
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], max_length=max_length, truncation=True, padding=True,
                        return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return batches


def _score(peft_model, structure, criterion, batches, layer_scorer=None, state=None):
    """Width scores ``{group: [num_units]}`` and, with ``layer_scorer``, layer scores ``[num_layers]`` (else
    ``None``) from one pass over ``batches`` (with a backward where any of them needs gradients)."""
    needs_data, needs_grad = criterion.needs_data, criterion.needs_gradients
    if isinstance(layer_scorer, (LayerGateScorer, BlockInfluenceScorer)):
        needs_data = True
        needs_grad = needs_grad or isinstance(layer_scorer, LayerGateScorer)
    criterion.attach(structure, peft_model)
    if layer_scorer is not None:
        layer_scorer.attach(structure, accept=lambda: True, state=state)  # every calibration forward counts
    device = next(peft_model.parameters()).device
    was_training = peft_model.training
    peft_model.train()  # Wanda counts training-mode forwards only; LLaMA has no dropout besides LoRA's
    try:
        peft_model.zero_grad(set_to_none=True)
        if needs_data:
            for b in batches:
                b = {k: v.to(device) for k, v in b.items()}
                if needs_grad:
                    (peft_model(**b).loss / len(batches)).backward()
                else:
                    with torch.no_grad():
                        peft_model(**b)
        scores = criterion.score(structure)
        layer_scores = layer_scorer.score() if layer_scorer is not None else None
    finally:
        peft_model.zero_grad(set_to_none=True)
        criterion.detach()
        if layer_scorer is not None:
            layer_scorer.detach()
        peft_model.train(was_training)
    return scores, layer_scores



def compact_model(model: nn.Module, pruning_state: PruningState, dtype: torch.dtype | None = None) -> tuple[nn.Module, dict]:
    """The physically pruned, LoRA-merged model in memory (what ``save_pruned_model`` would write),
    and the export info (head/channel counts, parameters before)."""
    from .export import build_pruned_model

    hf = _unwrap(model)
    pruned, info = build_pruned_model(model, pruning_state, dtype)
    return pruned.to(next(hf.parameters()).device).eval(), info


def oneshot_scores(model: nn.Module, tokenizer, calibration_texts: list[str] | None = None, criterion: str = "lora",
                   attention_unit: str = "kv_group", max_length: int = 128, batch_size: int = 4,
                   score_form: str = "square", normalize_scores: bool = False, seed: int = 0,
                   lora_config=None, layer_criterion: str | None = None) -> "ScoredModel":
    """Score every unit of ``model`` once with ``criterion``; nothing is pruned yet.
    With ``layer_criterion`` (:data:`~loraprune_trainer.depth.LAYER_CRITERIA`) the decoder layers are scored
    too, in the same pass (``.state.layer_scores``: Tensor[num_layers]).

    ``model`` is a plain transformers causal LM; a fresh LoRA adapter (``lora_config``, default
    :func:`default_lora_config` with dropout 0 so scoring is deterministic) is injected for scoring.
    Returns a :class:`ScoredModel`: ``.state.scores[group.name]`` is Tensor[num_units], every mask
    is still all-kept; call ``.release()`` to strip the adapter again (:func:`oneshot_prune` does
    all of it).
    ``calibration_texts``: the samples (e.g. N documents of C4); needed by lora/vanilla/wanda.
    """
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError("Pass the base model, not a PeftModel: one-shot scoring injects (and removes) its own "
                         "fresh LoRA adapter.")
    crit = build_criterion(criterion, score_form, normalize_scores)
    if hasattr(crit, "generator"):
        crit.generator.manual_seed(seed)
    layer_scorer = build_layer_scorer(layer_criterion, score_form) if layer_criterion else None
    needs_data = crit.needs_data or isinstance(layer_scorer, (LayerGateScorer, BlockInfluenceScorer))
    if needs_data and not calibration_texts:
        which = f"`{criterion}` criterion" if crit.needs_data else f"`{layer_criterion}` layer criterion"
        raise ValueError(f"The {which} needs calibration samples: pass `calibration_texts`.")
    batches = calibration_batches(tokenizer, calibration_texts, max_length, batch_size) if needs_data else []

    if lora_config is None:
        lora_config = default_lora_config(dropout=0.0)
    torch.manual_seed(seed)  # LoRA A's initialisation
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, lora_config)
    scored = ScoredModel(None, peft_model, requires_grad)
    try:
        structure = discover_structure(peft_model, attention_unit)
        state = PruningState(structure)
        scores, layer_scores = _score(peft_model, structure, crit, batches, layer_scorer, state)
    except BaseException:
        scored.release()
        raise
    scored.state = state
    scored.state.update_scores(scores, ema_lambda=0.0)  # lambda 0: the state holds exactly these scores
    if layer_scores is not None:
        scored.state.update_layer_scores(layer_scores, ema_lambda=0.0)
    return scored


@dataclass
class ScoredModel:
    """``state``: scores (and still-empty masks) of ``peft_model``, the caller's model with the
    scoring adapter injected; ``requires_grad``: the caller's flags, restored by :meth:`release`."""

    state: PruningState | None
    peft_model: nn.Module
    requires_grad: dict[str, bool]

    def release(self) -> nn.Module:
        """Strip the scoring adapter and restore ``requires_grad``: returns the caller's model as it
        was (the base weights were never changed)."""
        restored = self.peft_model.unload()
        for n, p in restored.named_parameters():
            p.requires_grad_(self.requires_grad.get(n, p.requires_grad))
        return restored


def prune_by_scores(state: PruningState, attention_ratio: float, mlp_ratio: float,
                    layer_ratio: float = 0.0, width_multiple: int = 8) -> dict[str, int]:
    """Grow every mask of ``state`` to the target in one go (lowest scores first, evenly over KV
    groups where units share them; ``layer_ratio`` of the decoder layers by ``state.layer_scores``;
    MLP channels kept rounded down to a multiple of ``width_multiple``, as the trainer does);
    returns ``{group name: units pruned}``."""
    counts = {}
    for name, group in state.groups.items():
        counts[name] = final_prune_count(group, attention_ratio if group.kind == "attention" else mlp_ratio,
                                         width_multiple)
        state.prune_to(name, counts[name])
    if layer_ratio:
        state.prune_layers_to(final_layer_count(state.structure.num_layers, layer_ratio))
    return counts


def oneshot_prune(model: nn.Module, tokenizer, calibration_texts: list[str] | None = None, criterion: str = "lora",
                  pruning_ratio: float = 0.5, attention_ratio: float | None = None, mlp_ratio: float | None = None,
                  attention_unit: str = "kv_group", max_length: int = 128, batch_size: int = 4,
                  score_form: str = "square", normalize_scores: bool = False, seed: int = 0,
                  lora_config=None, compensation: str = "none", compensation_lambda: float = 0.1,
                  layer_ratio: float = 0.0, layer_criterion: str = "taylor_gate",
                  width_multiple: int = 8) -> OneShotResult:
    """Score ``model`` once with ``criterion`` (:func:`oneshot_scores`), prune to the target and
    return the compact pruned model. ``model`` is left as it was (same weights, no adapter).
    Ratios are per layer, rounded exactly as the trainer rounds them. ``layer_ratio``: the share of
    whole decoder layers removed as well, chosen by ``layer_criterion`` (as in the trainer's
    ``layer_pruning_ratio`` / ``layer_criterion``). ``width_multiple``: the MLP channels every layer
    keeps are rounded down to a multiple of it (the trainer's ``width_multiple``; 1 keeps exact counts).

    ``compensation`` (``"none"``, ``"lstsq"``, ``"bias"``) and ``compensation_lambda``: as in
    :class:`~loraprune_trainer.config.LoRAPruneConfig`; the statistics come from the calibration
    texts (needed then, whatever the criterion), through the dense model.
    """
    if compensation not in COMPENSATIONS:
        raise ValueError(f"`compensation` must be one of {COMPENSATIONS}, got {compensation!r}")
    if not 0.0 <= compensation_lambda < float("inf"):
        raise ValueError(f"`compensation_lambda` must be a finite number >= 0, got {compensation_lambda!r}")
    if compensation != "none" and not calibration_texts:
        raise ValueError(f"`compensation={compensation!r}` takes its statistics from calibration samples: pass "
                         "`calibration_texts`.")
    attn_ratio = pruning_ratio if attention_ratio is None else attention_ratio
    mlp_r = pruning_ratio if mlp_ratio is None else mlp_ratio
    if not (isinstance(width_multiple, int) and width_multiple >= 1):
        raise ValueError(f"`width_multiple` must be an integer >= 1, got {width_multiple!r}")
    for name, value in (("pruning_ratio", pruning_ratio), ("attention_ratio", attn_ratio), ("mlp_ratio", mlp_r),
                        ("layer_ratio", layer_ratio)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"`{name}` must be in [0, 1), got {value}")
    if layer_ratio:
        num_layers = getattr(_unwrap(model).config, "num_hidden_layers", None)
        if num_layers:
            final_layer_count(num_layers, layer_ratio)  # at least one layer must stay: fail before scoring
    scored = oneshot_scores(model, tokenizer, calibration_texts, criterion, attention_unit, max_length, batch_size,
                            score_form, normalize_scores, seed, lora_config,
                            layer_criterion=layer_criterion if layer_ratio else None)
    state = scored.state
    records, undo = [], None
    try:
        structure = state.structure
        before = {n: k.clone() for n, k in state.keep.items()}
        counts = prune_by_scores(state, attn_ratio, mlp_r, layer_ratio, width_multiple)
        if compensation != "none":
            undo = {}
            records = _compensate_calibrated(scored.peft_model, structure, before, state.keep, compensation,
                                             compensation_lambda, calibration_batches(
                                                 tokenizer, calibration_texts, max_length, batch_size), undo)
        pruned, info = compact_model(scored.peft_model, state)
    finally:
        if undo:
            _undo_compensation(structure, undo)
        restored = scored.release()
    state.structure = discover_structure(restored, attention_unit)  # point at the caller's model, not PEFT's

    params_after = sum(p.numel() for p in pruned.parameters())
    report = {
        "criterion": criterion,
        "attention_unit": structure.attention_unit,
        "attention_ratio": attn_ratio,
        "mlp_ratio": mlp_r,
        "calibration_samples": len(calibration_texts or []) if build_criterion(criterion).needs_data else 0,
        "calibration_max_length": max_length,
        "units_pruned_per_layer": {"attention": counts[structure.attention[0].name],
                                   "mlp": counts[structure.mlp[0].name]},
        "parameters_before": info["parameters_before"]["model"],
        "parameters_after": params_after,
        "num_attention_heads": info["num_attention_heads"],
        "num_key_value_heads": info["num_key_value_heads"],
        "intermediate_size": info["intermediate_size"],
        "layer_ratio": layer_ratio,
        "layer_criterion": layer_criterion if layer_ratio else None,
        "width_multiple": width_multiple,
        "kept_layers": info["kept_layers"],
        "compensation": compensation,
        "compensation_lambda": compensation_lambda if compensation == "lstsq" else None,
        "compensation_history": records,
    }
    return OneShotResult(pruned, state, report)


@torch.no_grad()
def _compensate_calibrated(peft_model, structure, before, after, method, ridge, batches, undo) -> list[dict]:
    """Moments of the changed consumers' inputs over ``batches`` (dense model), then the refit.
    ``undo`` receives what :func:`_undo_compensation` needs to give the caller its weights back."""
    groups = [g for g in structure.groups() if bool((before[g.name] & ~after[g.name]).any())]
    if method == "bias":
        config = _unwrap(peft_model).config
        check_bias_supported(config.get_text_config() if hasattr(config, "get_text_config") else config, structure,
                             sorted({g.kind for g in groups}))
    names = {consumer_name(g): consumer(structure, g) for g in groups}
    undo["tensors"] = consumer_tensors(structure, names)
    undo["added_bias"] = [n for n, m in names.items() if method == "bias" and ensure_bias(m)]
    accumulator = MomentAccumulator(peft_model, second_moments=method == "lstsq")
    device = next(peft_model.parameters()).device
    was_training = peft_model.training
    peft_model.eval()
    try:
        accumulator.watch(names)
        for b in batches:
            peft_model(**{k: v.to(device) for k, v in b.items() if k != "labels"})
        return compensate(structure, before, after, accumulator.moments, method, ridge)
    finally:
        accumulator.remove()
        peft_model.train(was_training)


def _undo_compensation(structure, undo) -> None:
    """Put back the caller's consumer weights and drop biases the refit added."""
    load_consumer_tensors(structure, {k: v for k, v in undo["tensors"].items()})
    groups = {consumer_name(g): g for g in structure.groups()}
    for name in undo.get("added_bias", []):
        base_linear(consumer(structure, groups[name])).bias = None


def finetune_compact(model: nn.Module, tokenizer, train_dataset, args, lora_config=None, merge: bool = True):
    """LoRA fine-tune the compact model with a plain ``trl.SFTTrainer`` (``args``: an ``SFTConfig``;
    use the iterative run's steps, batch and ``max_length`` for an equal-token comparison).

    Returns ``(model, trainer)``: the model with LoRA merged (``merge=True``) or the PeftModel."""
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                         peft_config=lora_config or default_lora_config())
    trainer.train()
    tuned = trainer.model.merge_and_unload() if merge else trainer.model
    return tuned, trainer
