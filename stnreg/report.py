"""What a registration leaves behind: metrics, files in ITK formats, report.json and the QC figure.

What keeps it cheap (on a 1 mm brain, 182x218x182, one thread, ``save`` took 3.4 s with the
metrics against 33 s before; ``benchmarks/results/outputs.md``): the deformable part's field is
evaluated once and shared, the whole transform's field only on request, the Jacobian statistics
come from the deformable part's displacement and the matrix (``det J = det A · det(I + ∇u)``) in
float32, and the QC figure needs only the middle slice (three slices of the displacement, for its
derivatives along the slice axis).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .coords import Grid, apply_affine, index_to_normalized_matrix
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

__all__ = ["evaluate", "qc_figure", "save_result"]


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _gray01(data: Tensor, ref: Image) -> Tensor:
    """Channel mean of ``data`` ``(C, ...)`` scaled to [0, 1] by the range of ``ref``'s pixels."""
    src = ref.data.float()
    lo, hi = float(src.min()), float(src.max())
    return ((data.float().mean(0) - lo) / max(hi - lo, 1e-12)).clamp(0, 1)


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
        f = _gray01(fixed.data, fixed)[None, None]
        ncc_b = 1 - float(ncc_loss(_gray01(both[:-1], moving)[None, None], f, mask=mask))
        ncc_a = 1 - float(ncc_loss(_gray01(result.warped.data, moving)[None, None], f, mask=mask))
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


def _middle_slab(grid: Grid) -> tuple[Grid, Grid, int]:
    """For a 3D grid: the middle slice along the first array axis as a one-slice grid, the slab of
    it and its neighbours (up to three slices: central differences at the middle need both), and
    the middle's index in the slab. A 2D grid is its own slice and slab."""
    if grid.ndim == 2:
        return grid, grid, 0
    k = grid.shape[0] // 2
    lo, hi = max(k - 1, 0), min(k + 1, grid.shape[0] - 1)

    def sub(first: int, count: int) -> Grid:
        origin = grid.index_to_world() @ torch.tensor([0.0, 0.0, float(first), 1.0], dtype=torch.float64)
        return Grid((count, *grid.shape[1:]), grid.spacing, origin[:3].tolist(), grid.direction)

    return sub(k, 1), sub(lo, hi - lo + 1), k - lo


def _slice(vol: Tensor, index: int) -> np.ndarray:
    """Slice ``index`` along the first array axis of a 3D ``(D, H, W)`` tensor; a 2D one as it is."""
    v = vol.detach().float().cpu()
    return (v[index] if v.dim() == 3 else v).numpy()


def _slab_displacement(result: RegistrationResult, slab: Grid, first: int, deformable: Tensor | None) -> Tensor:
    """``T(x) - x`` ``(1, d, *slab.shape)`` in mm (float64) on ``slab``, slices ``first...`` of the
    fixed grid: from the deformable part's displacement there and the matrix when the transform is
    ``matrix ∘ deformable`` and that displacement is at hand, else by evaluating the transform."""
    d = result.fixed.ndim
    pts = slab.points("world", torch.float64)
    if deformable is not None and _outer_linear(result) is not None:
        u = deformable[:, first : first + slab.shape[0]] if d == 3 else deformable
        m = torch.eye(d + 1, dtype=torch.float64) if result.matrix is None else result.matrix.matrix()[0]
        mapped = apply_affine(m.detach().double().cpu(), pts + torch.movedim(u.double(), 0, -1))
    else:
        mapped = result.transform(pts.reshape(1, -1, d).float()).double().reshape(pts.shape)
    return torch.movedim(mapped - pts, -1, 0)[None]


def qc_figure(
    result: RegistrationResult, path: str | os.PathLike, deformable_displacement: Tensor | None = None
) -> Path:
    """Checkerboards before/after, the deformed grid, and the Jacobian determinant map (middle slice in 3D).

    Only the middle slice is resampled, and the displacement is needed on it and its two
    neighbours; the share of folded voxels in the title is the whole volume's, from
    ``result.metrics``.

    Args:
        deformable_displacement: ``result.deformable_displacement()`` when the caller has it
            (:func:`save_result` does); the transform is evaluated on the slices otherwise.
    """
    from .viz import checkerboard, plt, save_figure

    fixed, moving = result.fixed, result.moving
    d = fixed.ndim
    plane, slab, mid = _middle_slab(fixed.grid)
    k = fixed.grid.shape[0] // 2 if d == 3 else 0
    with torch.no_grad():
        before = apply(Affine(d), moving, plane).data
        disp = _slab_displacement(result, slab, k - mid, deformable_displacement)
        vox = world_to_voxel_displacement(disp, slab.index_to_world())
        det = jacobian_determinant(vox)[0]
    f = _slice(_gray01(fixed.data[:, k] if d == 3 else fixed.data, fixed), 0)
    b = _slice(_gray01(before, moving), 0)
    a = _slice(_gray01(result.warped.data[:, k] if d == 3 else result.warped.data, moving), 0)
    # No ticks at all (the axes are hidden anyway): placing the titles measured every tick label.
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.6), subplot_kw={"xticks": [], "yticks": []})
    axes[0].imshow(checkerboard(f, b), cmap="gray")
    axes[0].set_title(f"before: fixed / moving (NCC {result.metrics.get('ncc_before', float('nan')):.3f})")
    axes[1].imshow(checkerboard(f, a), cmap="gray")
    axes[1].set_title(f"after: fixed / warped (NCC {result.metrics.get('ncc_after', float('nan')):.3f})")
    axes[2].imshow(b, cmap="gray")
    # In-plane components of the displacement on the shown slice: x (last axis) and y.
    ux, uy = _slice(vox[0, 0], mid), _slice(vox[0, 1], mid)
    h, w = ux.shape
    step = max(1, max(h, w) // 32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    gx, gy = xx + ux, yy + uy
    # Every grid line in one artist, NaN between lines: 64 plot calls took 0.3 s to build.
    rows, cols = slice(0, h, step), slice(0, w, step)
    lines_x = [gx[rows], gx[:, cols].T]
    lines_y = [gy[rows], gy[:, cols].T]
    breaks = [np.full((len(a), 1), np.nan) for a in lines_x]
    axes[2].plot(
        np.concatenate([np.hstack([a, n]).ravel() for a, n in zip(lines_x, breaks, strict=True)]),
        np.concatenate([np.hstack([a, n]).ravel() for a, n in zip(lines_y, breaks, strict=True)]),
        "c-",
        lw=0.5,
    )
    axes[2].set_xlim(0, w - 1)
    axes[2].set_ylim(h - 1, 0)
    axes[2].set_title("fixed grid mapped onto moving")
    im = axes[3].imshow(_slice(det, mid), cmap="RdBu_r", vmin=0, vmax=2)
    # Without a deformable part the transform is a matrix: its determinant is the same everywhere,
    # so the slab's share is the volume's.
    jac = result.metrics.get("jacobian")
    folded = jac["folding_percent"] if jac else float((det <= 0).double().mean() * 100)
    axes[3].set_title(f"Jacobian determinant ({folded:.3f}% <= 0)")
    fig.colorbar(im, ax=axes[3], fraction=0.046)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"stnreg: {result.settings['transform']} / {result.settings['loss']}")
    # Fixed margins instead of tight_layout, which measured every (hidden) tick label: 0.9 s.
    fig.subplots_adjust(left=0.02, right=0.97, bottom=0.03, top=0.84, wspace=0.08)
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
