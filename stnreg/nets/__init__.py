"""Networks: localization encoders and Spatial Transformer modules."""

from .localization import LocalizationCNN
from .stn import MultiSpatialTransformer, SpatialTransformer, identity_head
from .unet import UNet

__all__ = ["LocalizationCNN", "MultiSpatialTransformer", "SpatialTransformer", "UNet", "identity_head"]
