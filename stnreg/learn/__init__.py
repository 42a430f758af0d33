"""Learned registration: networks, Lightning training from configs, amortized inference.

Layers: ``model`` (cascades of localization networks, pure ``nn.Module``) -> ``task``
(LightningModule: objective, augmentation, validation metrics) and ``data`` (pair datasets,
LightningDataModule; ``synth``: synthetic pairs from random label maps) -> ``infer`` (world-space
registration with a checkpoint, refinement).
"""

from .data import PairDataModule, PairDataset, load_collection, load_paired, normalize_intensity
from .infer import register_with_model
from .model import RegistrationNet, RegistrationOutput
from .synth import SynthConfig, SynthDataModule, synth_pairs
from .task import RegistrationTask, load_task

__all__ = [
    "PairDataModule",
    "PairDataset",
    "RegistrationNet",
    "RegistrationOutput",
    "RegistrationTask",
    "SynthConfig",
    "SynthDataModule",
    "load_collection",
    "load_paired",
    "load_task",
    "normalize_intensity",
    "register_with_model",
    "synth_pairs",
]
