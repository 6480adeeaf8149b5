"""loraprune-trainer: structured pruning while LoRA fine-tunes (LoRAPrune, Zhang et al. 2024)."""

from .config import LoRAPruneConfig
from .export import load_masked_model, save_pruned_model
from .masks import MaskHooks, PruningState
from .schedule import PruningSchedule
from .structure import ModelStructure, UnsupportedModelError, discover_structure
from .trainer import LoRAPruneTrainer

__version__ = "0.1.0"

__all__ = [
    "LoRAPruneConfig",
    "LoRAPruneTrainer",
    "MaskHooks",
    "ModelStructure",
    "PruningSchedule",
    "PruningState",
    "UnsupportedModelError",
    "discover_structure",
    "load_masked_model",
    "save_pruned_model",
]
