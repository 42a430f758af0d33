"""Small localization networks for Spatial Transformers."""

from __future__ import annotations

from torch import nn

from .._checks import check_ndim

__all__ = ["LocalizationCNN"]


class LocalizationCNN(nn.Module):
    """Conv -> ReLU -> max-pool blocks, adaptive average pooling, then a hidden layer.

    Maps ``(N, in_channels, *spatial)`` of any size to features ``(N, features)``.

    Args:
        in_channels: input channels.
        ndim: 2 or 3.
        channels: width of each conv block.
        features: output features (feed ``SpatialTransformer(features=...)``).
        pool: the feature map is average-pooled to ``pool`` cells per axis before the hidden layer.
            1 (global pooling) discards where things are; regressing translations (registration)
            needs a coarse grid, e.g. 4.
    """

    def __init__(
        self, in_channels: int, ndim: int = 2, channels: tuple[int, ...] = (16, 32), features: int = 32, pool: int = 1
    ):
        super().__init__()
        check_ndim(ndim)
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        maxpool = nn.MaxPool2d if ndim == 2 else nn.MaxPool3d
        avgpool = nn.AdaptiveAvgPool2d if ndim == 2 else nn.AdaptiveAvgPool3d
        layers: list[nn.Module] = []
        c = in_channels
        for width in channels:
            layers += [conv(c, width, 5, padding=2), nn.ReLU(inplace=True), maxpool(2, ceil_mode=True)]
            c = width
        layers += [avgpool(pool), nn.Flatten(), nn.Linear(c * pool**ndim, features), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.features = features

    def forward(self, x):
        return self.body(x)
