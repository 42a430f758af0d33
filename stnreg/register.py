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
from torch import Tensor
from tqdm import tqdm

from .coords import Grid, apply_affine, index_to_normalized_matrix, lattice
from .fields import world_to_voxel_displacement
from .image import Image, as_image
from .losses import REGULARIZERS, SIMILARITIES, dice_loss
from .sampler import gaussian_blur, sample
from .transforms import FAMILIES
from .transforms.base import Composite, ParametricTransform, Transform
from .transforms.bspline import BSpline
from .transforms.dense import Displacement, StationaryVelocity
from .transforms.matrix import Affine, MatrixTransform
from .transforms.tps import ThinPlateSpline
from .warp import apply

__all__ = ["RegistrationResult", "Stage", "parse_pipeline", "register"]

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


DEFAULTS: dict[str, dict[str, Any]] = {
    "translation": {"shrink": (4, 2), "iterations": (150, 60), "lr": 0.01},
    "rigid": {"shrink": (4, 2), "iterations": (150, 60), "lr": 0.01},
    "similarity": {"shrink": (4, 2), "iterations": (150, 60), "lr": 0.01},
    "affine": {"shrink": (4, 2), "iterations": (150, 60), "lr": 0.005},
    "projective": {"shrink": (4, 2), "iterations": (150, 60), "lr": 0.002},
    "svf": {"shrink": (4, 2, 1), "iterations": (150, 100, 50), "lr": 0.2, "smooth": 1.0, "field_factor": 2},
    "displacement": {"shrink": (4, 2, 1), "iterations": (150, 100, 50), "lr": 0.2, "smooth": 1.0, "field_factor": 1},
    "bspline": {"shrink": (4, 2, 1), "iterations": (150, 100, 50), "lr": 0.2, "control_spacing": 8.0},
    "tps": {"shrink": (4, 2, 1), "iterations": (150, 100, 50), "lr": 0.2, "control_spacing": 16.0},
}


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
    metrics: dict[str, Any] = field(default_factory=dict)

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


def _center_of_mass(img: Tensor, grid: Grid) -> Tensor:
    """Intensity-weighted world centroid ``(d,)`` of a ``(1, 1, *spatial)`` image."""
    w = img[0, 0].double().flatten()
    pts = grid.points("world", torch.float64).reshape(-1, grid.ndim)
    return (w.unsqueeze(1) * pts).sum(0) / w.sum()


def _moments(img: Tensor, grid: Grid, center: Tensor) -> Tensor:
    """Principal axes (columns, descending variance) of the intensity distribution."""
    w = img[0, 0].double().flatten()
    pts = grid.points("world", torch.float64).reshape(-1, grid.ndim) - center
    cov = (pts * w.unsqueeze(1)).T @ pts / w.sum()
    _, vecs = torch.linalg.eigh(cov)
    return vecs.flip(1)


def _initial_matrix(fixed: Tensor, fgrid: Grid, moving: Tensor, mgrid: Grid, init: str) -> tuple[Tensor, Tensor]:
    """Homogeneous initial map (fixed -> moving world) and the fixed centre of mass."""
    d = fgrid.ndim
    cf, cm = _center_of_mass(fixed, fgrid), _center_of_mass(moving, mgrid)
    m = torch.eye(d + 1, dtype=torch.float64)
    if init == "none":
        return m, cf
    if init not in ("com", "moments"):
        raise ValueError(f"init must be 'com', 'moments' or 'none', got {init!r}")
    rot = torch.eye(d, dtype=torch.float64)
    if init == "moments":
        vf, vm = _moments(fixed, fgrid, cf), _moments(moving, mgrid, cm)
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


def _downsample(img: Tensor, grid: Grid, factor: int) -> tuple[Tensor, Grid]:
    """Anti-aliased downsampling keeping the world extent: ``(1, C, *level_shape)`` and its grid."""
    if factor == 1:
        return img, grid
    shape = _level_shape(grid.shape, factor)
    coords = lattice(shape, dtype=img.dtype, device=img.device).unsqueeze(0)
    return sample(img, coords, "linear", "border", antialias=True), grid.with_shape(shape)


def _make_stage_transform(stage: Stage, grid: Grid, center: Tensor, voxel: float) -> ParametricTransform:
    d = grid.ndim
    if stage.family in MATRIX:
        return FAMILIES[stage.family](d, center=center)
    if stage.family in ("svf", "displacement"):
        g = grid.with_shape(_level_shape(grid.shape, stage.field_factor))
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


def _field_for_regularizer(t: ParametricTransform, params: Tensor) -> Tensor | None:
    """The velocity/displacement ``(1, d, *shape)`` in voxel units of its grid, for regularization."""
    if isinstance(t, Displacement):
        inv = torch.linalg.inv(t.domain.to(params.device))
        # The field's own index->world map: normalized->world composed with index->normalized.
        idx_to_world = inv @ index_to_normalized_matrix(t.shape, device=params.device)
        return world_to_voxel_displacement(params, idx_to_world)
    if isinstance(t, BSpline):
        return params
    return None


def register(
    moving: Image | Tensor | np.ndarray | str | os.PathLike,
    fixed: Image | Tensor | np.ndarray | str | os.PathLike,
    transform: str | Sequence[str | Stage] = "rigid+affine+svf",
    loss: str = "lncc",
    *,
    window: int | float = 7,
    window_mm: bool = False,
    bins: int = 32,
    regularization: dict[str, float] | None = None,
    labels: tuple[Any, Any] | None = None,
    dice_weight: float = 0.0,
    fixed_mask: Any = None,
    init: str = "com",
    device: str | torch.device | None = None,
    progress: bool = True,
    seed: int = 0,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; the result lives on the fixed grid.

    Args:
        moving, fixed: file paths, :class:`Image` objects, or arrays/tensors (1 mm voxels at the
            origin). Grids, spacings and orientations may differ; both must be 2D or both 3D.
        transform: ``+``-joined stages, e.g. ``"rigid+affine+svf"``, ``"affine+bspline"``,
            ``"tps"``, or :class:`Stage` objects for custom pyramids and iterations.
        loss: ``"mse"``, ``"ncc"``, ``"lncc"`` (``window`` in voxels, or mm with ``window_mm``),
            ``"mi"`` (``bins``; for multi-modal pairs).
        regularization: weights of ``"diffusion"``, ``"bending"``, ``"folding"`` on the deformable
            stage (defaults: diffusion 1.0 for svf/displacement, bending 1.0 for bspline/tps).
        labels: ``(moving_labels, fixed_labels)`` label maps; used for Dice metrics, and for a Dice
            loss when ``dice_weight > 0``.
        fixed_mask: optional mask on the fixed grid restricting the similarity.
        init: ``"com"`` (centres of mass), ``"moments"`` (principal axes too) or ``"none"``.
        device: ``"cpu"``, ``"cuda"``...; defaults to CUDA when available.
    """
    t_start = time.perf_counter()
    mov_img, fix_img = _load(moving, "moving"), _load(fixed, "fixed")
    if mov_img.ndim != fix_img.ndim:
        raise ValueError(
            f"dimension mismatch: moving {mov_img.name} is {mov_img.ndim}D, fixed {fix_img.name} is {fix_img.ndim}D"
        )
    if loss not in SIMILARITIES:
        raise ValueError(f"loss must be one of {', '.join(SIMILARITIES)}, got {loss!r}")
    stages = parse_pipeline(transform)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=dev).manual_seed(seed)
    m_int, f_int = (x.to(dev) for x in _intensities(mov_img, fix_img, joint=loss == "mse"))
    fmask = None if fixed_mask is None else _load(fixed_mask, "fixed mask").batch(device=dev)
    if fmask is not None and tuple(fmask.shape[2:]) != fix_img.grid.shape:
        raise ValueError(
            f"fixed mask shape {tuple(fmask.shape[2:])} does not match the fixed grid {fix_img.grid.shape}"
        )
    lab_m = lab_f = None
    label_ids: list[int] = []
    if labels is not None:
        lab_m, lab_f = _load(labels[0], "moving labels", True), _load(labels[1], "fixed labels", True)
        if lab_m.grid.shape != mov_img.grid.shape or lab_f.grid.shape != fix_img.grid.shape:
            raise ValueError("label maps must lie on the grids of their images")
        from .metrics import label_values

        in_m, in_f = set(label_values(lab_m.data)), set(label_values(lab_f.data))
        label_ids = sorted(in_m & in_f)
        if not label_ids:
            raise ValueError(
                f"the label maps share no non-zero label: {lab_m.name} has {sorted(in_m)[:10]}, "
                f"{lab_f.name} has {sorted(in_f)[:10]}"
            )
    sizes = zip(fix_img.grid.spacing, reversed(fix_img.grid.shape), strict=True)
    extent = float(np.mean([s * n / 2 for s, n in sizes]))
    voxel = float(np.mean(fix_img.grid.spacing))
    win = window
    if window_mm:
        win = max(3, round(window / voxel) | 1)
    sim = SIMILARITIES[loss]

    def similarity(a: Tensor, b: Tensor, mask: Tensor | None) -> Tensor:
        if loss == "lncc":
            return sim(a, b, window=int(win), mask=mask)
        if loss == "mi":
            return sim(a, b, bins=bins, mask=mask, generator=gen)
        return sim(a, b, mask=mask)

    m0, center = _initial_matrix(f_int.cpu(), fix_img.grid, m_int.cpu(), mov_img.grid, init)
    prefix: Transform = Affine.from_matrix(m0.unsqueeze(0).float()).to(dev)
    matrix_total = prefix
    deformable: Transform | None = None
    history: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    total_iters = sum(sum(s.iterations) for s in stages)
    bar = tqdm(total=total_iters, desc="register", unit="it", disable=not progress or None, leave=False)
    onehot_m = onehot_f = None
    if labels is not None and dice_weight > 0:
        onehot_m = torch.stack([(lab_m.data[0] == v) for v in label_ids]).float().unsqueeze(0).to(dev)
        onehot_f = torch.stack([(lab_f.data[0] == v) for v in label_ids]).float().unsqueeze(0).to(dev)

    for si, stage in enumerate(stages):
        t_stage = time.perf_counter()
        family = _make_stage_transform(stage, fix_img.grid, center.float(), voxel).to(dev)
        scale = _scale_for(family, extent, voxel).to(dev, torch.float32)
        init_params = family.identity_params(1).to(dev)
        raw = torch.zeros_like(init_params, requires_grad=True)
        weights = dict(regularization or {})
        if not weights and stage.family in DEFORMABLE:
            weights = {"diffusion": 1.0} if stage.family in ("svf", "displacement") else {"bending": 1.0}
        for name in weights:
            if name not in REGULARIZERS:
                raise ValueError(f"unknown regularizer {name!r}; choose from {', '.join(REGULARIZERS)}")
        for li, factor in enumerate(stage.shrink):
            f_l, fgrid_l = _downsample(f_int, fix_img.grid, factor)
            m_l, mgrid_l = _downsample(m_int, mov_img.grid, factor)
            mask_l = None if fmask is None else _downsample(fmask.float(), fix_img.grid, factor)[0]
            ohm_l = ohf_l = None
            if onehot_m is not None:
                ohm_l = _downsample(onehot_m, mov_img.grid, factor)[0]
                ohf_l = _downsample(onehot_f, fix_img.grid, factor)[0]
            opt = torch.optim.Adam([raw], lr=stage.lr)
            # Cosine decay to 5% lets Adam settle into the optimum instead of circling it.
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, stage.iterations[li], eta_min=0.05 * stage.lr)
            best, stall = math.inf, 0
            for it in range(stage.iterations[li]):
                opt.zero_grad(set_to_none=True)
                params = _params_from_raw(raw, scale, init_params, family, stage)
                current = family.with_params(params)
                # Matrix after matrix folds into one matrix (one affine_grid call); a field composes.
                coords = prefix.compose(current).sampling_grid(fgrid_l, mgrid_l)
                warped = sample(m_l, coords, "linear", "border")
                value = similarity(warped, f_l, mask_l)
                total = value
                if stage.family in DEFORMABLE:
                    fld = _field_for_regularizer(family, params)
                    for name, w in weights.items():
                        if w and fld is not None:
                            total = total + w * REGULARIZERS[name](fld)
                if ohm_l is not None:
                    total = total + dice_weight * dice_loss(sample(ohm_l, coords, "linear", "zeros"), ohf_l)
                total.backward()
                opt.step()
                sched.step()
                v = float(total.detach())
                history.append({"stage": stage.family, "level": factor, "iteration": it, "loss": v})
                bar.update()
                bar.set_postfix(stage=stage.family, level=f"1/{factor}", loss=f"{v:.4f}")
                # Stop a level once 40 iterations in a row gained less than 0.01% of the loss.
                if it == 0 or v < best - 1e-4 * abs(best) - 1e-12:
                    best, stall = v, 0
                else:
                    stall += 1
                    if stall >= 40:
                        bar.update(stage.iterations[li] - it - 1)
                        break
        with torch.no_grad():
            final = family.with_params(_params_from_raw(raw, scale, init_params, family, stage).detach())
        if stage.family in MATRIX:
            prefix = matrix_total = matrix_total.compose(final)
        else:
            deformable = final
        timings[f"stage_{si}_{stage.family}_s"] = time.perf_counter() - t_stage
    bar.close()
    full: Transform = matrix_total if deformable is None else Composite([matrix_total, deformable])
    with torch.no_grad():
        warped_img = apply(full, mov_img, fix_img)
    timings["total_s"] = time.perf_counter() - t_start
    settings = {
        "transform": "+".join(s.family for s in stages),
        "stages": [s.__dict__ for s in stages],
        "loss": loss,
        "window": win if loss == "lncc" else None,
        "bins": bins if loss == "mi" else None,
        "regularization": regularization,
        "dice_weight": dice_weight,
        "init": init,
        "device": str(dev),
        "seed": seed,
    }
    result = RegistrationResult(
        warped=Image(warped_img.data, fix_img.grid, "warped"),
        transform=full.cpu(),
        matrix=matrix_total.cpu(),
        deformable=None if deformable is None else deformable.cpu(),
        fixed=fix_img,
        moving=mov_img,
        settings=settings,
        history=history,
        timings=timings,
    )
    from .report import evaluate

    result.metrics = evaluate(result, lab_m, lab_f, label_ids)
    return result


def _params_from_raw(raw: Tensor, scale: Tensor, init: Tensor, family: ParametricTransform, stage: Stage) -> Tensor:
    """Scaled raw variables to family parameters; fields through a Gaussian preconditioner."""
    step = raw * scale
    if isinstance(family, Displacement) and stage.smooth:
        sigma = torch.full((1, family.ndim), float(stage.smooth), dtype=raw.dtype, device=raw.device)
        step = gaussian_blur(step, sigma, "border")
    return init + step
