"""`LoRAPruneTrainer`: TRL's `SFTTrainer` that prunes heads and MLP channels while LoRA trains."""

from __future__ import annotations

import logging
import math
import os
import warnings

import torch
from transformers import AutoConfig
from trl import SFTTrainer

from .callback import CompensationCallback, LoRAPruneCallback, update_masks
from .compensation import check_bias_supported, consumer, ensure_bias
from .config import LoRAPruneConfig
from .criteria import build_criterion
from .distill import BackboneOutput, backbone_and_head, distill_sums, head_weights, teacher_mode
from .distributed import check_distributed_backend
from .masks import MaskHooks, PruningState
from .resume import (check_total_steps, load_compensation_checkpoint, load_pruning_checkpoint, resolve_checkpoint,
                     save_compensation_checkpoint, save_pruning_checkpoint)
from .depth import build_layer_scorer, final_layer_count, layer_parameters, scheduled_layer_count
from .schedule import PruningSchedule, UnreachableBudgetError, budget_prune_counts, final_prune_count
from .structure import (_unwrap, check_supported_config, decoder_parameters, discover_structure,
                        lora_coverage_problems, unit_parameters)

logger = logging.getLogger(__name__)


def _model_config(model, args):
    """The config of ``model`` (an instance or a Hub id / local path) without loading weights."""
    if isinstance(model, (str, os.PathLike)):
        init = dict(args.model_init_kwargs or {})
        kwargs = {k: init[k] for k in ("revision", "gguf_file", "trust_remote_code") if k in init}
        config = AutoConfig.from_pretrained(str(model), **kwargs)
    else:
        config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _preflight(model, args: LoRAPruneConfig, peft_config, train_dataset=None, formatting_func=None) -> None:
    """Every check that needs no weights, so bad input fails before data processing or training."""
    _check_output_dir(args)
    _check_dataset_columns(train_dataset, args, formatting_func)
    config = _model_config(model, args)
    check_supported_config(config)
    final_layer_count(config.num_hidden_layers, args.layer_pruning_ratio)  # at least one layer must stay
    existing = getattr(model, "peft_config", None) if not isinstance(model, (str, os.PathLike)) else None
    lora = peft_config if peft_config is not None else (next(iter(existing.values())) if existing else None)
    if lora is None:
        raise ValueError(
            "LoRAPrune scores units from LoRA gradients: pass `peft_config=LoraConfig(target_modules=\"all-linear\", "
            "task_type=\"CAUSAL_LM\")` (or a PeftModel with a LoRA adapter)."
        )
    if getattr(lora, "peft_type", None) is None or str(lora.peft_type.value if hasattr(lora.peft_type, "value")
                                                         else lora.peft_type) != "LORA":
        raise ValueError(f"LoRAPrune needs a LoRA adapter, got peft_type={getattr(lora, 'peft_type', None)}.")
    if getattr(lora, "use_dora", False):
        raise ValueError("DoRA adapters are not supported: set `use_dora=False`.")
    if args.pruning_criterion == "lora":
        missing = lora_coverage_problems(lora.target_modules)
        if missing:
            raise ValueError(
                f"LoRA does not target {missing}: the LoRA criterion needs an adapter on every projection a unit "
                "spans (q, k, v, o, gate, up, down). Use `target_modules=\"all-linear\"`."
            )
    if args.max_steps and args.max_steps > 0:
        _check_schedule(args, args.max_steps)


def _check_output_dir(args: LoRAPruneConfig) -> None:
    """``output_dir`` (or the nearest folder above it that exists) must be writable: checkpoints and
    the pruned model go there, and finding out at the first save wastes the run."""
    if not args.should_save:  # only the main process writes there
        return
    folder = os.path.abspath(args.output_dir)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(
            f"`output_dir`={args.output_dir!r} is not writable ({folder!r} is not a writable folder): checkpoints "
            "and the pruned model could not be saved. Choose a writable `output_dir`."
        )


# Columns SFTTrainer can train on without a `formatting_func`: language modelling, conversational,
# prompt-completion, and already tokenized data.
_SFT_COLUMN_SETS = (("messages",), ("prompt", "completion"), ("prompt",), ("input_ids",))


def _check_dataset_columns(dataset, args: LoRAPruneConfig, formatting_func=None) -> None:
    """The training dataset has a column SFTTrainer knows how to turn into tokens."""
    if dataset is None or formatting_func is not None or (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
        return
    datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
    for ds in datasets:
        columns = getattr(ds, "column_names", None)
        if not columns:  # an IterableDataset may not know its columns before iterating
            continue
        if args.dataset_text_field in columns or any(all(c in columns for c in s) for s in _SFT_COLUMN_SETS):
            continue
        raise ValueError(
            f"The training dataset has columns {list(columns)}, none of which SFTTrainer can train on: it needs "
            f"`{args.dataset_text_field}` (set `dataset_text_field` to your text column), `messages`, "
            "`prompt`/`completion`, or `input_ids`; or pass a `formatting_func`."
        )


def _check_schedule(args: LoRAPruneConfig, total_steps: int) -> PruningSchedule:
    schedule = PruningSchedule(total_steps, args.prune_freq, args.pruning_warmup_ratio, args.pruning_cooldown_ratio,
                               args.pruning_schedule)
    ramp = schedule.ramp_end - schedule.ramp_start
    if schedule.kind == "cubic" and ramp > 0 and args.prune_freq > ramp:
        raise ValueError(
            f"`prune_freq`={args.prune_freq} is longer than the pruning ramp (steps {schedule.ramp_start}.."
            f"{schedule.ramp_end} of {total_steps}): the cubic schedule would jump straight to the target. Lower "
            "`prune_freq`, train longer, or set `pruning_schedule=\"one_shot\"`."
        )
    return schedule


class LoRAPruneTrainer(SFTTrainer):
    """Drop-in replacement for :class:`trl.SFTTrainer` that prunes while LoRA fine-tunes.

    Same constructor as ``SFTTrainer``; ``args`` is a :class:`LoRAPruneConfig`. After ``train()``,
    :meth:`save_pruned_model` writes the compacted model with LoRA merged.
    """

    _tag_names = ["trl", "sft", "loraprune"]

    def __init__(self, model, args: LoRAPruneConfig | None = None, *pos, peft_config=None, **kwargs):
        if args is None:
            args = LoRAPruneConfig(output_dir="loraprune-output")
        if not isinstance(args, LoRAPruneConfig):
            raise TypeError(f"`args` must be a LoRAPruneConfig, got {type(args).__name__}.")
        # SFTTrainer(model, args, data_collator, train_dataset, ...): the dataset may come positionally.
        train_dataset = kwargs.get("train_dataset", pos[1] if len(pos) > 1 else None)
        _preflight(model, args, peft_config, train_dataset, kwargs.get("formatting_func"))
        super().__init__(model, args, *pos, peft_config=peft_config, **kwargs)
        check_distributed_backend(self)
        self._resume_meta = None  # settings of the checkpoint this run resumed from, checked at train begin

        self.structure = discover_structure(self.model, args.attention_unit)
        missing = sorted({m.module for g in self.structure.groups() for m in g.members
                          if not hasattr(self.structure.module(g, m), "lora_A")})
        if missing and args.pruning_criterion == "lora":
            raise ValueError(f"No LoRA adapter on {missing}; use `target_modules=\"all-linear\"`.")
        self.pruning_state = PruningState(self.structure)
        self.final_layer_count = final_layer_count(self.structure.num_layers, args.layer_pruning_ratio)
        self.mask_hooks = MaskHooks(self.pruning_state, layers=self.final_layer_count > 0)
        self.criterion = build_criterion(args.pruning_criterion, args.score_form, args.normalize_scores)
        self.criterion.setup(self)  # criteria that need hooks or extra gradients install them here
        self.layer_scorer = self._setup_layer_scorer()
        self.final_prune_counts = self._final_prune_counts()
        if args.distill_alpha > 0:
            head_weights(backbone_and_head(self.model)[1])  # refuses a LoRA adapter on the LM head now
        self._warn_about_rounding()
        self._params_before = count_base_parameters(self.model)
        self.pruning_callback = LoRAPruneCallback(self)
        self.add_callback(self.pruning_callback)
        self.compensation_callback = self._setup_compensation()
        if "wandb" in (args.report_to or []):
            from .wandb_logging import WandbPruningCallback  # wandb is optional: import only when reporting to it

            self.add_callback(WandbPruningCallback(self))

    def _setup_layer_scorer(self):
        """The layer criterion (``layer_criterion``), attached after the mask hooks so that its gates see
        the masked outputs; ``None`` without depth pruning."""
        if self.final_layer_count == 0:
            return None
        scorer = build_layer_scorer(self.args.layer_criterion, self.args.score_form)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scorer.loss_scale_fn = scaler.get_scale
        mask_hooks = self.mask_hooks
        scorer.attach(self.structure, accept=lambda: torch.is_grad_enabled() and mask_hooks.enabled,
                      state=self.pruning_state)
        return scorer

    def _setup_compensation(self) -> CompensationCallback | None:
        """Checks and setup of ``compensation`` (after ``_params_before``: an added bias is not a base
        parameter of the model the user passed in)."""
        args = self.args
        if args.compensation == "none":
            return None
        from .criteria.common import base_linear

        groups = [g for g in self.structure.groups() if self.final_prune_counts[g.name] > 0]
        quantized = sorted({type(base_linear(consumer(self.structure, g)).weight).__name__ for g in groups}
                           & {"Int8Params", "Params4bit"})
        if quantized:
            raise ValueError(
                f"`compensation={args.compensation!r}` writes refitted values into the base weights, which are "
                f"{quantized[0]} here: re-quantizing a refitted matrix adds an error as large as the refit itself. "
                "Load the base model in float32/bfloat16, or use `compensation=\"none\"`."
            )
        if args.compensation == "bias":
            check_bias_supported(_unwrap(self.model).config, self.structure, sorted({g.kind for g in groups}))
            for g in groups:
                ensure_bias(consumer(self.structure, g))
        callback = CompensationCallback(self)
        self.add_callback(callback)
        return callback

    def create_optimizer(self, model=None):
        # Criteria that need the base weights' gradients (`vanilla`) make them requires_grad; the
        # optimizer must still never train them, so hide them while Trainer collects parameters.
        frozen = list(self.criterion.frozen_parameters())
        for p in frozen:
            p.requires_grad_(False)
        try:
            return super().create_optimizer(model)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _final_prune_counts(self) -> dict[str, int]:
        """Units to prune per group at the end: from the per-kind ratios, or solved from
        ``param_pruning_ratio`` (same counts in every layer)."""
        args, structure = self.args, self.structure
        if args.param_pruning_ratio is None:
            return {g.name: final_prune_count(g, args.attention_ratio if g.kind == "attention" else args.mlp_ratio,
                                              args.width_multiple)
                    for g in structure.groups()}
        attn, mlp = structure.attention[0], structure.mlp[0]
        decoder = decoder_parameters(structure)
        removed_layers = self.final_layer_count
        # Removed layers count toward the budget; heads and channels of the kept layers make up the rest.
        rest = args.param_pruning_ratio * decoder - removed_layers * layer_parameters(structure, 0)
        if rest < -1e-9 * decoder:
            raise UnreachableBudgetError(
                f"`layer_pruning_ratio`={args.layer_pruning_ratio:g} removes {removed_layers} of {structure.num_layers} "
                f"decoder layers, {removed_layers / structure.num_layers:.1%} of the decoder parameters, more than "
                f"`param_pruning_ratio`={args.param_pruning_ratio:g}. Lower `layer_pruning_ratio` or raise the budget.")
        if rest <= 1e-9 * decoder:
            return {g.name: 0 for g in structure.groups()}
        kept_layers = structure.num_layers - removed_layers
        kept_params = decoder * kept_layers / structure.num_layers
        a, m = budget_prune_counts(attn, mlp, unit_parameters(structure, attn), unit_parameters(structure, mlp),
                                   kept_layers, kept_params, rest / kept_params,
                                   args.attention_pruning_ratio, args.mlp_pruning_ratio, args.width_multiple)
        return {g.name: a if g.kind == "attention" else m for g in structure.groups()}

    # -- pruning plumbing used by the callback ---------------------------------------------------
    def make_schedule(self, total_steps: int) -> PruningSchedule:
        check_total_steps(self._resume_meta, total_steps)
        return _check_schedule(self.args, total_steps)

    def apply_schedule(self, progress: float) -> dict[str, list[int]]:
        """Grow the masks to ``progress`` of the target; returns ``{group name: newly pruned units}``.
        The compensation refit (if any) runs after this, in the callback, once masks are synchronised."""
        changed = update_masks(self.pruning_state, self.final_prune_counts, progress)
        if changed:
            logger.info("LoRAPrune: pruned %d units in %d groups (progress %.3f)",
                        sum(len(v) for v in changed.values()), len(changed), progress)
        if self.layer_scorer is not None:
            count = scheduled_layer_count(self.final_layer_count, progress, self.layer_scorer.one_shot)
            removed = self.pruning_state.prune_layers_to(count)
            if removed:
                logger.info("LoRAPrune: removed decoder layers %s (%s; %d of %d removed)", removed,
                            self.layer_scorer.name, self.pruning_state.num_pruned_layers(), self.structure.num_layers)
            if self.pruning_state.num_pruned_layers() >= self.final_layer_count:
                self.layer_scorer.detach()  # every layer is chosen: no more gates or statistics
        return changed

    def target_summary(self) -> dict:
        """Requested and achieved (after rounding) unit counts per layer, and the parameter budget."""
        attn = self.structure.attention[0]
        mlp = self.structure.mlp[0]
        decoder = decoder_parameters(self.structure)
        layers, num_layers = self.final_layer_count, self.structure.num_layers
        # Same counts in every layer: the kept layers' share of the width removal, plus the removed layers whole.
        removed = sum(count * unit_parameters(self.structure, self.pruning_state.groups[name])
                      for name, count in self.final_prune_counts.items()) * (num_layers - layers) / num_layers
        removed += layers * layer_parameters(self.structure, 0)
        budget = self.args.param_pruning_ratio
        # With a budget, the per-kind ratios asked for are only those set explicitly (the rest is solved).
        attention_asked = self.args.attention_ratio if budget is None else self.args.attention_pruning_ratio
        mlp_asked = self.args.mlp_ratio if budget is None else self.args.mlp_pruning_ratio
        return {
            "decoder_parameters": decoder,
            "param_requested_ratio": budget,
            "param_achieved_ratio": removed / decoder,
            "attention_unit": self.structure.attention_unit,
            "attention_units_per_layer": attn.num_units,
            "attention_units_pruned_per_layer": self.final_prune_counts[attn.name],
            "attention_requested_ratio": attention_asked,
            "attention_achieved_ratio": self.final_prune_counts[attn.name] / attn.num_units,
            "heads_pruned_per_layer": self.final_prune_counts[attn.name] * attn.heads_per_unit,
            "mlp_channels_per_layer": mlp.num_units,
            "mlp_channels_pruned_per_layer": self.final_prune_counts[mlp.name],
            "mlp_requested_ratio": mlp_asked,
            "mlp_achieved_ratio": self.final_prune_counts[mlp.name] / mlp.num_units,
            "width_multiple": self.args.width_multiple,
            "num_layers": num_layers,
            "layers_requested_ratio": self.args.layer_pruning_ratio,
            "layers_pruned": layers,
            "layers_achieved_ratio": layers / num_layers,
            "layer_criterion": self.args.layer_criterion if layers else None,
        }

    def _warn_about_rounding(self) -> None:
        s = self.target_summary()
        for kind, unit in (("attention", "attention units"), ("mlp", "MLP channels")):
            requested, achieved = s[f"{kind}_requested_ratio"], s[f"{kind}_achieved_ratio"]
            if requested is not None and abs(requested - achieved) > 1e-3:
                total = s["attention_units_per_layer"] if kind == "attention" else s["mlp_channels_per_layer"]
                pruned = s["attention_units_pruned_per_layer"] if kind == "attention" else s[
                    "mlp_channels_pruned_per_layer"]
                aligned = (f", keeping a multiple of width_multiple={self.args.width_multiple} channels (set "
                           "width_multiple=1 for exact counts)" if kind == "mlp" and self.args.width_multiple > 1
                           else "")
                warnings.warn(
                    f"{kind} pruning ratio {requested:g} rounds to {pruned} of {total} {unit} per layer "
                    f"({achieved:.1%}) with attention_unit={self.structure.attention_unit!r} "
                    f"({self.structure.num_heads} query heads over {self.structure.num_kv_heads} KV heads){aligned}.",
                    stacklevel=3,
                )

    # -- distillation ------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``SFTTrainer.compute_loss``, or with ``distill_alpha > 0`` in training:
        ``(1 - alpha) * CE + alpha * T^2 * KL(teacher || student)`` (see :mod:`loraprune_trainer.distill`).

        One teacher forward without gradient and one student forward with it. Not TRL's fused-head
        forward: its logits carry no gradient, so a KL term on them would train nothing."""
        if self.args.distill_alpha == 0 or not model.training or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        args = self.args
        ce_sum, kl_sum, num_tokens = self.distillation_sums(model, inputs)
        denominator = torch.as_tensor(num_tokens if num_items_in_batch is None else num_items_in_batch,
                                      device=ce_sum.device).clamp(min=1)
        t2 = args.distill_temperature ** 2
        loss = ((1 - args.distill_alpha) * ce_sum + args.distill_alpha * t2 * kl_sum) / denominator
        # As TRL does: `num_items_in_batch` counts every rank's tokens, and DDP averages gradients over ranks.
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        n = self.accelerator.gather_for_metrics(num_tokens.detach()).sum().clamp(min=1)
        for key, value in (("distill/ce", ce_sum), ("distill/kl", kl_sum)):
            self._metrics["train"][key].append((self.accelerator.gather_for_metrics(value.detach()).sum() / n).item())
        return loss

    def distillation_sums(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ce_sum, kl_sum, num_tokens)`` of one micro-batch: the teacher (``distill_teacher``) runs
        first under ``no_grad``, then the student (``model``, with gradient, through any DDP wrapper)."""
        peft_model = self.accelerator.unwrap_model(model)
        backbone, lm_head = backbone_and_head(peft_model)
        forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        forward_inputs["use_cache"] = False
        recorder = BackboneOutput(backbone)
        try:
            with teacher_mode(peft_model, self.mask_hooks, self.args.distill_teacher):
                peft_model(**forward_inputs, logits_to_keep=1)  # the logits come from the chunked head below
            teacher_hidden = recorder.hidden
            model(**forward_inputs, logits_to_keep=1)
            hidden = recorder.hidden
        finally:
            recorder.remove()
        return distill_sums(hidden, teacher_hidden, inputs["labels"], head_weights(lm_head),
                            self.args.distill_temperature, self.args.distill_chunk_size)

    # -- metrics -----------------------------------------------------------------------------------
    def pruning_metrics(self) -> dict[str, float]:
        params_after = self._params_before - self.pruning_state.removed_parameters()
        return {
            "prune/attention_sparsity": self.pruning_state.sparsity("attention"),
            "prune/mlp_sparsity": self.pruning_state.sparsity("mlp"),
            "prune/heads_pruned": self.pruning_state.pruned_heads(),
            "prune/channels_pruned": self.pruning_state.pruned_channels(),
            "prune/layers_pruned": self.pruning_state.num_pruned_layers(),
            "prune/params": params_after,
            "prune/params_ratio": params_after / self._params_before,
        }

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs only, so eval logs keep their own keys
            logs = {**logs, **self.pruning_metrics(), **score_statistics(self.pruning_state)}
            if self.compensation_callback is not None:
                logs.update(self.compensation_callback.metrics())
        if "eval_loss" in logs:  # mean token NLL -> perplexity (inf rather than an overflow error)
            logs = {**logs, "eval_perplexity": math.exp(min(logs["eval_loss"], 700.0))}
        super().log(logs, start_time)

    # -- checkpoints: masks, scores and settings travel with every checkpoint-N ------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *pos, **kwargs):
        """``SFTTrainer.train``; when resuming, the masks and moving-average scores are restored from
        the checkpoint first, and a checkpoint written with other pruning settings is refused."""
        folder = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if folder is not None:
            self._resume_meta = load_pruning_checkpoint(folder, self.pruning_state, self.args.pruning_settings())
            if self.compensation_callback is not None:  # refitted base tensors are not in PEFT's checkpoint
                self.compensation_callback.load_state_dict(*load_compensation_checkpoint(folder))
            logger.info("LoRAPrune: restored masks and scores from %s (%d score updates)", folder,
                        self.pruning_state.num_score_updates)
            if self.layer_scorer is not None and self.pruning_state.num_pruned_layers() >= self.final_layer_count:
                self.layer_scorer.detach()  # as the uninterrupted run did when its last layer went
        return super().train(folder if folder is not None else resume_from_checkpoint, *pos, **kwargs)

    def _save_checkpoint(self, model, trial):
        # Written before Trainer's files, so a folder with trainer_state.json always has the pruning state.
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_pruning_checkpoint(folder, self.pruning_state, self.args.pruning_settings(), self.state.max_steps)
            if self.compensation_callback is not None:
                save_compensation_checkpoint(folder, *self.compensation_callback.state_dict())
        super()._save_checkpoint(model, trial)

    def _compensation_summary(self) -> dict:
        """For the export report: every refit (group, units, ridge lambda, output error before/after)."""
        if self.compensation_callback is None:
            return {}
        return {"compensation_history": self.compensation_callback.history}

    # -- export ------------------------------------------------------------------------------------
    def save_pruned_model(self, output_dir: str, dtype: torch.dtype | str | None = None, verify: bool = True) -> dict:
        """Cut the masked units, merge LoRA, and write a checkpoint that stock
        ``AutoModelForCausalLM.from_pretrained`` loads, plus tokenizer and ``pruning_report.json``.
        Only the main process writes. Returns the report."""
        from .export import save_pruned_model

        report = None
        if self.args.should_save:
            report = save_pruned_model(
                self.model, self.pruning_state, output_dir, tokenizer=self.processing_class, dtype=dtype,
                settings={**self.args.pruning_settings(), **self.target_summary(), **self._compensation_summary()},
                verify=verify,
            )
            if "wandb" in (self.args.report_to or []):
                from .wandb_logging import log_report_artifact

                log_report_artifact(output_dir, report)
        self.accelerator.wait_for_everyone()
        return report

    def save_pruning_adapter(self, output_dir: str) -> None:
        """The reference format: the LoRA adapter plus ``pruning_masks.safetensors``, to load back
        onto the original base model with :func:`loraprune_trainer.export.load_masked_model`."""
        from .export import save_adapter_and_masks

        if self.args.should_save:
            consumers = self.compensation_callback.state_dict()[0] if self.compensation_callback else {}
            save_adapter_and_masks(self.model, self.pruning_state, output_dir, self.args.pruning_settings(),
                                   consumers={k[len("consumer."):]: v for k, v in consumers.items()
                                              if k.startswith("consumer.")})
        self.accelerator.wait_for_everyone()


def score_statistics(pruning_state) -> dict[str, float]:
    """Moving-average importance per kind: mean over all units, lowest kept and highest pruned score
    (``min_kept > max_pruned`` within a layer is what pruning by score guarantees; across layers the
    gap shows how decisive the ranking was). Keys ``prune/score_{attention,mlp}_{mean,min_kept,max_pruned}``."""
    out = {}
    for kind in ("attention", "mlp"):
        names = [n for n, g in pruning_state.groups.items() if g.kind == kind]
        if not names or pruning_state.num_score_updates == 0:
            continue
        scores = torch.cat([pruning_state.scores[n] for n in names])  # [units over all layers]
        keep = torch.cat([pruning_state.keep[n] for n in names])
        out[f"prune/score_{kind}_mean"] = float(scores.mean())
        out[f"prune/score_{kind}_min_kept"] = float(scores[keep].min())
        if not bool(keep.all()):
            out[f"prune/score_{kind}_max_pruned"] = float(scores[~keep].max())
    return out


def count_base_parameters(model) -> int:
    """Parameters of the base model, LoRA excluded, tied weights counted once."""
    seen, total = set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if "lora_" in name or id(p) in seen:
            continue
        seen.add(id(p))
        # Int8/4-bit params store packed data; count the logical shape where known.
        total += p.numel() if not hasattr(p, "quant_state") else int(torch.Size(p.quant_state.shape).numel())
    return total

