"""Affine localization by matching feature centroids.

Regressing an affine matrix from pooled CNN features (:class:`~stnreg.nets.LocalizationCNN` and a
linear head) has to learn correspondence through a bottleneck that discards where things are.
After the detector of Hoffmann et al. (SynthMorph's joint affine model, 2023): one shared network
turns each image into ``K`` feature maps, each map's spatial softmax is a distribution and its
centroid a point, and the affine that best maps the fixed image's points onto the moving image's
(least squares) is the answer. The geometry is exact by construction (a translated image moves
every point with it); the network only has to learn features that peak on the same anatomy in
both images. How fast that is learned on synthetic pairs: ``benchmarks/results/learned-synth.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._checks import check_ndim
from ..coords import lattice
from .unet import UNet

__all__ = ["CentroidAffine", "fit_affine", "map_centroids"]


def map_centroids(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Centroids and masses of non-negative maps ``(N, K, *spatial)`` (e.g. distributions).

    Returns ``(points, mass)``: ``(N, K, d)`` in the maps' normalized coordinates (``(x, y, z)``
    order, ``align_corners=False``: -1 and +1 at the outer edges) and ``(N, K)``, each map's mean.
    """
    shape = tuple(maps.shape[2:])
    grid = lattice(shape, dtype=maps.dtype, device=maps.device).reshape(-1, len(shape))
    flat = maps.flatten(2)
    mass = flat.mean(-1)
    points = (flat @ grid) / flat.sum(-1, keepdim=True).clamp_min(1e-12)
    return points, mass


def fit_affine(source: Tensor, target: Tensor, weight: Tensor, ridge: float = 1e-3) -> Tensor:
    """The affine ``[A | t]`` ``(N, d, d+1)`` minimizing ``Σ_k w_k |A s_k + t - y_k|² + ridge·|A - I|²``.

    ``source``, ``target``: ``(N, K, d)`` points; ``weight``: ``(N, K)``, non-negative (normalized
    here). The ridge (relative to the total weight) pulls the linear part towards the identity, so
    that few or collinear points still give a well-posed, near-rigid answer. Solved in float64.
    """
    d = source.shape[-1]
    dtype = source.dtype
    s, y = source.double(), target.double()
    w = weight.double()
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    x = torch.cat([s, torch.ones_like(s[..., :1])], -1)
    xtw = x.transpose(1, 2) * w.unsqueeze(1)
    # The translation gets a vanishing ridge (towards 0) too: all-zero weights still solve.
    reg = torch.eye(d + 1, dtype=torch.float64, device=s.device) * ridge
    reg[d, d] = 1e-9
    prior = torch.zeros(d + 1, d, dtype=torch.float64, device=s.device)
    prior[:d] = torch.eye(d, dtype=torch.float64, device=s.device) * ridge
    m = torch.linalg.solve(xtw @ x + reg, xtw @ y + prior)
    return m.transpose(1, 2).to(dtype)


class CentroidAffine(nn.Module):
    """Affine stage of a registration network: shared features, their centroids, a least-squares fit.

    Maps ``cat([moving, fixed], 1)`` ``(N, 2C, *spatial)`` to flat affine parameters ``(N, d(d+1))``
    (``[A | t]`` of :class:`~stnreg.transforms.Affine`, row-major) of the map from the fixed
    image's normalized coordinates to the moving image's, the same output as a regression head.

    Args:
        ndim: 2 or 3.
        in_channels: channels of each image (``C``).
        points: feature maps, hence centroids, per image.
        widths: encoder widths of the feature U-Net (its decoder mirrors them).
        out_level: the feature maps are ``2 ** out_level`` times coarser than the input (at most
            ``len(widths) - 1`` levels: a shallower U-Net stops where it can).
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int = 1,
        points: int = 32,
        widths: Sequence[int] = (16, 32, 32, 32),
        out_level: int = 2,
    ) -> None:
        super().__init__()
        check_ndim(ndim)
        widths = tuple(widths)
        self.in_channels = in_channels
        # A normal output init (not the near-zero one of displacement U-Nets): flat maps would all
        # put their centroid at the centre.
        self.features = UNet(
            in_channels, points, ndim, widths, widths[::-1], (), out_std=0.05, out_level=min(out_level, len(widths) - 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        moving, fixed = x.split(self.in_channels, 1)
        h = self.features(torch.cat([moving, fixed], 0))
        # A spatial softmax per map: a peaked distribution whose centroid moves with the image (the
        # centroid of a ReLU map is dragged to the centre by any broad response, and of a label
        # scattered in blobs over the image, by the edges that cut it).
        points, _ = map_centroids(torch.softmax(h.flatten(2), -1).view_as(h))
        n = fixed.shape[0]
        weight = torch.ones(points.shape[:2], dtype=points.dtype, device=points.device)[:n]
        return fit_affine(points[n:], points[:n], weight).flatten(1)
