"""Networks: localization encoders and Spatial Transformer modules."""

from .localization import LocalizationCNN
from .stn import MultiSpatialTransformer, SpatialTransformer

__all__ = ["LocalizationCNN", "MultiSpatialTransformer", "SpatialTransformer"]
