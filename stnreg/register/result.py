"""What a registration returns: :class:`RegistrationResult` (transform, warped image, settings, metrics)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..image import Image
from ..transforms.base import Transform, index_to_domain
from ..transforms.dense import Displacement
from ..transforms.matrix import MatrixTransform

__all__ = ["RegistrationResult"]


@dataclass
class RegistrationResult:
    """What :func:`register` returns. The transform maps fixed world points to moving world points."""

    warped: Image
    transform: Transform
    matrix: MatrixTransform | None
    deformable: Transform | None
    fixed: Image
    moving: Image
    settings: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    label_maps: tuple[Image | None, Image | None, list[int]] = (None, None, [])
    _metrics: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def metrics(self) -> dict[str, Any]:
        """Similarity before/after, Dice and HD95 when ``label_maps`` are given, Jacobian statistics.

        Computed on first access (seconds on a 3D brain), so a registration that nobody scores does
        not pay for it; see :func:`stnreg.report.evaluate`.
        """
        if self._metrics is None:
            from ..report import evaluate

            self._metrics = evaluate(self, *self.label_maps)
        return self._metrics

    def displacement(self) -> Tensor:
        """Total displacement ``T(x) - x`` ``(d, *fixed_shape)`` in mm, ``(x, y, z)`` components."""
        with torch.no_grad():
            pts = self.fixed.grid.points("world", torch.float64)
            mapped = self.transform.mapped_lattice(self.fixed.grid).double()[0]
            return torch.movedim(mapped - pts, -1, 0).float()

    def deformable_displacement(self) -> Tensor | None:
        """Displacement of the deformable stage alone ``(d, *fixed_shape)`` in mm, or ``None``."""
        if self.deformable is None:
            return None
        grid = self.fixed.grid
        t = self.deformable
        world_field = isinstance(t, Displacement) and t.domain is not None and t.batch_size == 1
        if world_field and t._shares_frame(index_to_domain(grid), grid.shape):
            # A world-space field on a resampled copy of the fixed grid: its values at the fixed voxel
            # centres, without the world points (0.3 instead of 1.0 s on a 1 mm brain).
            with torch.no_grad():
                return t.field_on(grid.shape)[0].float()
        with torch.no_grad():
            pts = self.fixed.grid.points("world", torch.float64)
            mapped = self.deformable.mapped_lattice(self.fixed.grid).double()[0]
            return torch.movedim(mapped - pts, -1, 0).float()

    def save(
        self,
        out_dir: str | os.PathLike,
        protect: Sequence[str | os.PathLike] = (),
        suffix: str | None = None,
        total_displacement: bool = False,
        qc: bool = True,
    ):
        """Write warped image, transform files, report and (with ``qc``) the QC figure (and, with
        ``total_displacement``, the whole transform as one displacement field); see
        :func:`stnreg.report.save_result`."""
        from ..report import save_result

        return save_result(self, out_dir, protect=protect, suffix=suffix, total_displacement=total_displacement, qc=qc)
