"""Pipeline stages: which transform family, on which pyramid levels, with which solver and loss.

A pipeline is a ``+``-joined list of families, e.g. ``"rigid+affine+svf"``; each becomes a
:class:`Stage` whose unset fields take the family's defaults (:data:`DEFAULTS`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

__all__ = ["DEFAULTS", "DEFORMABLE", "MATRIX", "Stage", "levels", "parse_pipeline", "stage_loss"]

MATRIX = ("translation", "rigid", "similarity", "affine", "projective")
DEFORMABLE = ("syn", "svf", "displacement", "bspline", "tps")


@dataclass
class Stage:
    """One stage of a pipeline; ``None`` fields take per-family defaults (see :data:`DEFAULTS`).

    Attributes:
        family: a transform family (:data:`MATRIX` or :data:`DEFORMABLE`).
        shrink: pyramid factors, coarse to fine (``(4, 2, 1)``: quarter, half, full resolution).
        iterations: per level, the most iterations (a cap: ``tol`` ends a level sooner).
        solver: ``"lbfgs"`` (matrix stages: L-BFGS, per-pair line search), ``"adam"`` (parametric
            fields; matrix stages too), ``"greedy"`` (``syn``: symmetric greedy diffeomorphic updates).
        loss: the stage's similarity; ``None``: the pipeline's loss, except that matrix stages use the
            global ``"ncc"`` where the pipeline's loss is ``"lncc"`` (as ANTs' linear stages use a
            global metric), and ``"mi"`` stays ``"mi"``.
        tol: convergence: with L-BFGS (matrix stages) a level ends once an update moves no point of
            the fixed image by more than ``tol`` voxels of the level; with Adam and ``syn``, once the
            best loss gained less than ``tol`` (relative) over the last 10 iterations.
        lr: step size: Adam's learning rate (matrix stages: in half-extents of the fixed image
            per iteration, rotations in radians; fields: in voxels), or the greedy step of ``syn``
            in voxels of the level.
        smooth: ``svf``/``displacement``: Gaussian preconditioner sigma in field voxels; ``syn``: the
            sigma of its update (gradient) field, in voxels of the level.
        smooth_total: ``syn`` only: sigma of the Gaussian applied to each total field after an update.
        field_factor: dense fields live on ``field_factor`` x the level's spacing.
        control_spacing: ``bspline``/``tps``: control point spacing in voxels of the fixed image.
        interpolation: matrix stages on the reference path: how the moving image is read,
            ``"linear"`` or ``"cubic"`` (B-spline, :mod:`stnreg.cubic`). ``None``: ``"cubic"`` in 2D,
            where linear interpolation biased an exact subpixel shift by 0.025 px and 16 taps cost
            little, ``"linear"`` in 3D (the fused trilinear kernels; 3D exact transforms are recovered
            to 0.01 mm with it).
    """

    family: str
    shrink: tuple[int, ...] | None = None
    iterations: tuple[int, ...] | None = None
    solver: str | None = None
    loss: str | None = None
    tol: float | None = None
    lr: float | None = None
    smooth: float | None = None
    smooth_total: float | None = None
    field_factor: int | None = None
    control_spacing: float | None = None
    interpolation: str | None = None


# Matrix stages run L-BFGS to convergence (``tol`` 0.001 voxel); the iteration cap is a safety net
# that a converging level does not reach. Field stages run Adam with (80, 50, 20) iterations at most,
# measured on the prostate tuning pairs to halve the time of (150, 100, 50) for 0.01 less Dice.
_MATRIX = {"shrink": (4, 2, 1), "iterations": (300, 300, 300), "solver": "lbfgs", "tol": 1e-3}
_FIELD = {"shrink": (4, 2, 1), "iterations": (80, 50, 20), "solver": "adam", "tol": 1e-3}
DEFAULTS: dict[str, dict[str, Any]] = {
    "translation": {**_MATRIX, "lr": 0.01},
    "rigid": {**_MATRIX, "lr": 0.01},
    "similarity": {**_MATRIX, "lr": 0.01},
    "affine": {**_MATRIX, "lr": 0.005},
    "projective": {**_MATRIX, "lr": 0.002},
    "syn": {
        "shrink": (4, 2, 1),
        "iterations": (100, 70, 30),
        "solver": "greedy",
        "tol": 5e-3,
        "lr": 0.25,
        "smooth": 3.0,
        "smooth_total": 0.5,
    },
    "svf": {**_FIELD, "lr": 0.2, "smooth": 1.0, "field_factor": 2},
    "displacement": {**_FIELD, "lr": 0.2, "smooth": 1.0, "field_factor": 1},
    "bspline": {**_FIELD, "lr": 0.2, "control_spacing": 8.0},
    "tps": {**_FIELD, "lr": 0.2, "control_spacing": 16.0},
}
# Default pyramids skip the full-resolution level above this many voxels (a 1 mm brain has 7M):
# 12 matrix parameters are pinned down at half resolution, and a dense field (field_factor 2 of
# the level) then ends at 4-voxel spacing. Pass an explicit Stage(shrink=(4, 2, 1)) to keep the
# full level.
FULL_RES_MAX_VOXELS = 2_000_000


def stage_loss(stage: Stage, loss: str, linear_loss: str | None = None) -> str:
    """The similarity a stage optimizes, given the pipeline's ``loss`` (see :attr:`Stage.loss`);
    ``linear_loss``, when given, is the matrix stages' default instead of the rule there."""
    if stage.loss is not None:
        return stage.loss
    if stage.family in MATRIX:
        if linear_loss is not None:
            return linear_loss
        return "ncc" if loss == "lncc" else loss
    return loss


def levels(stage: Stage, shape: Sequence[int]) -> list[tuple[int, int]]:
    """(shrink factor, iterations) pairs for an image of array ``shape``, dropping levels that do not fit.

    Levels whose coarsest axis would fall below 12 voxels go (a user-given ``shrink`` is kept as
    given apart from that); a default pyramid drops full resolution for very large images.
    """
    pairs = list(zip(stage.shrink, stage.iterations, strict=True))
    fit = [(f, n) for f, n in pairs if min(shape) / f >= 12] or [min(pairs, key=lambda x: x[0])]
    if stage.shrink == DEFAULTS[stage.family]["shrink"] and math.prod(shape) > FULL_RES_MAX_VOXELS:
        fit = [(f, n) for f, n in fit if f > 1] or fit
    return fit


def parse_pipeline(transform: str | Sequence[str | Stage]) -> list[Stage]:
    """``"rigid+affine+svf"`` (or a list of names / :class:`Stage`) into validated stages."""
    items = transform.split("+") if isinstance(transform, str) else list(transform)
    stages = [s if isinstance(s, Stage) else Stage(str(s).strip().lower()) for s in items]
    if not stages:
        raise InputError("empty transform pipeline")
    seen_deformable = False
    for s in stages:
        if s.family not in DEFAULTS:
            raise InputError(f"unknown transform {s.family!r}; choose from {', '.join(DEFAULTS)} joined by '+'")
        if seen_deformable:
            raise InputError(f"{s.family!r} after a deformable stage: the deformable stage must come last")
        seen_deformable = s.family in DEFORMABLE
        for key, value in DEFAULTS[s.family].items():
            if getattr(s, key) is None:
                setattr(s, key, value)
        if len(s.shrink) != len(s.iterations):
            raise InputError(f"stage {s.family}: shrink {s.shrink} and iterations {s.iterations} differ in length")
        allowed = ("greedy",) if s.family == "syn" else ("lbfgs", "adam") if s.family in MATRIX else ("adam",)
        if s.solver not in allowed:
            raise InputError(f"stage {s.family}: solver must be one of {', '.join(allowed)}, got {s.solver!r}")
        if s.interpolation not in (None, "linear", "cubic"):
            raise InputError(f"stage {s.family}: interpolation must be 'linear' or 'cubic', got {s.interpolation!r}")
        if s.tol < 0:
            raise InputError(f"stage {s.family}: tol must be >= 0, got {s.tol}")
    return stages
