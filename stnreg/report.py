"""What a registration leaves behind: metrics, files in ITK formats, report.json and the QC figure.

What keeps it cheap (on a 1 mm brain, 182x218x182, one thread, ``save`` took 3.4 s with the
metrics against 33 s before; ``benchmarks/results/outputs.md``): the deformable part's field is
evaluated once and shared, the whole transform's field only on request, the Jacobian statistics
come from the deformable part's displacement and the matrix (``det J = det A · det(I + ∇u)``) in
float32, and the QC figure evaluates the transform on its three planes only (the deformable part on
each and its two neighbours, for the Jacobian's derivatives across the plane).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .coords import Grid, index_to_normalized_matrix
from .fields import jacobian_determinant, world_to_voxel_displacement
from .image import Image
from .io import IMAGE_SUFFIXES, _atomic_write, write_displacement, write_image, write_transform
from .losses import ncc_loss
from .metrics import dice, hd95, jacobian_stats
from .transforms.base import Composite, Transform
from .transforms.dense import Displacement
from .transforms.matrix import Affine
from .warp import apply

if TYPE_CHECKING:
    from .register import RegistrationResult

__all__ = ["evaluate", "qc_figure", "qc_plot", "save_result"]


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _chain(t: Transform | None) -> list[Transform]:
    if t is None:
        return []
    return list(t.transforms) if isinstance(t, Composite) else [t]


def _outer_linear(result: RegistrationResult) -> Tensor | None:
    """The linear part ``(d, d)`` (float64) of the affine matrix applied after the deformable part,
    when the transform is exactly ``matrix ∘ deformable`` (the identity without a matrix), so that
    ``det J_T = det A · det J_deformable``; ``None`` for other chains (a projective matrix, whose
    Jacobian varies in space, or a transform built otherwise)."""
    d = result.fixed.ndim
    outer = _chain(result.matrix)
    if result.deformable is None or any(getattr(t, "projective", True) for t in outer):
        return None
    parts = [*outer, *_chain(result.deformable)]
    whole = _chain(result.transform)
    if len(whole) != len(parts) or any(a is not b for a, b in zip(whole, parts, strict=True)):
        return None
    if result.matrix is None:
        return torch.eye(d, dtype=torch.float64)
    return result.matrix.matrix()[0, :d, :d].detach().double().cpu()


def _as_saved(result: RegistrationResult, deformable_displacement: Tensor) -> Transform:
    """The transform as :func:`save_result` writes it: the matrix after the deformable part's
    displacement on the fixed grid, read in place by the warp (no field to integrate or resample)."""
    grid = result.fixed.grid
    field = Displacement(grid.shape, params=deformable_displacement[None], domain=grid.world_to_normalized())
    return field if result.matrix is None else Composite([result.matrix, field])


def evaluate(
    result: RegistrationResult,
    moving_labels: Image | None,
    fixed_labels: Image | None,
    label_ids: Sequence[int],
    deformable_displacement: Tensor | None = None,
) -> dict[str, Any]:
    """Similarity before/after, Dice and HD95 per label (when labels are given), Jacobian statistics.

    Args:
        deformable_displacement: ``result.deformable_displacement()`` ``(d, *fixed_shape)`` in mm
            when the caller has it already (:func:`save_result` writes it too); computed here otherwise.
    """
    fixed, moving = result.fixed, result.moving
    identity = Affine(fixed.ndim)
    # For a matrix after a deformable part, the statistics and the overlap below need only the
    # deformable part's field, evaluated once; other chains go through the whole transform.
    linear = _outer_linear(result)
    if linear is not None and deformable_displacement is None:
        deformable_displacement = result.deformable_displacement()
    mapping = result.transform if linear is None else _as_saved(result, deformable_displacement)
    with torch.no_grad():
        # The moving image and a channel of ones in one warp: the ones say where the identity
        # samples inside the moving image. Compare only where it and the found transform both do.
        ones = torch.ones(1, *moving.grid.shape)
        both = apply(identity, Image(torch.cat([moving.data.float(), ones]), moving.grid), fixed).data
        found = apply(mapping, Image(ones, moving.grid), fixed).data
        mask = ((both[-1:] > 0.999) & (found > 0.999)).float()[None]
        # NCC ignores each image's intensity scale and offset, and the mask keeps values that lie in
        # their image's range: the channel means need no rescaling (0.1 s on a 1 mm brain).
        f = fixed.data.float().mean(0)[None, None]
        ncc_b = 1 - float(ncc_loss(both[:-1].mean(0)[None, None], f, mask=mask))
        ncc_a = 1 - float(ncc_loss(result.warped.data.float().mean(0)[None, None], f, mask=mask))
    metrics: dict[str, Any] = {"ncc_before": ncc_b, "ncc_after": ncc_a, "ncc_overlap_fraction": float(mask.mean())}
    if moving_labels is not None and fixed_labels is not None:
        with torch.no_grad():
            lb = apply(identity, moving_labels, fixed, "label").data[0]
            la = apply(mapping, moving_labels, fixed, "label").data[0]
        fl = fixed_labels.data[0]
        d_b, d_a = dice(lb, fl, label_ids), dice(la, fl, label_ids)
        h_a = hd95(la, fl, fixed.grid, label_ids)
        metrics.update(
            dice_before=_nanmean(list(d_b.values())),
            dice_after=_nanmean(list(d_a.values())),
            hd95_after=_nanmean(list(h_a.values())),
            dice_per_label={str(k): v for k, v in d_a.items()},
            hd95_per_label={str(k): v for k, v in h_a.items()},
        )
    if linear is not None:
        metrics["jacobian"] = jacobian_stats(deformable_displacement, fixed.grid, linear)
    elif result.deformable is not None:
        metrics["jacobian"] = jacobian_stats(result.displacement(), fixed.grid)
    return metrics


def _suffix_of(name: str) -> str:
    low = name.lower()
    for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(s):
            return ".nii.gz" if s in (".mhd", ".nhdr") else s
    return ".nii.gz"


# Radiological display: ITK's LPS letters (negative, positive) of world x, y, z, and the names of
# the planes normal to them.
_WORLD_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))
_PLANE_NAMES = ("sagittal", "coronal", "axial")


@dataclass(frozen=True)
class _QCPlane:
    """One plane of the fixed grid in the QC figure.

    Attributes:
        axis: the array axis normal to the plane (0, 1, 2 = ``D``, ``H``, ``W``); ``None`` in 2D.
        index: the slice's index along ``axis`` (0 in 2D).
        rows, cols: the array axes shown as the panel's rows and columns (``rows < cols``).
        flip_rows, flip_cols: whether rows run upwards and columns leftwards on screen.
        name: what the plane is, e.g. ``"axial: array axis D = 91 of 182"``.
        edges: the world directions at the panel's left, right, top and bottom edges (LPS
            letters), or ``None`` when the grid has none (2D) or is too oblique to name them.
    """

    axis: int | None
    index: int
    rows: int
    cols: int
    flip_rows: bool
    flip_cols: bool
    name: str
    edges: tuple[str, str, str, str] | None


def _world_axes(grid: Grid) -> list[tuple[int, int]] | None:
    """For each array axis of a 3D grid (``D``, ``H``, ``W``): the world axis (0, 1, 2 = x, y, z) its
    index direction is closest to and the sign of that component; ``None`` when two array axes are
    closest to the same world axis (an oblique grid, whose planes have no anatomical name)."""
    direction = torch.tensor(grid.direction, dtype=torch.float64)
    out = []
    for axis in range(3):
        column = direction[:, 2 - axis]
        world = int(column.abs().argmax())
        out.append((world, 1 if column[world] > 0 else -1))
    return out if len({w for w, _ in out}) == 3 else None


def _label_centroid(labels: Image, ids: Sequence[int]) -> list[int] | None:
    """The voxel ``[k, j, i]`` (array order) nearest the centroid of the voxels of ``labels``
    (``(1, *shape)``) whose label is in ``ids`` (any non-zero label when ``ids`` is empty); ``None``
    when there are none."""
    lab = labels.data[0]
    if not len(ids):
        mask = lab != 0
    elif int(lab.min()) >= 0 and int(lab.max()) < 2**16:
        # A table look-up (label maps hold whole numbers, whatever their dtype): torch.isin took
        # 0.4 s on a 1 mm brain, this 0.05 s.
        table = torch.zeros(int(lab.max()) + 1, dtype=torch.bool)
        table[[i for i in ids if 0 <= i < len(table)]] = True
        mask = table[lab.long()]
    else:
        mask = torch.isin(lab, torch.tensor(list(ids), dtype=lab.dtype))
    total = int(mask.sum())
    if total == 0:
        return None
    # Per-axis profiles instead of the voxel list (millions of rows on a 1 mm brain), in float32:
    # sums of the bool mask over two axes took 25 ms each.
    weights = mask.to(torch.float32)
    if lab.dim() == 3:
        sheet = weights.sum(0)
        profiles = [weights.sum((1, 2)), sheet.sum(1), sheet.sum(0)]
    else:
        profiles = [weights.sum(1), weights.sum(0)]
    return [round(float(p.double() @ torch.arange(len(p), dtype=torch.float64)) / total) for p in profiles]


def _qc_planes(grid: Grid, fixed_labels: Image | None = None, ids: Sequence[int] = ()) -> list[_QCPlane]:
    """The planes of the QC figure: in 3D, one normal to each array axis through the centroid of
    ``fixed_labels`` (through the grid's centre without labels), axial, coronal, sagittal when the
    direction matrix names them (array axes ``D``, ``H``, ``W`` otherwise); in 2D the image itself.

    Named planes are shown the radiological way: patient left on the right of the screen, anterior
    up in axial planes, superior up in the others."""
    if grid.ndim == 2:
        h, w = grid.shape
        return [_QCPlane(None, 0, 0, 1, False, False, f"2D image, {h} x {w} (H x W)", None)]
    centre = _label_centroid(fixed_labels, ids) if fixed_labels is not None else None
    if centre is None:
        centre = [n // 2 for n in grid.shape]
    world = _world_axes(grid)
    planes = []
    for axis in range(3):
        rows, cols = (a for a in range(3) if a != axis)
        where = f"array axis {'DHW'[axis]} = {centre[axis]} of {grid.shape[axis]}"
        if world is None:
            planes.append(_QCPlane(axis, centre[axis], rows, cols, False, False, f"plane ⊥ {where}", None))
            continue
        (wr, sr), (wc, sc) = world[rows], world[cols]
        # Down the screen: towards P (+y) or I (-z); across it: towards L (+x) or P (+y).
        down = -1 if wr == 2 else 1
        top, bottom = _WORLD_LETTERS[wr][::down]
        left, right = _WORLD_LETTERS[wc]
        name = f"{_PLANE_NAMES[world[axis][0]]}: {where}"
        planes.append(_QCPlane(axis, centre[axis], rows, cols, sr != down, sc != 1, name, (left, right, top, bottom)))
    # Axial, coronal, sagittal from the top (array axes D, H, W for unnamed planes).
    return sorted(planes, key=lambda p: -world[p.axis][0]) if world is not None else planes


def _slab(grid: Grid, axis: int | None, index: int) -> tuple[Grid, Grid, int]:
    """The plane through slice ``index`` of array ``axis`` as a one-slice grid, the slab of it and its
    neighbours (up to three slices: central differences along ``axis`` need both), and the plane's
    position in the slab. A 2D grid (``axis`` ``None``) is its own plane and slab."""
    if axis is None:
        return grid, grid, 0
    lo, hi = max(index - 1, 0), min(index + 1, grid.shape[axis] - 1)

    def sub(first: int, count: int) -> Grid:
        corner = torch.zeros(grid.ndim + 1, dtype=torch.float64)
        corner[grid.ndim - 1 - axis], corner[-1] = first, 1.0
        origin = grid.index_to_world() @ corner
        shape = list(grid.shape)
        shape[axis] = count
        return Grid(shape, grid.spacing, origin[: grid.ndim].tolist(), grid.direction)

    return sub(index, 1), sub(lo, hi - lo + 1), index - lo


def _deformable_on(
    result: RegistrationResult, slab: Grid, axis: int | None, first: int, deformable: Tensor | None
) -> Tensor | None:
    """The deformable part's displacement ``(d, *slab.shape)`` in mm (float64) on ``slab``, slices
    ``first ...`` of the fixed grid along array ``axis``: cut from ``deformable`` (``(d, *fixed_shape)``,
    :meth:`RegistrationResult.deformable_displacement`) when given, else the part evaluated on the
    slab's points only; ``None`` without a deformable part."""
    if result.deformable is None:
        return None
    if deformable is not None:
        return (deformable if axis is None else deformable.narrow(axis + 1, first, slab.shape[axis])).double()
    pts = slab.points("world", torch.float64)
    mapped = result.deformable.mapped_lattice(slab).double()[0]
    return torch.movedim(mapped - pts, -1, 0)


def _in_plane(data: Tensor, plane: _QCPlane, index: int | None = None, lead: int = 0) -> np.ndarray:
    """The plane of a ``(*lead_dims, *spatial)`` tensor as ``(*lead_dims, rows, cols)``: slice ``index``
    (default: the plane's) along the plane's axis in 3D, the tensor itself in 2D."""
    if plane.axis is not None:
        data = data.select(plane.axis + lead, plane.index if index is None else index)
    return data.detach().float().cpu().numpy()


def _unit(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Channel mean of ``data`` ``(C, rows, cols)`` mapped from ``[lo, hi]`` onto [0, 1]."""
    return ((data.mean(0) - lo) / max(hi - lo, 1e-12)).clip(0, 1)


def _frame(ax: Any, plane: _QCPlane, shape: tuple[int, ...], letters: bool = False) -> None:
    """Limits of a panel showing a ``(rows, cols)`` image of ``plane`` (flipped as the plane says)
    and, with ``letters``, the world direction at each edge."""
    h, w = shape
    ax.set_xlim((w - 0.5, -0.5) if plane.flip_cols else (-0.5, w - 0.5))
    ax.set_ylim((-0.5, h - 0.5) if plane.flip_rows else (h - 0.5, -0.5))
    if letters and plane.edges is not None:
        style = {"transform": ax.transAxes, "color": "yellow", "fontsize": 9, "fontweight": "bold"}
        for text, x, y in zip(plane.edges, (0.02, 0.98, 0.5, 0.5), (0.5, 0.5, 0.98, 0.02), strict=True):
            ax.text(x, y, text, ha="center" if x == 0.5 else ("left" if x < 0.5 else "right"), va="center", **style)


def _qc_row(
    axes: Sequence[Any],
    result: RegistrationResult,
    plane: _QCPlane,
    deformable: Tensor | None,
    mapping: Transform,
    ranges: tuple[tuple[float, float], tuple[float, float]],
) -> None:
    """Draw one plane's panels: checkerboards before and after, deformed grid, Jacobian determinant
    and, with a fifth axes, the label outlines."""
    from .viz import checkerboard_panel, deformed_grid, jacobian_image, label_outlines

    fixed, moving = result.fixed, result.moving
    grid, d = fixed.grid, fixed.ndim
    one, slab, mid = _slab(grid, plane.axis, plane.index)
    metrics = result.metrics
    # Spacing of the shown rows and columns (array axis a has spacing[d - 1 - a], x being the last).
    sp_r, sp_c = grid.spacing[d - 1 - plane.rows], grid.spacing[d - 1 - plane.cols]
    aspect = sp_r / sp_c
    with torch.no_grad():
        before = apply(Affine(d), moving, one).data
        u = _deformable_on(result, slab, plane.axis, plane.index - mid, deformable)
        if u is not None:
            vox = world_to_voxel_displacement(u[None], slab.index_to_world())[0]
            det = _in_plane(jacobian_determinant(vox[None])[0], plane, mid)
        else:
            # No deformable part: the whole transform's displacement on the plane's points.
            pts = one.points("world", torch.float64)
            mapped = result.transform.mapped_lattice(one).double()[0]
            vox = world_to_voxel_displacement(torch.movedim(mapped - pts, -1, 0)[None], one.index_to_world())[0]
            mid = 0
    # Sliced first, scaled after: scaling the volumes took 0.2 s on a 1 mm brain.
    f = _unit(_in_plane(fixed.data, plane, lead=1), *ranges[0])
    b = _unit(_in_plane(before, plane, 0, lead=1), *ranges[1])
    a = _unit(_in_plane(result.warped.data, plane, lead=1), *ranges[1])
    # The corner of pixel [0, 0], whose square shows the fixed image, once the panel is flipped.
    corner = f"{'bottom' if plane.flip_rows else 'top'}-{'right' if plane.flip_cols else 'left'}"
    show = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0, "aspect": aspect, "interpolation": "nearest"}
    ncc_before, ncc_after = metrics.get("ncc_before", math.nan), metrics.get("ncc_after", math.nan)
    checkerboard_panel(axes[0], f, b, aspect)
    axes[0].set_title(f"before: fixed vs moving, unregistered\n{corner} square (F): fixed; NCC {ncc_before:.3f}")
    checkerboard_panel(axes[1], f, a, aspect)
    axes[1].set_title(f"after: fixed vs warped moving\n{corner} square (F): fixed; NCC {ncc_after:.3f}")
    # In-plane displacement in fixed voxels (channel d - 1 - a is array axis a's component).
    ur, uc = _in_plane(vox[d - 1 - plane.rows], plane, mid), _in_plane(vox[d - 1 - plane.cols], plane, mid)
    h, w = f.shape
    # Lines about as far apart in mm along both axes, some 24 along the longer side.
    step_mm = max(h * sp_r, w * sp_c) / 24
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float64)
    # The image at half brightness (vmax 2), so that the lines stand out.
    axes[2].imshow(f if u is not None else b, **{**show, "vmax": 2.0})
    deformed_grid(axes[2], rr + ur, cc + uc, (max(1, round(step_mm / sp_r)), max(1, round(step_mm / sp_c))))
    largest = float(np.sqrt((ur * sp_r) ** 2 + (uc * sp_c) ** 2).max())
    if u is not None:
        title = f"grid of the deformable part: x + u(x) on fixed\nin-plane part, max {largest:.2f} mm"
    else:
        title = f"grid of the whole transform: T(x) on moving\nno deformable stage; in-plane, max {largest:.2f} mm"
    axes[2].set_title(title)
    if u is not None:
        im = jacobian_image(axes[3], det, aspect)
        folded = int((det <= 0).sum())
        jac = metrics.get("jacobian")
        volume = f", {jac['folding_percent']:.3f}% of the volume" if jac else ""
        axes[3].set_title(f"det J of the deformable part\nfolding (≤ 0, green): {folded} px here{volume}")
        bar = axes[3].figure.colorbar(im, ax=axes[3], fraction=0.046, pad=0.02, extend="both")
        bar.set_label("det J, clipped to [0, 2]", fontsize=8)
        bar.set_ticks([0.0, 0.5, 1.0, 1.5, 2.0])
        bar.ax.tick_params(labelsize=7)
    else:
        axes[3].imshow(np.zeros((h, w)), cmap="gray", vmin=0, vmax=1, aspect=aspect)
        matrix = result.matrix
        constant = (
            ""
            if matrix is None or matrix.projective
            else f"\naffine det J = {float(torch.linalg.det(matrix.matrix()[0, :d, :d].double())):.4f} everywhere"
        )
        axes[3].text(
            0.5,
            0.5,
            f"no deformable stage{constant}",
            transform=axes[3].transAxes,
            ha="center",
            va="center",
            color="white",
        )
        axes[3].set_title("det J of the deformable part")
    if len(axes) > 4:
        moving_labels, fixed_labels, ids = result.label_maps
        with torch.no_grad():
            warped = apply(mapping, moving_labels, one, "label").data[0]
        shown = [_in_plane(fixed_labels.data[0], plane), _in_plane(warped, plane, 0)]
        if len(ids):
            # Only the scored labels: a FreeSurfer map has 45, of which 30 are usually scored.
            shown = [np.where(np.isin(lab, list(ids)), lab, 0) for lab in shown]
        axes[4].imshow(f, **show)
        axes[4].imshow(label_outlines(*shown), aspect=aspect, interpolation="nearest")
        dice_after, dice_before = metrics.get("dice_after", math.nan), metrics.get("dice_before", math.nan)
        axes[4].set_title(
            f"labels: fixed green, warped magenta, both\nwhite; Dice {dice_after:.3f} (before {dice_before:.3f})"
        )
    for ax in axes:
        _frame(ax, plane, (h, w), letters=ax is axes[0])
        # No axis lines: drawing the 18 axes' (empty) axis artists took 0.2 s.
        ax.set_axis_off()
    axes[0].text(-0.04, 0.5, plane.name, transform=axes[0].transAxes, rotation=90, ha="right", va="center")


def qc_plot(result: RegistrationResult, deformable_displacement: Tensor | None = None) -> Any:
    """The QC figure (a matplotlib ``Figure``): one row per plane, axial, coronal and sagittal in 3D
    (through the centroid of the fixed labels when ``result.label_maps`` has them, else the fixed
    grid's centre), the image itself in 2D. Each row: checkerboards of the fixed image with the
    moving one before (resampled on the fixed grid, unregistered) and after registration, the fixed
    grid deformed by the deformable part (by the whole transform without one), the deformable
    part's Jacobian determinant and, with labels, the outlines of the fixed and warped moving labels.

    Cost: the transform is evaluated on the planes' points only (the deformable part on each plane
    and its two neighbours, for the derivatives across it), not on the volume; the similarity, Dice
    and the volume's folding in the titles come from ``result.metrics``.

    Args:
        deformable_displacement: ``result.deformable_displacement()`` ``(d, *fixed_shape)`` in mm
            when the caller has it (:func:`save_result` does): the planes are cut from it.
    """
    from .viz import plt

    fixed, moving = result.fixed, result.moving
    moving_labels, fixed_labels, ids = result.label_maps
    labelled = moving_labels is not None and fixed_labels is not None
    planes = _qc_planes(fixed.grid, fixed_labels if labelled else None, ids)
    if deformable_displacement is not None and _outer_linear(result) is not None:
        mapping = _as_saved(result, deformable_displacement)
    else:
        mapping = result.transform
    ranges = tuple((float(im.data.min()), float(im.data.max())) for im in (fixed, moving))
    ncols = 5 if labelled else 4
    # Small titles: two lines each over panels some 3.5 inches wide.
    with plt.rc_context({"axes.titlesize": 9, "axes.labelsize": 10}):
        # No ticks at all: placing the titles measured every tick label.
        fig, axes = plt.subplots(
            len(planes),
            ncols,
            figsize=(3.9 * ncols, 3.9 * len(planes) + 0.8),
            squeeze=False,
            subplot_kw={"xticks": [], "yticks": []},
        )
        for row, plane in zip(axes, planes, strict=True):
            _qc_row(row, result, plane, deformable_displacement, mapping, ranges)
    view = "; radiological view (patient left on screen right)" if planes[0].edges is not None else ""
    fig.suptitle(
        f"stnreg QC: {result.settings['transform']} / {result.settings['loss']}; fixed: {Path(fixed.name).name}{view}"
    )
    # Fixed margins instead of tight_layout, which measured every (hidden) tick label: 0.9 s.
    fig.subplots_adjust(left=0.03, right=0.98, bottom=0.02, top=1 - 0.9 / fig.get_figheight(), wspace=0.12, hspace=0.3)
    return fig


def qc_figure(
    result: RegistrationResult, path: str | os.PathLike, deformable_displacement: Tensor | None = None
) -> Path:
    """Write :func:`qc_plot`'s figure to ``path`` (PNG, atomically).

    Args:
        deformable_displacement: ``result.deformable_displacement()`` when the caller has it
            (:func:`save_result` does); the transform is evaluated on the planes otherwise.
    """
    from .viz import save_figure

    fig = qc_plot(result, deformable_displacement)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_figure(fig, tmp, compress_level=1)
    os.replace(tmp, path)
    return path


def _own_lattice(result: RegistrationResult) -> tuple[Tensor, Grid] | None:
    """The deformable part's displacement ``(d, *shape)`` (mm) on its own lattice and that lattice's
    world grid, when the part is one world-space dense field coarser than the fixed grid; else ``None``.

    Such a field is interpolated linearly between its lattice points (border values beyond), which is
    what ITK's and ANTs' displacement field transforms do within the field's extent, so the file holds
    the same map in a fraction of the voxels: a default SVF on a 1 mm brain lives on 4 mm voxels, 1/64
    of the fixed grid (the full-grid file took 2.0 s of a 3.4 s save, ``results/outputs.md``).
    """
    t = result.deformable
    if not isinstance(t, Displacement) or t.domain is None or t.batch_size != 1:
        return None
    if math.prod(t.shape) >= math.prod(result.fixed.grid.shape):
        return None
    d = t.ndim
    with torch.no_grad():
        field = t.field()[0].float().cpu()
        # index -> world of the lattice: normalized -> world after index -> normalized.
        m = torch.linalg.inv(t.domain.double().cpu()) @ index_to_normalized_matrix(t.shape)
    lin = m[:d, :d]
    spacing = lin.norm(dim=0)
    grid = Grid(t.shape, spacing.tolist(), m[:d, d].tolist(), (lin / spacing).tolist())
    return field, grid


def save_result(
    result: RegistrationResult,
    out_dir: str | os.PathLike,
    protect: Sequence[str | os.PathLike] = (),
    suffix: str | None = None,
    total_displacement: bool = False,
    qc: bool = True,
) -> dict[str, Path]:
    """Write ``warped<suffix>``, ``affine.tfm``, ``deformable.nii.gz``, ``qc.png`` (unless ``qc`` is
    false: on a 2D pair the figure takes longer than the registration) and, last,
    ``report.json`` into ``out_dir``; never replaces a file listed in ``protect``.

    ``report.json["transform"]`` lists the transform files in ITK ``CompositeTransform`` order
    (ITK applies the last added first), so that the composite maps fixed points to moving points;
    ``"ants_transformlist"`` is the same list in the order ``ants.apply_transforms`` expects;
    ``"files"`` names every file written.

    Args:
        total_displacement: also write ``total_displacement.nii.gz``, the whole transform as one
            displacement field (``T(x) - x`` in mm on the fixed grid). Off by default: the transform
            files already hold the same map, and on a 1 mm brain this field costs another 1.2 s to
            evaluate, 1.5-2 s to write and 95 MB (``benchmarks/results/outputs.md``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    guard = [*protect, result.fixed.name, result.moving.name]
    guard = [g for g in guard if os.path.exists(str(g))]
    ext = suffix or _suffix_of(result.fixed.name)
    # The deformable part's field, once: the file and the Jacobian statistics both need it.
    deform = result.deformable_displacement()
    if result._metrics is None:
        # What the ``metrics`` property would compute, with the field above instead of a second one.
        result._metrics = evaluate(result, *result.label_maps, deformable_displacement=deform)
    files: dict[str, Path] = {}
    files["warped"] = write_image(out / f"warped{ext}", result.warped, guard)
    chain = []
    if result.matrix is not None:
        files["affine"] = write_transform(out / "affine.tfm", result.matrix, guard)
        chain.append("affine.tfm")
    if deform is not None:
        field, grid = _own_lattice(result) or (deform, result.fixed.grid)
        files["deformable"] = write_displacement(out / "deformable.nii.gz", field, grid, guard)
        chain.append("deformable.nii.gz")
    if total_displacement:
        files["total_displacement"] = write_displacement(
            out / "total_displacement.nii.gz", result.displacement(), result.fixed.grid, guard
        )
    if qc:
        files["qc"] = qc_figure(result, out / "qc.png", deform)
    report = {
        "moving": result.moving.name,
        "fixed": result.fixed.name,
        "settings": result.settings,
        "timings": result.timings,
        "metrics": result.metrics,
        "transform": chain,
        # ants.apply_transforms / antsApplyTransforms take the same files in the reverse order.
        "ants_transformlist": chain[::-1],
        "total_displacement": "total_displacement.nii.gz" if total_displacement else None,
        "files": {**{key: p.name for key, p in files.items()}, "report": "report.json"},
        "convention": "transforms map fixed-space world points (ITK physical, mm) to moving-space points",
        "loss_history": [h["loss"] for h in result.history],
    }
    files["report"] = _atomic_write(
        out / "report.json", guard, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1, default=str))
    )
    return files
