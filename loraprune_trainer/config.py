"""`LoRAPruneConfig`: TRL's `SFTConfig` plus the pruning settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from .compensation import COMPENSATIONS
from .criteria import CRITERIA, SCORE_FORMS
from .depth import LAYER_CRITERIA
from .distill import DISTILL_TEACHERS
from .schedule import SCHEDULES
from .structure import ATTENTION_UNITS


@dataclass
class LoRAPruneConfig(SFTConfig):
    r"""
    Configuration for [`LoRAPruneTrainer`]: every [`trl.SFTConfig`] field plus the ones below.

    Parameters:
        > What is pruned

        pruning_ratio (`float`, defaults to `0.5`):
            Fraction of attention units and of MLP channels removed in every decoder layer, in [0, 1).
            Ignored when `param_pruning_ratio` is set.
        param_pruning_ratio (`float`, *optional*):
            Fraction of the decoder layers' parameters to remove, in (0, 1): the trainer picks the attention and
            MLP unit counts that reach it as closely as the head layout allows, never removing less. With
            `attention_pruning_ratio` (or `mlp_pruning_ratio`) also set, that kind is fixed and the other one is
            solved for (`attention_pruning_ratio=0` takes the whole budget from the MLPs); otherwise attention
            units are pruned at the budget's ratio and the MLPs make up the rest.
        attention_pruning_ratio (`float`, *optional*):
            Overrides `pruning_ratio` for attention units (0 keeps every head).
        mlp_pruning_ratio (`float`, *optional*):
            Overrides `pruning_ratio` for MLP channels (0 keeps every channel).
        attention_unit (`str`, defaults to `"kv_group"`):
            Unit of attention pruning under grouped-query attention: `"kv_group"` removes a key/value head
            with all its query heads; `"query_head"` removes the same number of query heads from every KV
            group. Identical under multi-head attention.

        > How importance is measured

        pruning_criterion (`str`, defaults to `"lora"`):
            Importance criterion; `"lora"` is LoRAPrune's LoRA-gradient criterion (Eq. 10).
        score_form (`str`, defaults to `"square"`):
            `"square"`: (G * W')^2 as in the paper; `"abs"`: |G * W'| as in the authors' code.
        normalize_scores (`bool`, defaults to `False`):
            L2-normalise each matrix's unit scores before summing them over a group (authors' code).
        ema_lambda (`float`, defaults to `0.9`):
            Moving-average factor of Eq. 11, in [0, 1): S <- lambda * S + (1 - lambda) * I.

        > Recovery: distillation from the unpruned model

        distill_alpha (`float`, defaults to `0.0`):
            Weight of the distillation term, in [0, 1]: loss = (1 - alpha) * CE + alpha * T^2 * KL(teacher || student).
            0 trains on cross-entropy alone (no teacher forward).
        distill_temperature (`float`, defaults to `1.0`):
            Temperature T of both distributions in the KL term (> 0).
        distill_teacher (`str`, defaults to `"base"`):
            `"base"`: the original model (adapters disabled, masks off), for compression on general text;
            `"dense"`: the current fine-tuned model unpruned (adapters on, masks off), for task fine-tuning.
        distill_chunk_size (`int`, defaults to `1024`):
            Positions whose logits are built at once for the distillation loss (bounds memory on large vocabularies).

        > When units are removed

        prune_freq (`int`, defaults to `10`):
            Optimizer steps between mask updates.
        pruning_schedule (`str`, defaults to `"cubic"`):
            `"cubic"` ramps the pruned fraction as 1 - (1 - t)^3; `"one_shot"` prunes the whole target at the
            end of the warm-up.
        pruning_warmup_ratio (`float`, defaults to `0.1`):
            Fraction of training steps before the first unit is pruned (scores accumulate meanwhile).
        pruning_cooldown_ratio (`float`, defaults to `0.1`):
            Fraction of training steps at the end with the full target pruned (recovery fine-tuning).

        width_multiple (`int`, defaults to `8`):
            Round the number of MLP channels every layer keeps down to a multiple of this (the budget or ratio is
            met or exceeded, never missed). Matrix kernels run full tiles on aligned widths: multiples of 8 for GPU
            tensor cores (the default, which costs at most 7 channels a layer), 64 or 128 for full GPU tiles (worth
            it on large models, where 63 channels are a small share of the MLP). Attention widths are whole heads,
            already multiples of `head_dim`. 1 keeps the exact count.

        > Whole decoder layers (depth pruning, see `loraprune_trainer.depth`)

        layer_pruning_ratio (`float`, defaults to `0.0`):
            Fraction of the decoder layers to remove (rounded half up; at least one layer stays). A removed layer
            adds neither its attention nor its MLP output to the residual stream; the export drops it and
            renumbers the rest. With `param_pruning_ratio`, the removed layers count toward the budget and heads
            and channels of the kept layers make up the rest (a budget the layers alone exceed is an error).
        layer_criterion (`str`, defaults to `"taylor_gate"`):
            `"taylor_gate"`: the exact first-order loss change of removing a layer, from a gate on its two residual
            contributions (gradient summed over the step, squared, moving average); layers go along the cubic
            schedule. `"block_influence"`: ShortGPT's 1 - cos(h_in, h_out), averaged over the training tokens
            before the first mask update; `"last"`: the layers just before the final one. Both remove all their
            layers at the first mask update (one-shot, then the fine-tune recovers).

        > Compensating each cut (see `loraprune_trainer.compensation`)

        compensation (`str`, defaults to `"none"`):
            At every mask update, refit the consumer of the removed units (`down_proj` for MLP channels, `o_proj`
            for attention units) so that its output on recent inputs changes as little as possible. `"none"`: plain
            deletion. `"lstsq"`: the kept columns of the base weight get `W'_P C_PK (C_KK + lambda I)^-1` (ridge
            least squares, `C = E[x x^T]` of the consumer's input, `W' = W + s B A`). `"bias"`: the consumer's bias
            gets `W'_P E[x_P]` (FLAP); a zero bias is added where there is none, and the export sets `mlp_bias` /
            `attention_bias` (so the sibling projections get zero biases), which only configs with those fields
            can describe (Llama; Qwen3 for attention only); other models are refused. Refused for 8-bit/4-bit
            bases (re-quantizing the refitted weight would add an error as large as the refit) and under FSDP.
        compensation_batches (`int`, defaults to `8`):
            Micro-batches (per process) before each mask update whose consumer inputs are accumulated, never
            reaching back past the previous mask update. Statistics are kept only during this window: `lstsq` holds
            a float32 `[in, in]` matrix per changing consumer (`[d_ff, d_ff]` per layer for MLP channels).
        compensation_lambda (`float`, defaults to `0.1`):
            Ridge of `lstsq`, relative to the mean of `diag(C_KK)` (>= 0; 0 is plain least squares).

        > Parameters that differ from [`trl.SFTConfig`]

        learning_rate (`float`, defaults to `1e-4`):
            Initial AdamW learning rate. `SFTConfig`'s 2e-5 is a full fine-tuning rate; only the LoRA factors (and
            any `modules_to_save`) train here, and they need a larger one. 1e-4 is the paper's rate for LLaMA-7B;
            the best rate falls with model size, and a 135M model recovered best at 1e-3 to 2e-3.
    """

    learning_rate: float = field(default=1e-4, metadata={"help": "The initial learning rate for AdamW."})
    pruning_ratio: float = field(
        default=0.5,
        metadata={"help": "Fraction of attention units and MLP channels removed in every decoder layer, in [0, 1)."},
    )
    attention_pruning_ratio: float | None = field(
        default=None, metadata={"help": "Overrides `pruning_ratio` for attention units."}
    )
    mlp_pruning_ratio: float | None = field(default=None, metadata={"help": "Overrides `pruning_ratio` for MLP channels."})
    param_pruning_ratio: float | None = field(
        default=None,
        metadata={"help": "Fraction of the decoder layers' parameters to remove (takes the place of `pruning_ratio`)."},
    )
    attention_unit: str = field(
        default="kv_group",
        metadata={"help": "GQA attention unit: a whole KV group, or query heads evenly inside every KV group.",
                  "choices": list(ATTENTION_UNITS)},
    )
    pruning_criterion: str = field(
        default="lora", metadata={"help": "Importance criterion.", "choices": sorted(CRITERIA)}
    )
    score_form: str = field(
        default="square",
        metadata={"help": "`square`: (G*W')^2 (paper); `abs`: |G*W'| (authors' code).", "choices": list(SCORE_FORMS)},
    )
    normalize_scores: bool = field(
        default=False, metadata={"help": "L2-normalise each matrix's unit scores before summing over a group."}
    )
    ema_lambda: float = field(default=0.9, metadata={"help": "Moving-average factor of the scores, in [0, 1)."})
    distill_alpha: float = field(
        default=0.0, metadata={"help": "Weight of the KL(teacher || student) term in [0, 1]; 0 disables distillation."}
    )
    distill_temperature: float = field(default=1.0, metadata={"help": "Distillation temperature (> 0)."})
    distill_teacher: str = field(
        default="base",
        metadata={"help": "`base`: original model; `dense`: fine-tuned model with masks off.",
                  "choices": list(DISTILL_TEACHERS)},
    )
    distill_chunk_size: int = field(
        default=1024, metadata={"help": "Positions whose logits are built at once for the distillation loss."}
    )
    prune_freq: int = field(default=10, metadata={"help": "Optimizer steps between mask updates."})
    pruning_schedule: str = field(
        default="cubic", metadata={"help": "Sparsity schedule.", "choices": list(SCHEDULES)}
    )
    pruning_warmup_ratio: float = field(
        default=0.1, metadata={"help": "Fraction of training steps before the first unit is pruned."}
    )
    pruning_cooldown_ratio: float = field(
        default=0.1, metadata={"help": "Fraction of training steps at the end with the full target pruned."}
    )

    width_multiple: int = field(
        default=8,
        metadata={"help": "Round the MLP channels each layer keeps down to a multiple of this (more channels go, "
                          "never fewer); 1 = no rounding."},
    )
    layer_pruning_ratio: float = field(
        default=0.0,
        metadata={"help": "Fraction of whole decoder layers to remove (depth pruning), in [0, 1); counts toward "
                          "`param_pruning_ratio` when that is set."},
    )
    layer_criterion: str = field(
        default="taylor_gate",
        metadata={"help": "How layers are chosen: `taylor_gate` (gate gradients, while training, cubic schedule), "
                          "`block_influence` (ShortGPT) or `last` (the layers before the final one), both all at the "
                          "first mask update.", "choices": list(LAYER_CRITERIA)},
    )

    compensation: str = field(
        default="none",
        metadata={"help": "Refit the consumer (down_proj / o_proj) of removed units at every mask update.",
                  "choices": list(COMPENSATIONS)},
    )
    compensation_batches: int = field(
        default=8, metadata={"help": "Micro-batches before each mask update whose inputs feed the refit."}
    )
    compensation_lambda: float = field(
        default=0.1, metadata={"help": "Ridge of the `lstsq` refit, relative to the mean of diag(C_KK) (>= 0)."}
    )

    def __post_init__(self):
        for name in ("pruning_ratio", "attention_pruning_ratio", "mlp_pruning_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value}")
        if self.param_pruning_ratio is not None:
            if not 0.0 < self.param_pruning_ratio < 1.0:
                raise ValueError(f"`param_pruning_ratio` must be in (0, 1), got {self.param_pruning_ratio}")
            if self.attention_pruning_ratio is not None and self.mlp_pruning_ratio is not None:
                raise ValueError(
                    "Set at most one of `attention_pruning_ratio` and `mlp_pruning_ratio` with `param_pruning_ratio`: "
                    "the budget decides the other one (e.g. `attention_pruning_ratio=0` takes it from the MLPs)."
                )
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"`distill_alpha` must be in [0, 1], got {self.distill_alpha}")
        if not self.distill_temperature > 0.0:
            raise ValueError(f"`distill_temperature` must be > 0, got {self.distill_temperature}")
        if self.distill_teacher not in DISTILL_TEACHERS:
            raise ValueError(f"`distill_teacher` must be one of {DISTILL_TEACHERS}, got {self.distill_teacher!r}")
        if not (isinstance(self.distill_chunk_size, int) and self.distill_chunk_size >= 1):
            raise ValueError(f"`distill_chunk_size` must be an integer >= 1, got {self.distill_chunk_size!r}")
        if not 0.0 <= self.ema_lambda < 1.0:
            raise ValueError(f"`ema_lambda` must be in [0, 1), got {self.ema_lambda}")
        if not (isinstance(self.prune_freq, int) and self.prune_freq >= 1):
            raise ValueError(f"`prune_freq` must be an integer >= 1, got {self.prune_freq!r}")
        if self.attention_unit not in ATTENTION_UNITS:
            raise ValueError(f"`attention_unit` must be one of {ATTENTION_UNITS}, got {self.attention_unit!r}")
        if self.pruning_criterion not in CRITERIA:
            raise ValueError(f"`pruning_criterion` must be one of {sorted(CRITERIA)}, got {self.pruning_criterion!r}")
        if self.score_form not in SCORE_FORMS:
            raise ValueError(f"`score_form` must be one of {SCORE_FORMS}, got {self.score_form!r}")
        if self.pruning_schedule not in SCHEDULES:
            raise ValueError(f"`pruning_schedule` must be one of {SCHEDULES}, got {self.pruning_schedule!r}")
        for name in ("pruning_warmup_ratio", "pruning_cooldown_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value}")
        if self.pruning_warmup_ratio + self.pruning_cooldown_ratio >= 1.0:
            raise ValueError(
                "`pruning_warmup_ratio + pruning_cooldown_ratio` must be < 1 so that some steps prune, got "
                f"{self.pruning_warmup_ratio} + {self.pruning_cooldown_ratio}"
            )
        if not (isinstance(self.width_multiple, int) and self.width_multiple >= 1):
            raise ValueError(f"`width_multiple` must be an integer >= 1, got {self.width_multiple!r}")
        if not 0.0 <= self.layer_pruning_ratio < 1.0:
            raise ValueError(f"`layer_pruning_ratio` must be in [0, 1), got {self.layer_pruning_ratio}")
        if self.layer_criterion not in LAYER_CRITERIA:
            raise ValueError(f"`layer_criterion` must be one of {LAYER_CRITERIA}, got {self.layer_criterion!r}")
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"`compensation` must be one of {COMPENSATIONS}, got {self.compensation!r}")
        if not (isinstance(self.compensation_batches, int) and self.compensation_batches >= 1):
            raise ValueError(f"`compensation_batches` must be an integer >= 1, got {self.compensation_batches!r}")
        if not (isinstance(self.compensation_lambda, (int, float)) and 0.0 <= self.compensation_lambda < float("inf")):
            raise ValueError(f"`compensation_lambda` must be a finite number >= 0, got {self.compensation_lambda!r}")
        super().__post_init__()

    @property
    def attention_ratio(self) -> float:
        return self.pruning_ratio if self.attention_pruning_ratio is None else self.attention_pruning_ratio

    @property
    def mlp_ratio(self) -> float:
        return self.pruning_ratio if self.mlp_pruning_ratio is None else self.mlp_pruning_ratio

    def pruning_settings(self) -> dict:
        """The fields that define a pruning run (recorded in reports and checked on resume)."""
        names = [
            "pruning_ratio", "attention_pruning_ratio", "mlp_pruning_ratio", "param_pruning_ratio", "attention_unit",
            "pruning_criterion", "score_form", "normalize_scores", "ema_lambda", "prune_freq", "pruning_schedule",
            "pruning_warmup_ratio", "pruning_cooldown_ratio", "distill_alpha", "distill_temperature", "distill_teacher",
            "compensation", "compensation_batches", "compensation_lambda", "layer_pruning_ratio", "layer_criterion",
            "width_multiple",
        ]
        return {n: getattr(self, n) for n in names}
