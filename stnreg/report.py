"""What a registration leaves behind: metrics, files in ITK formats, report.json and the QC figure."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .fields import jacobian_determinant, world_to_voxel_displacement
from .image import Image
from .io import IMAGE_SUFFIXES, _atomic_write, write_displacement, write_image, write_transform
from .losses import ncc_loss
from .metrics import dice, hd95, jacobian_stats
from .transforms.matrix import Affine
from .warp import apply

if TYPE_CHECKING:
    from .register import RegistrationResult

__all__ = ["evaluate", "qc_figure", "save_result"]


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _gray01(img: Image, ref: Image | None = None) -> torch.Tensor:
    data = img.data.float().mean(0)
    src = (ref or img).data.float()
    lo, hi = float(src.min()), float(src.max())
    return ((data - lo) / max(hi - lo, 1e-12)).clamp(0, 1)


def evaluate(
    result: RegistrationResult, moving_labels: Image | None, fixed_labels: Image | None, label_ids: Sequence[int]
) -> dict[str, Any]:
    """Similarity before/after, Dice and HD95 per label (when labels are given), Jacobian statistics."""
    fixed, moving = result.fixed, result.moving
    identity = Affine(fixed.ndim)
    with torch.no_grad():
        before = apply(identity, moving, fixed)
        # Compare only where both the identity and the found transform sample inside the moving image.
        ones = Image(torch.ones(1, *moving.grid.shape), moving.grid)
        valid = (apply(identity, ones, fixed).data > 0.999) & (apply(result.transform, ones, fixed).data > 0.999)
        mask = valid.float()[None]
        f = _gray01(fixed).unsqueeze(0).unsqueeze(0)
        ncc_b = 1 - float(ncc_loss(_gray01(before, moving)[None, None], f, mask=mask))
        ncc_a = 1 - float(ncc_loss(_gray01(result.warped, moving)[None, None], f, mask=mask))
    metrics: dict[str, Any] = {"ncc_before": ncc_b, "ncc_after": ncc_a, "ncc_overlap_fraction": float(mask.mean())}
    if moving_labels is not None and fixed_labels is not None:
        with torch.no_grad():
            lb = apply(identity, moving_labels, fixed, "label").data[0]
            la = apply(result.transform, moving_labels, fixed, "label").data[0]
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
    if result.deformable is not None:
        metrics["jacobian"] = jacobian_stats(result.displacement(), fixed.grid)
    return metrics


def _suffix_of(name: str) -> str:
    low = name.lower()
    for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(s):
            return ".nii.gz" if s in (".mhd", ".nhdr") else s
    return ".nii.gz"


def _slice(vol: torch.Tensor) -> np.ndarray:
    """The middle slice along the first array axis for 3D, the image itself for 2D."""
    v = vol.detach().float().cpu()
    return (v[v.shape[0] // 2] if v.dim() == 3 else v).numpy()


def qc_figure(result: RegistrationResult, path: str | os.PathLike) -> Path:
    """Checkerboards before/after, the deformed grid, and the Jacobian determinant map (middle slice in 3D)."""
    from .viz import checkerboard, plt, save_figure

    fixed, moving = result.fixed, result.moving
    with torch.no_grad():
        before = apply(Affine(fixed.ndim), moving, fixed)
    f = _slice(_gray01(fixed))
    b = _slice(_gray01(before, moving))
    a = _slice(_gray01(result.warped, moving))
    disp = result.displacement()
    vox = world_to_voxel_displacement(disp.unsqueeze(0).double(), fixed.grid.index_to_world())
    det = jacobian_determinant(vox)[0]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.6))
    axes[0].imshow(checkerboard(f, b), cmap="gray")
    axes[0].set_title(f"before: fixed / moving (NCC {result.metrics.get('ncc_before', float('nan')):.3f})")
    axes[1].imshow(checkerboard(f, a), cmap="gray")
    axes[1].set_title(f"after: fixed / warped (NCC {result.metrics.get('ncc_after', float('nan')):.3f})")
    axes[2].imshow(b, cmap="gray")
    # In-plane components of the displacement on the shown slice: x (last axis) and y.
    ux, uy = _slice(vox[0, 0]), _slice(vox[0, 1])
    h, w = ux.shape
    step = max(1, max(h, w) // 32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    gx, gy = xx + ux, yy + uy
    for i in range(0, h, step):
        axes[2].plot(gx[i], gy[i], "c-", lw=0.5)
    for j in range(0, w, step):
        axes[2].plot(gx[:, j], gy[:, j], "c-", lw=0.5)
    axes[2].set_xlim(0, w - 1)
    axes[2].set_ylim(h - 1, 0)
    axes[2].set_title("fixed grid mapped onto moving")
    jd = _slice(det)
    im = axes[3].imshow(jd, cmap="RdBu_r", vmin=0, vmax=2)
    folded = float((det <= 0).double().mean() * 100)
    axes[3].set_title(f"Jacobian determinant ({folded:.3f}% <= 0)")
    fig.colorbar(im, ax=axes[3], fraction=0.046)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"stnreg: {result.settings['transform']} / {result.settings['loss']}")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_figure(fig, tmp)
    os.replace(tmp, path)
    return path


def save_result(
    result: RegistrationResult,
    out_dir: str | os.PathLike,
    protect: Sequence[str | os.PathLike] = (),
    suffix: str | None = None,
) -> dict[str, Path]:
    """Write ``warped<suffix>``, ``affine.tfm``, ``deformable.nii.gz``, ``total_displacement.nii.gz``,
    ``report.json`` and ``qc.png`` into ``out_dir``; never replaces a file listed in ``protect``.

    ``report.json["transform"]`` lists the transform files in ITK ``CompositeTransform`` order
    (ITK applies the last added first), so that the composite maps fixed points to moving points;
    ``"ants_transformlist"`` is the same list in the order ``ants.apply_transforms`` expects.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    guard = [*protect, result.fixed.name, result.moving.name]
    guard = [g for g in guard if os.path.exists(str(g))]
    ext = suffix or _suffix_of(result.fixed.name)
    files: dict[str, Path] = {}
    files["warped"] = write_image(out / f"warped{ext}", result.warped, guard)
    chain = []
    if result.matrix is not None:
        files["affine"] = write_transform(out / "affine.tfm", result.matrix, guard)
        chain.append("affine.tfm")
    deform = result.deformable_displacement()
    if deform is not None:
        files["deformable"] = write_displacement(out / "deformable.nii.gz", deform, result.fixed.grid, guard)
        chain.append("deformable.nii.gz")
    files["total_displacement"] = write_displacement(
        out / "total_displacement.nii.gz", result.displacement(), result.fixed.grid, guard
    )
    report = {
        "moving": result.moving.name,
        "fixed": result.fixed.name,
        "settings": result.settings,
        "timings": result.timings,
        "metrics": result.metrics,
        "transform": chain,
        # ants.apply_transforms / antsApplyTransforms take the same files in the reverse order.
        "ants_transformlist": chain[::-1],
        "total_displacement": "total_displacement.nii.gz",
        "convention": "transforms map fixed-space world points (ITK physical, mm) to moving-space points",
        "loss_history": [h["loss"] for h in result.history],
    }
    files["report"] = _atomic_write(
        out / "report.json", guard, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1, default=str))
    )
    files["qc"] = qc_figure(result, out / "qc.png")
    return files
