"""A U-Net for dense fields, any input size (padded and cropped inside)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_ndim

__all__ = ["UNet"]


def _conv(ndim: int, cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d if ndim == 2 else nn.Conv3d
    return nn.Sequential(conv(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2, inplace=True))


class UNet(nn.Module):
    """VoxelMorph-style U-Net: strided-conv encoder, upsampling decoder with skip connections.

    Maps ``(N, in_channels, *spatial)`` to ``(N, out_channels, *spatial)`` for any spatial size:
    inputs are zero-padded up to a multiple of ``2 ** len(encoder)`` and the output is cropped
    back, so the size restriction of the architecture never reaches the caller.

    Args:
        in_channels, out_channels: channel counts.
        ndim: 2 or 3.
        encoder: widths of the encoder levels (each halves the resolution).
        decoder: widths of the decoder levels (each doubles it back); as long as ``encoder``.
        final: widths of full-resolution convolutions before the output layer.
        out_std: standard deviation of the output layer's initial weights (bias zero): a tiny
            value makes an untrained network predict an almost-zero field, i.e. the identity.
        out_level: stop the decoder this many levels early: the output is ``2 ** out_level`` times
            coarser, ``ceil(size / 2 ** out_level)`` per axis (a coarse field costs a fraction of
            the full-resolution layers, which dominate the run time in 3D).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        ndim: int = 2,
        encoder: Sequence[int] = (16, 32, 32, 32),
        decoder: Sequence[int] = (32, 32, 32, 32),
        final: Sequence[int] = (32, 16),
        out_std: float = 1e-5,
        out_level: int = 0,
    ) -> None:
        super().__init__()
        check_ndim(ndim)
        if len(encoder) != len(decoder) or not encoder:
            raise ValueError(f"encoder {tuple(encoder)} and decoder {tuple(decoder)} need equal, non-zero lengths")
        if not 0 <= out_level < len(encoder):
            raise ValueError(f"out_level must lie in [0, {len(encoder) - 1}], got {out_level}")
        decoder = tuple(decoder)[: len(decoder) - out_level]
        self.ndim = ndim
        self.down = nn.ModuleList()
        c = in_channels
        skips = [c]
        for w in encoder:
            self.down.append(_conv(ndim, c, w, stride=2))
            c = w
            skips.append(c)
        skips.pop()
        self.up = nn.ModuleList()
        for w in decoder:
            self.up.append(_conv(ndim, c + skips.pop(), w))
            c = w
        self.final = nn.Sequential(*[_conv(ndim, cin, cout) for cin, cout in zip((c, *final), final, strict=False)])
        c = final[-1] if final else c
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.out = conv(c, out_channels, 3, padding=1)
        nn.init.normal_(self.out.weight, std=out_std)
        nn.init.zeros_(self.out.bias)
        self.multiple = 2 ** len(encoder)
        self.out_level = out_level

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.ndim + 2:
            raise ValueError(
                f"a {self.ndim}D U-Net needs (N, C, *spatial) with {self.ndim} spatial axes, got {tuple(x.shape)}"
            )
        size = x.shape[2:]
        pad: list[int] = []
        for s in reversed(size):
            pad += [0, (-s) % self.multiple]
        h = F.pad(x, pad) if any(pad) else x
        feats = [h]
        for layer in self.down:
            h = layer(h)
            feats.append(h)
        feats.pop()
        # Skip connections the shortened decoder never reaches.
        feats = feats[self.out_level :]
        mode = "bilinear" if self.ndim == 2 else "trilinear"
        for layer in self.up:
            skip = feats.pop()
            h = F.interpolate(h, size=skip.shape[2:], mode=mode, align_corners=False)
            h = layer(torch.cat([h, skip], 1))
        h = self.out(self.final(h))
        f = 2**self.out_level
        return h[(..., *[slice(0, -(-s // f)) for s in size])]
