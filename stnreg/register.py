"""Pairwise registration by instance optimization, in world coordinates.

``register(moving, fixed, transform="rigid+affine+svf", loss="lncc")`` optimizes a staged pipeline
of transform families on a multi-resolution pyramid. Every stage maps fixed-space world points
(mm) to moving-space world points; the result lives on the fixed image's grid, whatever the two
images' grids, spacings and orientations.

Staging: each stage ``S_k`` starts at the identity and is composed after the frozen product of the
previous stages, ``T_k = T_{k-1} ∘ S_k``. Matrix stages fold into one matrix ``M``; the deformable
stage (at most one, last) gives ``T = M ∘ φ`` with ``φ`` defined on the fixed grid, exactly an ITK
``CompositeTransform`` with ``M`` added first and ``φ`` second. The first matrix stage rotates
about the fixed image's centre of mass and starts from a centre-of-mass (or principal-moments)
alignment.

Parameters are optimized with Adam in scaled units, so that one learning rate fits each family:
matrix translations in fractions of the fixed image's half-extent, rotations in radians, field
parameters in voxels. Fields are parameterized through a Gaussian smoothing of the raw variables
(a preconditioner, as SyN smooths its updates).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .coords import Grid, apply_affine, index_to_normalized_matrix, lattice
from .fast import fused_affine_loss, fused_available
from .fields import world_to_voxel_displacement
from .image import Image, as_image
from .losses import REGULARIZERS, SIMILARITIES, dice_loss
from .sampler import gaussian_blur, sample
from .transforms import FAMILIES
from .transforms.base import Composite, ParametricTransform, Transform, clear_lattice_cache
from .transforms.bspline import BSpline
from .transforms.dense import Displacement, StationaryVelocity
from .transforms.matrix import Affine, MatrixTransform, Projective
from .transforms.tps import ThinPlateSpline
from .warp import apply, warp

__all__ = ["RegistrationResult", "Stage", "parse_pipeline", "register", "register_many"]

MATRIX = ("translation", "rigid", "similarity", "affine", "projective")
DEFORMABLE = ("svf", "displacement", "bspline", "tps")


@dataclass
class Stage:
    """One stage of a pipeline; ``None`` fields take per-family defaults (see :data:`DEFAULTS`)."""

    family: str
    shrink: tuple[int, ...] | None = None
    iterations: tuple[int, ...] | None = None
    lr: float | None = None
    smooth: float | None = None
    field_factor: int | None = None
    control_spacing: float | None = None


# Iterations per pyramid level (coarse to fine), at most: early stopping (``tol``) may end a level
# sooner. Measured on the prostate pairs to halve the time of (150, 60, 30) / (150, 100, 50) for
# 0.01 less Dice.
_MATRIX_LEVELS = {"shrink": (4, 2, 1), "iterations": (80, 40, 20)}
_FIELD_LEVELS = {"shrink": (4, 2, 1), "iterations": (80, 50, 20)}
DEFAULTS: dict[str, dict[str, Any]] = {
    "translation": {**_MATRIX_LEVELS, "lr": 0.01},
    "rigid": {**_MATRIX_LEVELS, "lr": 0.01},
    "similarity": {**_MATRIX_LEVELS, "lr": 0.01},
    "affine": {**_MATRIX_LEVELS, "lr": 0.005},
    "projective": {**_MATRIX_LEVELS, "lr": 0.002},
    "svf": {**_FIELD_LEVELS, "lr": 0.2, "smooth": 1.0, "field_factor": 2},
    "displacement": {**_FIELD_LEVELS, "lr": 0.2, "smooth": 1.0, "field_factor": 1},
    "bspline": {**_FIELD_LEVELS, "lr": 0.2, "control_spacing": 8.0},
    "tps": {**_FIELD_LEVELS, "lr": 0.2, "control_spacing": 16.0},
}
# Default pyramids skip the full-resolution level above this many voxels (a 1 mm brain has 7M):
# 12 matrix parameters are pinned down at half resolution, and a dense field (field_factor 2 of
# the level) then ends at 4-voxel spacing, which reached Dice 0.965 against 0.975 with the full
# level on the synthetic brain warps of benchmarks/pairwise.py at a fifth of the time. Pass an
# explicit Stage(shrink=(4, 2, 1)) to keep the full level.
FULL_RES_MAX_VOXELS = 2_000_000
# Early stopping looks at the best loss's relative gain over this many iterations (see ``tol``).
PATIENCE = 10


def _levels(stage: Stage, shape: Sequence[int]) -> list[tuple[int, int]]:
    """(shrink factor, iterations) pairs for an image of ``shape``, dropping levels that do not fit.

    Levels whose coarsest axis would fall below 12 voxels go (a user-given ``shrink`` is kept as
    given apart from that); a default pyramid drops full resolution for very large images.
    """
    levels = list(zip(stage.shrink, stage.iterations, strict=True))
    fit = [(f, n) for f, n in levels if min(shape) / f >= 12] or [min(levels, key=lambda x: x[0])]
    if stage.shrink == DEFAULTS[stage.family]["shrink"] and math.prod(shape) > FULL_RES_MAX_VOXELS:
        fit = [(f, n) for f, n in fit if f > 1] or fit
    return fit


def parse_pipeline(transform: str | Sequence[str | Stage]) -> list[Stage]:
    """``"rigid+affine+svf"`` (or a list of names / :class:`Stage`) into validated stages."""
    items = transform.split("+") if isinstance(transform, str) else list(transform)
    stages = [s if isinstance(s, Stage) else Stage(str(s).strip().lower()) for s in items]
    if not stages:
        raise ValueError("empty transform pipeline")
    seen_deformable = False
    for s in stages:
        if s.family not in DEFAULTS:
            raise ValueError(f"unknown transform {s.family!r}; choose from {', '.join(DEFAULTS)} joined by '+'")
        if seen_deformable:
            raise ValueError(f"{s.family!r} after a deformable stage: the deformable stage must come last")
        seen_deformable = s.family in DEFORMABLE
        for key, value in DEFAULTS[s.family].items():
            if getattr(s, key) is None:
                setattr(s, key, value)
        if len(s.shrink) != len(s.iterations):
            raise ValueError(f"stage {s.family}: shrink {s.shrink} and iterations {s.iterations} differ in length")
    return stages


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
            from .report import evaluate

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
        with torch.no_grad():
            pts = self.fixed.grid.points("world", torch.float64)
            mapped = self.deformable.mapped_lattice(self.fixed.grid).double()[0]
            return torch.movedim(mapped - pts, -1, 0).float()

    def save(self, out_dir: str | os.PathLike, protect: Sequence[str | os.PathLike] = (), suffix: str | None = None):
        """Write warped image, transform files, report and QC figure; see :func:`stnreg.report.save_result`."""
        from .report import save_result

        return save_result(self, out_dir, protect=protect, suffix=suffix)


def _load(x: Image | Tensor | np.ndarray | str | os.PathLike, what: str, label: bool = False) -> Image:
    if isinstance(x, (str, os.PathLike)):
        from .io import read_image

        return read_image(x, label=label)
    return as_image(x, name=what)


def _gray(img: Image) -> Tensor:
    data = img.data.float().mean(0, keepdim=True)
    if not bool(torch.isfinite(data).all()):
        raise ValueError(f"{img.name}: contains NaN or infinite values")
    if float(data.max() - data.min()) <= 0:
        raise ValueError(f"{img.name}: the image is constant ({float(data.min()):g} everywhere); nothing to register")
    return data


def _robust_range(*images: Tensor) -> tuple[float, float]:
    """0.5th and 99.5th percentiles over the given images (a sample of 2M voxels at most)."""
    flat = torch.cat([im.flatten() for im in images])
    if flat.numel() > 2_000_000:
        flat = flat[torch.randint(0, flat.numel(), (2_000_000,), generator=torch.Generator().manual_seed(0))]
    lo, hi = torch.quantile(flat, torch.tensor([0.005, 0.995])).tolist()
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        lo, hi = float(flat.min()), float(flat.max())
    return lo, hi


def _intensities(moving: Image, fixed: Image, joint: bool) -> tuple[Tensor, Tensor]:
    """Channel means scaled to [0, 1] by robust percentiles, ``(1, 1, *spatial)`` each.

    ``joint`` uses one range for both (MSE assumes comparable intensities, and separate ranges
    would bias its optimum); otherwise each image gets its own (NCC, LNCC and MI do not care).
    """
    m, f = _gray(moving), _gray(fixed)
    if joint:
        rm = rf = _robust_range(m, f)
    else:
        rm, rf = _robust_range(m), _robust_range(f)
    return tuple(((x - lo) / (hi - lo)).clamp(0, 1).unsqueeze(0) for x, (lo, hi) in ((m, rm), (f, rf)))


def _world_moments(img: Tensor, grid: Grid) -> tuple[Tensor, Tensor]:
    """Intensity-weighted world centroid ``(d,)`` and covariance ``(d, d)`` (mm²) of a ``(1, 1, *spatial)`` image.

    Computed in index space from marginal sums (one- and two-axis), then mapped to world by the
    grid's affine (centroid ``A c + o``, covariance ``A C Aᵀ``): no per-voxel array of world points.
    """
    w = img[0, 0].double()
    d = w.dim()
    total = w.sum()
    # Array axis a holds index component d - 1 - a (points are (x, y, z) ordered).
    ranges = [torch.arange(n, dtype=torch.float64, device=w.device) for n in w.shape]
    marginals = [w.sum(dim=[o for o in range(d) if o != a]) for a in range(d)]
    mean = torch.stack([(marginals[a] * ranges[a]).sum() / total for a in range(d)]).flip(0)
    centred = [ranges[a] - mean[d - 1 - a] for a in range(d)]
    cov = torch.zeros(d, d, dtype=torch.float64, device=w.device)
    for a in range(d):
        cov[d - 1 - a, d - 1 - a] = (marginals[a] * centred[a].square()).sum() / total
        for b in range(a + 1, d):
            rest = [o for o in range(d) if o not in (a, b)]
            pair = w.sum(dim=rest) if rest else w
            value = (pair * centred[a][:, None] * centred[b][None, :]).sum() / total
            cov[d - 1 - a, d - 1 - b] = cov[d - 1 - b, d - 1 - a] = value
    m = grid.index_to_world(device=w.device)
    lin = m[:d, :d]
    return lin @ mean + m[:d, d], lin @ cov @ lin.T


def _principal_axes(cov: Tensor) -> Tensor:
    """Principal axes (columns, descending variance) of a covariance ``(d, d)``."""
    _, vecs = torch.linalg.eigh(cov)
    return vecs.flip(1)


def _initial_matrix(fixed: Tensor, fgrid: Grid, moving: Tensor, mgrid: Grid, init: str) -> tuple[Tensor, Tensor]:
    """Homogeneous initial map (fixed -> moving world) and the fixed centre of mass."""
    d = fgrid.ndim
    (cf, cov_f), (cm, cov_m) = _world_moments(fixed, fgrid), _world_moments(moving, mgrid)
    m = torch.eye(d + 1, dtype=torch.float64)
    if init == "none":
        return m, cf
    if init not in ("com", "moments"):
        raise ValueError(f"init must be 'com', 'moments' or 'none', got {init!r}")
    rot = torch.eye(d, dtype=torch.float64)
    if init == "moments":
        vf, vm = _principal_axes(cov_f), _principal_axes(cov_m)
        # Eigenvector signs are arbitrary: pick those that keep the rotation closest to the identity.
        vm = vm * torch.sign((vm * vf).sum(0)).clamp(min=-1, max=1).masked_fill((vm * vf).sum(0) == 0, 1)
        rot = vm @ vf.T
        if torch.linalg.det(rot) < 0:
            vm[:, -1] = -vm[:, -1]
            rot = vm @ vf.T
    m[:d, :d] = rot
    m[:d, d] = cm - rot @ cf
    return m, cf


def _scale_for(t: ParametricTransform, extent: float, voxel: float) -> Tensor:
    """Per-parameter units: translations in half-extents, field/point parameters in voxels, the rest as is."""
    scale = torch.ones(t.param_shape, dtype=torch.float64)
    d = t.ndim
    name = type(t).__name__
    if name in ("Translation", "Rigid", "Similarity", "Attention"):
        scale[-d:] = extent
    elif name == "Affine":
        scale[:, d] = extent
    elif name == "Projective":
        for i in range(d):
            scale[i * (d + 1) + d] = extent
        scale[d * (d + 1) :] = 1.0 / extent
    else:
        scale[:] = voxel
    return scale


def _level_shape(shape: Sequence[int], factor: int) -> tuple[int, ...]:
    return tuple(max(4, math.ceil(s / factor)) for s in shape)


class _Pyramid:
    """Anti-aliased levels of one image ``(N, C, *shape)`` keeping the world extent, made once per
    registration and each from the next finer level: halving a level blurs a quarter of the
    voxels that blurring the full image would (2.6 s less per stage on a 1 mm brain)."""

    def __init__(self, img: Tensor, grid: Grid) -> None:
        self.grid = grid
        self.levels: dict[int, tuple[Tensor, Grid]] = {1: (img, grid)}

    def __call__(self, factor: int) -> tuple[Tensor, Grid]:
        if factor not in self.levels:
            finer = factor // 2 if factor % 2 == 0 else 1
            img = self(finer)[0]
            shape = _level_shape(self.grid.shape, factor)
            coords = lattice(shape, dtype=img.dtype, device=img.device).unsqueeze(0)
            out = sample(img, coords, "linear", "border", antialias=True)
            self.levels[factor] = (out, self.grid.with_shape(shape))
        return self.levels[factor]


def _make_stage_transform(
    stage: Stage, grid: Grid, center: Tensor, voxel: float, level: int = 1
) -> ParametricTransform:
    """The stage's transform family; dense fields live on ``field_factor`` x the pyramid ``level``'s
    spacing, so that coarse levels optimize (and integrate) coarse fields."""
    d = grid.ndim
    if stage.family in MATRIX:
        return FAMILIES[stage.family](d, center=center)
    if stage.family in ("svf", "displacement"):
        g = grid.with_shape(_level_shape(grid.shape, stage.field_factor * level))
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


def _refine_field(
    family: Displacement, raw: Tensor, stage: Stage, grid: Grid, center: Tensor, voxel: float, level: int, n: int
) -> tuple[Displacement, Tensor, Tensor, Tensor]:
    """The dense field family of pyramid ``level`` and its optimization variables, carried over from
    the previous level by linear interpolation (vectors are in mm, so their values carry as they are)."""
    new = _make_stage_transform(stage, grid, center.float(), voxel, level).to(raw.device)
    if new.shape != family.shape:
        mode = "bilinear" if len(new.shape) == 2 else "trilinear"
        raw = F.interpolate(raw.detach(), size=new.shape, mode=mode, align_corners=False).requires_grad_()
        family = new
    scale = _scale_for(family, 1.0, voxel).to(raw.device, torch.float32)
    return family, raw, scale, family.identity_params(n).to(raw.device)


def _field_for_regularizer(t: ParametricTransform, params: Tensor) -> Tensor | None:
    """What the regularizers see, ``(N, d, *shape)``: a velocity/displacement in voxels of its grid, or
    B-spline coefficients in control spacings; ``None`` for TPS, smooth by construction."""
    if isinstance(t, Displacement):
        inv = torch.linalg.inv(t.domain.to(params.device))
        # The field's own index->world map: normalized->world composed with index->normalized.
        idx_to_world = inv @ index_to_normalized_matrix(t.shape, device=params.device)
        return world_to_voxel_displacement(params, idx_to_world)
    if isinstance(t, BSpline):
        # Coefficients (mm) over the control spacing (mm): the bending energy becomes unitless, so
        # one weight suits a 1 mm brain with 8 mm spacing and a 0.4 mm prostate with 3.2 mm. In mm,
        # the default weight 1.0 held the brain at Dice 0.923 (0.968 at 0.01) and the prostate
        # pairs at 0.782 (0.843 at 0.1); scaled, weight 1.0 gives both their better value.
        lin = t.domain[: t.ndim, : t.ndim].to(params.device)
        steps = [2.0 / (n - 3) for n in reversed(t.control_shape)]  # x, y, z, in normalized units
        spacing_mm = torch.tensor(steps, dtype=lin.dtype, device=params.device) / lin.norm(dim=1)
        return params / spacing_mm.prod() ** (1.0 / t.ndim)
    return None


def register(
    moving: Image | Tensor | np.ndarray | str | os.PathLike,
    fixed: Image | Tensor | np.ndarray | str | os.PathLike,
    transform: str | Sequence[str | Stage] = "rigid+affine+svf",
    loss: str = "lncc",
    *,
    labels: tuple[Any, Any] | None = None,
    **kwargs: Any,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; the result lives on the fixed grid.

    Args:
        moving, fixed: file paths, :class:`Image` objects, or arrays/tensors (1 mm voxels at the
            origin). Grids, spacings and orientations may differ; both must be 2D or both 3D.
        transform: ``+``-joined stages, e.g. ``"rigid+affine+svf"``, ``"affine+bspline"``,
            ``"tps"``, or :class:`Stage` objects for custom pyramids and iterations.
        loss: ``"mse"``, ``"ncc"``, ``"lncc"`` (``window`` in voxels, or mm with ``window_mm``),
            ``"mi"`` (``bins``; for multi-modal pairs).
        labels: ``(moving_labels, fixed_labels)`` label maps (first channel used); used for Dice
            and HD95 metrics, and for a Dice loss when ``dice_weight > 0``.
        **kwargs: the keyword options of :func:`register_many` (``window``, ``regularization``,
            ``fixed_mask``, ``init``, ``device``, ...).
    """
    return register_many([moving], [fixed], transform, loss, labels=None if labels is None else [labels], **kwargs)[0]


def _item(t: Transform, i: int) -> Transform:
    """Batch item ``i`` of a (possibly composite) transform."""
    if isinstance(t, Composite):
        return Composite([_item(x, i) for x in t.transforms])
    if isinstance(t, ParametricTransform):
        return t.with_params(t.params[i : i + 1])
    raise TypeError(f"cannot take a batch item of {type(t).__name__}")


def register_many(
    movings: Sequence[Image | Tensor | np.ndarray | str | os.PathLike],
    fixeds: Sequence[Image | Tensor | np.ndarray | str | os.PathLike],
    transform: str | Sequence[str | Stage] = "rigid+affine+svf",
    loss: str = "lncc",
    *,
    window: int | float = 9,
    window_mm: bool = False,
    bins: int = 32,
    regularization: dict[str, float] | None = None,
    labels: Sequence[tuple[Any, Any] | None] | None = None,
    dice_weight: float = 0.0,
    fixed_mask: Any = None,
    init: str = "com",
    initial_matrix: Tensor | None = None,
    initial_deformable: Transform | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    seed: int = 0,
    tol: float = 1e-3,
) -> list[RegistrationResult]:
    """Register ``N`` pairs in one batched optimization; all fixed images share one grid, and all
    moving images another (the usual case for a preprocessed dataset or an atlas).

    Each pair keeps its own parameters (Adam updates every parameter independently), so the
    results equal ``N`` separate registrations up to early stopping, which watches the batch mean.

    Args:
        window: LNCC window in voxels (odd), or mm with ``window_mm``.
        bins: histogram bins of ``"mi"``.
        regularization: weights of ``"diffusion"``, ``"bending"``, ``"folding"`` on the deformable
            stage (defaults: diffusion 0.5 for svf/displacement, bending 1.0 for bspline, on its
            coefficients in units of the control spacing; TPS takes none).
        labels: per pair ``(moving_labels, fixed_labels)`` or ``None``.
        dice_weight: weight of a Dice loss on the labels (labels present in every pair).
        fixed_mask: optional mask on the fixed grid restricting the similarity.
        init: ``"com"`` (centres of mass), ``"moments"`` (principal axes too) or ``"none"``.
        initial_matrix: a starting world map instead of ``init``, homogeneous ``(1 or N, d+1, d+1)``
            fixed -> moving (e.g. a network's prediction, refined here).
        initial_deformable: a world-space deformable map ``D`` kept fixed between the matrix part
            and the deformable stage: ``T = (M ∘ A) ∘ D ∘ φ`` with ``A`` the matrix stages; the
            result's deformable part is ``D ∘ φ``.
        device: ``"cpu"``, ``"cuda"``...; defaults to CUDA when available.
        progress: show a progress bar over stages, levels and iterations.
        seed: seed of the random sampling of ``"mi"``.
        tol: a level stops once its best loss improved by less than ``tol`` (relative) over the
            last ``PATIENCE`` iterations; ``0`` runs every iteration. On the synthetic brain warps of
            ``benchmarks/pairwise.py`` the half-resolution SVF level gains 1.2% in its first 10
            iterations and 0.05% per 10 after 25, while the prostate pairs still gain 0.3-0.8% at
            the end of theirs: 1e-3 stops the first early and runs the second to the end.
    """
    t_start = time.perf_counter()
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if len(movings) != len(fixeds) or not movings:
        raise ValueError(f"need as many moving as fixed images (got {len(movings)} and {len(fixeds)})")
    mov_imgs = [_load(m, "moving") for m in movings]
    fix_imgs = [_load(f, "fixed") for f in fixeds]
    for m, f in zip(mov_imgs, fix_imgs, strict=True):
        if m.ndim != f.ndim:
            raise ValueError(f"dimension mismatch: moving {m.name} is {m.ndim}D, fixed {f.name} is {f.ndim}D")
    for imgs, what in ((mov_imgs, "moving"), (fix_imgs, "fixed")):
        for other in imgs[1:]:
            if not other.grid.same_geometry(imgs[0].grid):
                raise ValueError(f"batched registration needs the {what} images on one grid: {other.name} differs")
    if loss not in SIMILARITIES:
        raise ValueError(f"loss must be one of {', '.join(SIMILARITIES)}, got {loss!r}")
    stages = parse_pipeline(transform)
    n = len(mov_imgs)
    mgrid, fgrid = mov_imgs[0].grid, fix_imgs[0].grid
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=dev).manual_seed(seed)
    pairs_int = [_intensities(m, f, joint=loss == "mse") for m, f in zip(mov_imgs, fix_imgs, strict=True)]
    m_int = torch.cat([p[0] for p in pairs_int]).to(dev)
    f_int = torch.cat([p[1] for p in pairs_int]).to(dev)
    fmask = None if fixed_mask is None else _load(fixed_mask, "fixed mask").batch(device=dev)
    if fmask is not None and tuple(fmask.shape[2:]) != fgrid.shape:
        raise ValueError(f"fixed mask shape {tuple(fmask.shape[2:])} does not match the fixed grid {fgrid.shape}")
    label_maps, label_ids = _load_labels(labels, mov_imgs, fix_imgs)
    sizes = zip(fgrid.spacing, reversed(fgrid.shape), strict=True)
    extent = float(np.mean([s * k / 2 for s, k in sizes]))
    voxel = float(np.mean(fgrid.spacing))
    win = max(3, round(window / voxel) | 1) if window_mm else int(window)
    sim = SIMILARITIES[loss]

    def similarity(a: Tensor, b: Tensor, mask: Tensor | None) -> Tensor:
        if loss == "lncc":
            return sim(a, b, window=win, mask=mask)
        if loss == "mi":
            return sim(a, b, bins=bins, mask=mask, generator=gen)
        return sim(a, b, mask=mask)

    inits = [_initial_matrix(f_int[i : i + 1].cpu(), fgrid, m_int[i : i + 1].cpu(), mgrid, init) for i in range(n)]
    m0 = torch.stack([x[0] for x in inits])
    center = torch.stack([x[1] for x in inits]).mean(0)
    d = fgrid.ndim
    if initial_matrix is not None:
        m0 = torch.as_tensor(initial_matrix, dtype=torch.float64).cpu()
        if m0.shape[-2:] != (d + 1, d + 1) or m0.shape[0] not in (1, n):
            raise ValueError(f"initial_matrix must be (1 or {n}, {d + 1}, {d + 1}), got {tuple(m0.shape)}")
        m0 = m0.expand(n, d + 1, d + 1)
    projective = bool((m0[:, d, :d].abs() > 1e-12).any())
    prefix: Transform = (Projective if projective else Affine).from_matrix(m0.float()).to(dev)
    fixed_part = None if initial_deformable is None else initial_deformable.to(dev)
    matrix_total = prefix
    deformable: Transform | None = None
    history: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    total_iters = sum(n for s in stages for _, n in _levels(s, fgrid.shape))
    bar = tqdm(total=total_iters, desc="register", unit="it", disable=not progress or None, leave=False)
    onehot_m = onehot_f = None
    if dice_weight > 0:
        common = sorted(set.intersection(*[set(ids) for ids in label_ids])) if all(label_maps) else []
        if not common:
            raise ValueError("dice_weight > 0 needs label maps for every pair with at least one common label")
        onehot_m = torch.stack([torch.stack([lm[0].data[0] == v for v in common]) for lm in label_maps]).float().to(dev)
        onehot_f = torch.stack([torch.stack([lm[1].data[0] == v for v in common]) for lm in label_maps]).float().to(dev)

    pyramids = {"fixed": _Pyramid(f_int, fgrid), "moving": _Pyramid(m_int, mgrid)}
    if fmask is not None:
        pyramids["mask"] = _Pyramid(fmask.float(), fgrid)
    if onehot_m is not None:
        pyramids["moving_labels"] = _Pyramid(onehot_m, mgrid)
        pyramids["fixed_labels"] = _Pyramid(onehot_f, fgrid)
    # Matrix stages with MSE/NCC in 3D run as one fused kernel pass per iteration (stnreg.fast).
    fused = loss in ("mse", "ncc") and fgrid.ndim == 3 and fmask is None and onehot_m is None
    fused = fused and fused_available(m_int, "border")
    for si, stage in enumerate(stages):
        t_stage = time.perf_counter()
        levels = _levels(stage, fgrid.shape)
        family = _make_stage_transform(stage, fgrid, center.float(), voxel, levels[0][0]).to(dev)
        scale = _scale_for(family, extent, voxel).to(dev, torch.float32)
        init_params = family.identity_params(n).to(dev)
        raw = torch.zeros_like(init_params, requires_grad=True)
        weights = dict(regularization or {})
        if not weights and stage.family in DEFORMABLE:
            weights = {"diffusion": 0.5} if stage.family in ("svf", "displacement") else {"bending": 1.0}
        for name in weights:
            if name not in REGULARIZERS:
                raise ValueError(f"unknown regularizer {name!r}; choose from {', '.join(REGULARIZERS)}")
        for factor, iterations in levels:
            if isinstance(family, Displacement):
                family, raw, scale, init_params = _refine_field(family, raw, stage, fgrid, center, voxel, factor, n)
            f_l, fgrid_l = pyramids["fixed"](factor)
            m_l, mgrid_l = pyramids["moving"](factor)
            mask_l = None if fmask is None else pyramids["mask"](factor)[0]
            ohm_l = ohf_l = None
            if onehot_m is not None:
                ohm_l = pyramids["moving_labels"](factor)[0]
                ohf_l = pyramids["fixed_labels"](factor)[0]
            opt = torch.optim.Adam([raw], lr=stage.lr)
            # Cosine decay to 5% lets Adam settle into the optimum instead of circling it.
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations, eta_min=0.05 * stage.lr)
            bests: list[float] = []
            for it in range(iterations):
                opt.zero_grad(set_to_none=True)
                params = _params_from_raw(raw, scale, init_params, family, stage)
                current = family.with_params(params)
                # Matrix after matrix folds into one matrix (the fused fast path); a field composes.
                if stage.family in MATRIX:
                    mapping = prefix.compose(current)
                    mapping = mapping if fixed_part is None else mapping.compose(fixed_part)
                else:
                    mapping = (prefix if fixed_part is None else prefix.compose(fixed_part)).compose(current)
                if fused and isinstance(mapping, MatrixTransform) and not mapping.projective:
                    theta = mapping.affine_theta(fgrid_l, mgrid_l)
                    total = fused_affine_loss(m_l, f_l, theta, loss, "border")
                else:
                    total = similarity(warp(m_l, mapping, fgrid_l, mgrid_l, padding="border"), f_l, mask_l)
                if stage.family in DEFORMABLE:
                    fld = _field_for_regularizer(family, params)
                    for name, w in weights.items():
                        if w and fld is not None:
                            total = total + w * REGULARIZERS[name](fld)
                if ohm_l is not None:
                    total = total + dice_weight * dice_loss(warp(ohm_l, mapping, fgrid_l, mgrid_l), ohf_l)
                total.backward()
                opt.step()
                sched.step()
                v = float(total.detach())
                history.append({"stage": stage.family, "level": factor, "iteration": it, "loss": v})
                bar.update()
                bar.set_postfix(stage=stage.family, level=f"1/{factor}", loss=f"{v:.4f}")
                # The best loss so far (monotone, so noisy losses such as sampled MI do not stop a
                # level by chance), compared with its value PATIENCE iterations ago.
                bests.append(min(v, bests[-1]) if bests else v)
                if it >= PATIENCE and bests[-PATIENCE - 1] - bests[-1] < tol * abs(bests[-1]):
                    bar.update(iterations - it - 1)
                    break
        with torch.no_grad():
            final = family.with_params(_params_from_raw(raw, scale, init_params, family, stage).detach())
        if stage.family in MATRIX:
            prefix = matrix_total = matrix_total.compose(final)
        else:
            deformable = final
        timings[f"stage_{si}_{stage.family}_s"] = time.perf_counter() - t_stage
    bar.close()
    timings["optimization_s"] = time.perf_counter() - t_start
    settings = {
        "transform": "+".join(s.family for s in stages),
        "stages": [s.__dict__ for s in stages],
        "loss": loss,
        "window": win if loss == "lncc" else None,
        "bins": bins if loss == "mi" else None,
        "regularization": regularization,
        "dice_weight": dice_weight,
        "init": "given initial transform" if initial_matrix is not None else init,
        "device": str(dev),
        "seed": seed,
        "batch_size": n,
    }

    results = []
    for i in range(n):
        mat = _item(matrix_total, i).cpu()
        deform = None if deformable is None else _item(deformable, i).cpu()
        if fixed_part is not None:
            kept = _item(fixed_part, i if fixed_part.batch_size > 1 else 0).cpu()
            deform = kept if deform is None else Composite([kept, deform])
        full: Transform = mat if deform is None else Composite([mat, deform])
        with torch.no_grad():
            warped = apply(full, mov_imgs[i], fix_imgs[i])
        res = RegistrationResult(
            warped=Image(warped.data, fgrid, "warped"),
            transform=full,
            matrix=mat,
            deformable=deform,
            fixed=fix_imgs[i],
            moving=mov_imgs[i],
            settings=settings,
            history=history,
            timings=dict(timings, total_s=time.perf_counter() - t_start),
        )
        lm, lf = label_maps[i] if label_maps[i] else (None, None)
        res.label_maps = (lm, lf, label_ids[i])
        results.append(res)
    # The lattices cached for the iterations would otherwise outlive the call (+240 MB RSS on the brain).
    clear_lattice_cache()
    return results


def _load_labels(
    labels: Sequence[tuple[Any, Any] | None] | None, mov_imgs: list[Image], fix_imgs: list[Image]
) -> tuple[list[tuple[Image, Image] | None], list[list[int]]]:
    """Label maps per pair (first channel) and the non-zero labels each pair shares."""
    from .metrics import label_values

    if labels is None:
        return [None] * len(mov_imgs), [[] for _ in mov_imgs]
    if len(labels) != len(mov_imgs):
        raise ValueError(f"labels given for {len(labels)} pairs, but there are {len(mov_imgs)}")
    maps: list[tuple[Image, Image] | None] = []
    ids: list[list[int]] = []
    for pair, m, f in zip(labels, mov_imgs, fix_imgs, strict=True):
        if pair is None:
            maps.append(None)
            ids.append([])
            continue
        lm, lf = (_load(x, what, True) for x, what in zip(pair, ("moving labels", "fixed labels"), strict=True))
        lm, lf = Image(lm.data[:1], lm.grid, lm.name), Image(lf.data[:1], lf.grid, lf.name)
        if lm.grid.shape != m.grid.shape or lf.grid.shape != f.grid.shape:
            raise ValueError(f"label maps {lm.name}, {lf.name} must lie on the grids of their images")
        in_m, in_f = set(label_values(lm.data)), set(label_values(lf.data))
        common = sorted(in_m & in_f)
        if not common:
            raise ValueError(
                f"the label maps share no non-zero label: {lm.name} has {sorted(in_m)[:10]}, "
                f"{lf.name} has {sorted(in_f)[:10]}"
            )
        maps.append((lm, lf))
        ids.append(common)
    return maps, ids


def _params_from_raw(raw: Tensor, scale: Tensor, init: Tensor, family: ParametricTransform, stage: Stage) -> Tensor:
    """Scaled raw variables to family parameters; fields through a Gaussian preconditioner."""
    step = raw * scale
    if isinstance(family, Displacement) and stage.smooth:
        # On the CPU: the blur reads sigma's largest value on the host, which on a GPU would wait
        # for the device every iteration.
        sigma = torch.full((1, family.ndim), float(stage.smooth), dtype=raw.dtype)
        step = gaussian_blur(step, sigma, "border")
    return init + step
