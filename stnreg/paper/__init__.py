"""Reproductions of the Spatial Transformer Networks paper (Jaderberg et al., 2015) with stnreg's sampler
and transforms: data generators, classifiers, Lightning tasks and data modules."""

from .data import EXPERIMENTS, Variant, load_mnist, make_variant, read_idx
from .datamodule import MNISTVariants
from .models import ARCHITECTURES, CoLocalizer, STClassifier
from .task import ClassificationTask, CoLocalizationTask, box_iou

__all__ = [
    "ARCHITECTURES",
    "EXPERIMENTS",
    "ClassificationTask",
    "CoLocalizationTask",
    "CoLocalizer",
    "MNISTVariants",
    "STClassifier",
    "Variant",
    "box_iou",
    "load_mnist",
    "make_variant",
    "read_idx",
]
