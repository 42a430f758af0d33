"""Each stage's transform family and the variables a solver moves.

Solvers see ``raw`` variables of comparable size: the family's parameters are
``params = identity + scale * raw`` (fields through a Gaussian preconditioner). Matrix families are
scaled so that one raw unit moves a point at the fixed image's half-extent by about one voxel
(translations in voxels, rotations and linear entries in voxels per half-extent), so a parameter
step's size reads as a displacement in voxels; field parameters are in voxels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..coords import Grid, apply_affine
from ..pyramid import level_shape
from ..sampler import gaussian_blur
from ..transforms import FAMILIES
from ..transforms.base import Composite, ParametricTransform, Transform
from ..transforms.bspline import BSpline
from ..transforms.dense import Displacement, StationaryVelocity
from ..transforms.tps import ThinPlateSpline
from .stages import MATRIX, Stage

__all__ = ["field_for_regularizer", "item", "make_stage_transform", "params_from_raw", "refine_field", "scale_for"]


def scale_for(t: ParametricTransform, extent: float, voxel: float) -> Tensor:
    """Per-parameter units (``t.param_shape``): matrix families in voxels of displacement at the
    half-``extent`` (mm), field and point parameters in voxels (``voxel`` mm); each family's
    :meth:`~stnreg.transforms.ParametricTransform.param_scale`."""
    return t.param_scale(extent, voxel)


def make_stage_transform(stage: Stage, grid: Grid, center: Tensor, voxel: float, level: int = 1) -> ParametricTransform:
    """The stage's transform family; dense fields live on ``field_factor`` x the pyramid ``level``'s
    spacing, so that coarse levels optimize (and integrate) coarse fields."""
    d = grid.ndim
    if stage.family in MATRIX:
        return FAMILIES[stage.family](d, center=center)
    if stage.family in ("svf", "displacement"):
        g = grid.with_shape(level_shape(grid.shape, stage.field_factor * level))
        cls = StationaryVelocity if stage.family == "svf" else Displacement
        return cls(g.shape, domain=g.world_to_normalized())
    # Control point families use the finest fixed grid: control spacing in voxels of it.
    if stage.family == "bspline":
        return BSpline.for_grid(grid, stage.control_spacing)
    n = [max(2, round(s / stage.control_spacing)) + 1 for s in grid.shape]
    cp_norm = torch.stack(
        torch.meshgrid(*[torch.linspace(-1, 1, k, dtype=torch.float64) for k in n], indexing="ij")[::-1], -1
    ).reshape(-1, d)
    cp = apply_affine(grid.normalized_to_world(), cp_norm * 0.95)
    return ThinPlateSpline(cp.float())


def refine_field(
    family: Displacement, raw: Tensor, stage: Stage, grid: Grid, center: Tensor, voxel: float, level: int, n: int
) -> tuple[Displacement, Tensor, Tensor, Tensor]:
    """The dense field family of pyramid ``level`` and its optimization variables, carried over from
    the previous level by linear interpolation (vectors are in mm, so their values carry as they are)."""
    new = make_stage_transform(stage, grid, center.float(), voxel, level).to(raw.device)
    if new.shape != family.shape:
        mode = "bilinear" if len(new.shape) == 2 else "trilinear"
        raw = F.interpolate(raw.detach(), size=new.shape, mode=mode, align_corners=False).requires_grad_()
        family = new
    scale = scale_for(family, 1.0, voxel).to(raw.device, torch.float32)
    return family, raw, scale, family.identity_params(n).to(raw.device)


def field_for_regularizer(t: ParametricTransform, params: Tensor) -> Tensor | None:
    """What the regularizers see, ``(N, d, *shape)``: a velocity/displacement in voxels of its grid, or
    B-spline coefficients in control spacings; ``None`` for TPS, smooth by construction (each
    family's :meth:`~stnreg.transforms.ParametricTransform.regularizer_field`)."""
    return t.regularizer_field(params)


def item(t: Transform, i: int) -> Transform:
    """Batch item ``i`` of a (possibly composite) transform."""
    if isinstance(t, Composite):
        return Composite([item(x, i) for x in t.transforms])
    if isinstance(t, ParametricTransform):
        return t.with_params(t.params[i : i + 1])
    raise TypeError(f"cannot take a batch item of {type(t).__name__}")


def params_from_raw(raw: Tensor, scale: Tensor, init: Tensor, family: ParametricTransform, stage: Stage) -> Tensor:
    """Scaled raw variables to family parameters; fields through a Gaussian preconditioner."""
    step = raw * scale
    if family.lattice_field and stage.smooth:
        # On the CPU: the blur reads sigma's largest value on the host, which on a GPU would wait
        # for the device every iteration.
        sigma = torch.full((1, family.ndim), float(stage.smooth), dtype=raw.dtype)
        step = gaussian_blur(step, sigma, "border")
    return init + step
