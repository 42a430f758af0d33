"""An image with world geometry: a ``(C, *spatial)`` tensor on a :class:`~stnreg.coords.Grid`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from .coords import Grid

__all__ = ["Image", "as_image"]


@dataclass(frozen=True)
class Image:
    """Pixel data plus geometry.

    Attributes:
        data: ``(C, H, W)`` or ``(C, D, H, W)``, array order, any dtype (labels stay integer).
        grid: voxel-to-world geometry (ITK physical space, ``x, y, z`` order).
        name: where it came from (a path or a label), used in error messages and reports.
    """

    data: Tensor
    grid: Grid
    name: str = "image"

    def __post_init__(self) -> None:
        if self.data.dim() != self.grid.ndim + 1:
            raise ValueError(
                f"{self.name}: data of shape {tuple(self.data.shape)} does not match a {self.grid.ndim}D grid"
            )
        if tuple(self.data.shape[1:]) != self.grid.shape:
            raise ValueError(f"{self.name}: data shape {tuple(self.data.shape[1:])} != grid shape {self.grid.shape}")

    @property
    def ndim(self) -> int:
        return self.grid.ndim

    def batch(self, dtype: torch.dtype | None = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """``(1, C, *spatial)`` for the sampler; ``dtype=None`` keeps the data type."""
        return self.data.unsqueeze(0).to(device=device, dtype=dtype if dtype is not None else self.data.dtype)

    def with_data(self, data: Tensor, name: str | None = None) -> Image:
        """Same grid, other pixels (``(C, *spatial)`` or ``(1, C, *spatial)``)."""
        if data.dim() == self.ndim + 2:
            data = data[0]
        return replace(self, data=data, name=name or self.name)


def as_image(
    value: Image | Tensor | np.ndarray,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
    name: str = "image",
) -> Image:
    """Wrap an array or tensor as an :class:`Image`.

    ``(H, W)`` and ``(D, H, W)`` get one channel; ``(C, D, H, W)`` is channel-first 3D; a 3-axis
    array is channel-first 2D only when ``spacing`` has two values. Geometry defaults to 1 mm
    isotropic voxels at the origin.
    """
    if isinstance(value, Image):
        return value
    t = torch.as_tensor(np.asarray(value)) if isinstance(value, np.ndarray) else torch.as_tensor(value)
    if t.dim() == 2 or (t.dim() == 3 and not (spacing is not None and len(spacing) == 2)):
        t = t.unsqueeze(0)
    if t.dim() not in (3, 4):
        raise ValueError(
            f"{name}: expected a 2D or 3D array (optionally with channels first), got shape {tuple(t.shape)}"
        )
    return Image(t, Grid(tuple(t.shape[1:]), spacing, origin, direction), name)
