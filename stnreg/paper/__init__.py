"""Reproductions of the Spatial Transformer Networks paper (Jaderberg et al., 2015) with stnreg's sampler
and transforms: data generators, classifiers, Lightning tasks and data modules."""

from .data import EXPERIMENTS, Variant, load_mnist, make_variant, read_idx
from .datamodule import CUBData, MNISTVariants, SVHNData
from .models import ARCHITECTURES, CoLocalizer, PartAttentionNet, STClassifier, SVHNNet
from .task import ClassificationTask, CoLocalizationTask, CUBTask, SVHNTask, box_iou

__all__ = [
    "ARCHITECTURES",
    "EXPERIMENTS",
    "CUBData",
    "CUBTask",
    "ClassificationTask",
    "CoLocalizationTask",
    "CoLocalizer",
    "MNISTVariants",
    "PartAttentionNet",
    "STClassifier",
    "SVHNData",
    "SVHNNet",
    "SVHNTask",
    "Variant",
    "box_iou",
    "load_mnist",
    "make_variant",
    "read_idx",
]
