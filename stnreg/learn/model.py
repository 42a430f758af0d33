"""Registration networks: a cascade of localization networks, one per transform stage.

Every stage looks at the pair ``(moving warped by the stages so far, fixed)`` and predicts one
transform in the fixed image's **normalized** coordinates (``align_corners=False``, ``(x, y, z)``
order, see :mod:`stnreg.coords`). The total map is ``T = S_1 ∘ S_2 ∘ ... ∘ S_K`` (the last stage
applied first to fixed points), exactly the staging of :func:`stnreg.register`, and the warped
moving image is always resampled once from the original through ``T``.

- matrix families (``translation``, ``rigid``, ``similarity``, ``affine``, ``projective``) and
  control-point families (``tps``, ``bspline``): a :class:`~stnreg.nets.LocalizationCNN` encoder
  with an identity-initialized linear head; or, for ``affine`` with ``matrix_net="centroids"``, a
  :class:`~stnreg.nets.centroids.CentroidAffine` (feature centroids and a least-squares fit);
- dense families (``displacement``, ``svf``): a :class:`~stnreg.nets.UNet` predicting a field in
  **voxels** of the network input, converted to normalized units; ``svf`` is integrated by scaling
  and squaring, so its map is diffeomorphic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import check_ndim
from ..nets.centroids import CentroidAffine
from ..nets.localization import LocalizationCNN
from ..nets.stn import identity_head
from ..nets.unet import UNet
from ..sampler import sample
from ..transforms import FAMILIES
from ..transforms.base import ParametricTransform, Transform
from ..transforms.bspline import BSpline
from ..transforms.dense import Displacement, StationaryVelocity
from ..transforms.tps import ThinPlateSpline, uniform_control_points

__all__ = ["DENSE", "MATRIX", "RegistrationNet", "RegistrationOutput"]

MATRIX = ("translation", "rigid", "similarity", "affine", "projective")
CONTROL = ("tps", "bspline")
DENSE = ("displacement", "svf")


@dataclass
class RegistrationOutput:
    """What :class:`RegistrationNet` returns.

    Attributes:
        transform: fixed-normalized -> moving-normalized map, batch ``N``.
        stages: the per-stage transforms ``S_k`` (same domain).
        raw: per-stage network outputs (matrix/control parameters; dense fields ``(N, d, *shape)``
            in voxels of the network input, ``(x, y, z)`` channels), what refinement optimizes.
        warped: the moving image resampled through ``transform``, ``(N, C, *fixed_shape)``
            (``None`` when the forward pass was asked not to make it).
    """

    transform: Transform
    stages: list[ParametricTransform]
    raw: list[Tensor]
    warped: Tensor | None


class RegistrationNet(nn.Module):
    """Cascade of localization networks predicting ``T`` from a ``(moving, fixed)`` pair.

    Args:
        ndim: 2 or 3.
        stages: transform families in order, e.g. ``("affine", "svf")``.
        in_channels: channels of each image.
        encoder, decoder, final: U-Net widths of dense stages (see :class:`~stnreg.nets.UNet`).
        loc_channels, loc_features: localization CNN widths of matrix and control-point stages.
        loc_pool: cells per axis the localization CNN pools its features to (positions matter for
            registration, so not global pooling).
        control_points: control points per axis of ``tps`` / ``bspline`` stages.
        field_factor: dense fields live on a lattice this many times coarser than the input (a
            power of two: the U-Net's decoder stops that many levels early; 2 is VoxelMorph's
            choice in 3D, and several times faster).
        int_steps: scaling-and-squaring steps of ``svf`` stages.
        matrix_net: ``"cnn"`` (a localization CNN and a regression head, any matrix or
            control-point family) or ``"centroids"`` (``affine`` stages only:
            :class:`~stnreg.nets.centroids.CentroidAffine` with ``loc_features`` points and a
            feature U-Net of ``loc_channels`` widths).

    ``config`` holds these arguments, so ``RegistrationNet(**net.config)`` rebuilds the network.
    """

    def __init__(
        self,
        ndim: int = 2,
        stages: Sequence[str] = ("svf",),
        in_channels: int = 1,
        encoder: Sequence[int] = (16, 32, 32, 32),
        decoder: Sequence[int] = (32, 32, 32, 32),
        final: Sequence[int] = (32, 16),
        loc_channels: Sequence[int] = (16, 32, 64, 64),
        loc_features: int = 64,
        control_points: int = 5,
        field_factor: int = 1,
        int_steps: int = 7,
        loc_pool: int = 4,
        matrix_net: str = "cnn",
    ) -> None:
        super().__init__()
        check_ndim(ndim)
        if matrix_net not in ("cnn", "centroids"):
            raise ValueError(f"matrix_net must be 'cnn' or 'centroids', got {matrix_net!r}")
        stages = [str(s).lower() for s in stages]
        if not stages:
            raise ValueError("a registration network needs at least one stage")
        for s in stages:
            if s not in MATRIX + CONTROL + DENSE:
                raise ValueError(f"unknown stage {s!r}; choose from {', '.join(MATRIX + CONTROL + DENSE)}")
        if field_factor < 1 or field_factor & (field_factor - 1):
            raise ValueError(f"field_factor must be a power of two, got {field_factor}")
        self.config = {
            "ndim": ndim,
            "stages": stages,
            "in_channels": in_channels,
            "encoder": list(encoder),
            "decoder": list(decoder),
            "final": list(final),
            "loc_channels": list(loc_channels),
            "loc_features": loc_features,
            "control_points": control_points,
            "field_factor": field_factor,
            "int_steps": int_steps,
            "loc_pool": loc_pool,
            "matrix_net": matrix_net,
        }
        self.ndim, self.stages, self.field_factor, self.int_steps = ndim, stages, field_factor, int_steps
        self.nets = nn.ModuleList()
        self.templates: list[ParametricTransform | None] = []
        for s in stages:
            if s in DENSE:
                level = field_factor.bit_length() - 1
                self.nets.append(UNet(2 * in_channels, ndim, ndim, encoder, decoder, final, out_level=level))
                self.templates.append(None)
                continue
            if matrix_net == "centroids":
                if s != "affine":
                    raise ValueError(f"matrix_net='centroids' predicts affine stages only, not {s!r}")
                self.nets.append(CentroidAffine(ndim, in_channels, loc_features, loc_channels))
                self.templates.append(FAMILIES[s](ndim))
                continue
            if s in MATRIX:
                template: ParametricTransform = FAMILIES[s](ndim)
            elif s == "tps":
                template = ThinPlateSpline(uniform_control_points((control_points,) * ndim))
            else:
                template = BSpline((control_points + 3,) * ndim)
            loc = LocalizationCNN(2 * in_channels, ndim, tuple(loc_channels), loc_features, loc_pool)
            self.nets.append(nn.Sequential(loc, identity_head(loc_features, template)))
            self.templates.append(template)

    def stage_transform(self, k: int, raw: Tensor, input_shape: Sequence[int]) -> ParametricTransform:
        """Stage ``k``'s transform from its raw output (see :class:`RegistrationOutput`)."""
        template = self.templates[k]
        if template is not None:
            return template.with_params(raw.reshape(raw.shape[0], *template.param_shape))
        # Voxels of the input to normalized units: 2 / size along each (x, y, z) axis.
        per_voxel = torch.tensor([2.0 / s for s in reversed(input_shape)], dtype=raw.dtype, device=raw.device)
        field = raw * per_voxel.reshape(1, -1, *([1] * self.ndim))
        if self.stages[k] == "svf":
            return StationaryVelocity(field.shape[2:], params=field, steps=self.int_steps)
        return Displacement(field.shape[2:], params=field)

    def _raw(self, k: int, moving: Tensor, fixed: Tensor) -> Tensor:
        return self.nets[k](torch.cat([moving, fixed], 1))

    def forward(self, moving: Tensor, fixed: Tensor, warp_output: bool = True) -> RegistrationOutput:
        """Register ``moving`` ``(N, C, *spatial)`` to ``fixed`` (same shape).

        ``warp_output=False`` skips the last resampling (inference that warps the original image
        in world space anyway); intermediate stages still see their warped input.
        """
        if moving.shape != fixed.shape or moving.dim() != self.ndim + 2:
            raise ValueError(
                f"a {self.ndim}D registration network needs moving and fixed of one shape (N, C, *spatial), "
                f"got {tuple(moving.shape)} and {tuple(fixed.shape)}"
            )
        shape = tuple(fixed.shape[2:])
        raws: list[Tensor] = []
        stages: list[ParametricTransform] = []
        total: Transform | None = None
        warped = moving
        for k in range(len(self.stages)):
            raw = self._raw(k, warped, fixed)
            s = self.stage_transform(k, raw, shape)
            raws.append(raw)
            stages.append(s)
            total = s if total is None else total.compose(s)
            if warp_output or k < len(self.stages) - 1:
                warped = self.warp(moving, total)
        return RegistrationOutput(total, stages, raws, warped if warp_output else None)

    def compose(self, raws: Sequence[Tensor], shape: Sequence[int]) -> tuple[Transform, list[ParametricTransform]]:
        """The total transform (and stages) from raw outputs, for refinement."""
        stages = [self.stage_transform(k, r, shape) for k, r in enumerate(raws)]
        total: Transform = stages[0]
        for s in stages[1:]:
            total = total.compose(s)
        return total, stages

    @staticmethod
    def warp(image: Tensor, transform: Transform, mode: str = "linear") -> Tensor:
        """``image`` ``(N, C, *spatial)`` resampled through a normalized-domain transform (border padding)."""
        coords = transform.sampling_grid(tuple(image.shape[2:]))
        return sample(image, coords.to(image.dtype), mode, "border")
