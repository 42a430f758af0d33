"""The registration problem: images, intensities, masks, labels and their pyramids, checked once.

:func:`build_problem` turns what the user gave (paths, :class:`Image` objects, arrays) into a
:class:`Problem`: ``N`` pairs whose fixed images share one grid and moving images another, their
intensities scaled to [0, 1] as ``(N, 1, *spatial)`` tensors on the device, and anti-aliased pyramids
made on demand.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..coords import Grid
from ..errors import InputError
from ..image import Image, as_image
from ..pyramid import Pyramid

__all__ = ["Problem", "build_problem", "load_image", "load_labels"]


def load_image(x: Image | Tensor | np.ndarray | str | os.PathLike, what: str, label: bool = False) -> Image:
    """An :class:`Image` from a path (read with :func:`stnreg.io.read_image`) or an in-memory image."""
    if isinstance(x, (str, os.PathLike)):
        from ..io import read_image

        return read_image(x, label=label)
    return as_image(x, name=what)


def _gray(img: Image) -> Tensor:
    data = img.data.float().mean(0, keepdim=True)
    if not bool(torch.isfinite(data).all()):
        raise InputError(f"{img.name}: contains NaN or infinite values")
    if float(data.max() - data.min()) <= 0:
        raise InputError(f"{img.name}: the image is constant ({float(data.min()):g} everywhere); nothing to register")
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


def intensities(moving: Image, fixed: Image, joint: bool) -> tuple[Tensor, Tensor]:
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


def load_labels(
    labels: Sequence[tuple[Any, Any] | None] | None, mov_imgs: list[Image], fix_imgs: list[Image]
) -> tuple[list[tuple[Image, Image] | None], list[list[int]]]:
    """Label maps per pair (first channel) and the non-zero labels each pair shares."""
    from ..metrics import label_values

    if labels is None:
        return [None] * len(mov_imgs), [[] for _ in mov_imgs]
    if len(labels) != len(mov_imgs):
        raise InputError(f"labels given for {len(labels)} pairs, but there are {len(mov_imgs)}")
    maps: list[tuple[Image, Image] | None] = []
    ids: list[list[int]] = []
    for pair, m, f in zip(labels, mov_imgs, fix_imgs, strict=True):
        if pair is None:
            maps.append(None)
            ids.append([])
            continue
        lm, lf = (load_image(x, what, True) for x, what in zip(pair, ("moving labels", "fixed labels"), strict=True))
        lm, lf = Image(lm.data[:1], lm.grid, lm.name), Image(lf.data[:1], lf.grid, lf.name)
        if lm.grid.shape != m.grid.shape or lf.grid.shape != f.grid.shape:
            raise InputError(f"label maps {lm.name}, {lf.name} must lie on the grids of their images")
        in_m, in_f = set(label_values(lm.data)), set(label_values(lf.data))
        common = sorted(in_m & in_f)
        if not common:
            raise InputError(
                f"the label maps share no non-zero label: {lm.name} has {sorted(in_m)[:10]}, "
                f"{lf.name} has {sorted(in_f)[:10]}"
            )
        maps.append((lm, lf))
        ids.append(common)
    return maps, ids


@dataclass
class Problem:
    """``N`` pairs ready to optimize: scaled intensities ``(N, 1, *spatial)`` on ``device`` and pyramids.

    ``pyramids`` holds ``"fixed"``, ``"moving"`` and, when given, ``"mask"`` (fixed grid) and
    ``"moving_labels"``/``"fixed_labels"`` (one-hot ``(N, L, *spatial)`` of the labels all pairs share).
    ``extent`` is the fixed image's mean half-extent (mm) and ``voxel`` its mean spacing (mm).
    """

    moving: list[Image]
    fixed: list[Image]
    moving_int: Tensor
    fixed_int: Tensor
    label_maps: list[tuple[Image, Image] | None]
    label_ids: list[list[int]]
    device: torch.device
    pyramids: dict[str, Pyramid] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.moving)

    @property
    def fixed_grid(self) -> Grid:
        return self.fixed[0].grid

    @property
    def moving_grid(self) -> Grid:
        return self.moving[0].grid

    @property
    def extent(self) -> float:
        g = self.fixed_grid
        return float(np.mean([s * k / 2 for s, k in zip(g.spacing, reversed(g.shape), strict=True)]))

    @property
    def voxel(self) -> float:
        return float(np.mean(self.fixed_grid.spacing))

    def level(self, name: str, factor: int) -> Tensor | None:
        """Pyramid level ``factor`` of ``name`` (``None`` when that input was not given)."""
        return self.pyramids[name](factor)[0] if name in self.pyramids else None


def build_problem(
    movings: Sequence[Any],
    fixeds: Sequence[Any],
    *,
    joint_intensities: bool,
    labels: Sequence[tuple[Any, Any] | None] | None,
    dice_labels: bool,
    fixed_mask: Any,
    device: torch.device,
) -> Problem:
    """Load and check the inputs of :func:`stnreg.register.register_many` (see there)."""
    if len(movings) != len(fixeds) or not movings:
        raise InputError(f"need as many moving as fixed images (got {len(movings)} and {len(fixeds)})")
    mov_imgs = [load_image(m, "moving") for m in movings]
    fix_imgs = [load_image(f, "fixed") for f in fixeds]
    for m, f in zip(mov_imgs, fix_imgs, strict=True):
        if m.ndim != f.ndim:
            raise InputError(f"dimension mismatch: moving {m.name} is {m.ndim}D, fixed {f.name} is {f.ndim}D")
    for imgs, what in ((mov_imgs, "moving"), (fix_imgs, "fixed")):
        for other in imgs[1:]:
            if not other.grid.same_geometry(imgs[0].grid):
                raise InputError(f"batched registration needs the {what} images on one grid: {other.name} differs")
    pairs = [intensities(m, f, joint_intensities) for m, f in zip(mov_imgs, fix_imgs, strict=True)]
    m_int = torch.cat([p[0] for p in pairs]).to(device)
    f_int = torch.cat([p[1] for p in pairs]).to(device)
    fgrid, mgrid = fix_imgs[0].grid, mov_imgs[0].grid
    label_maps, label_ids = load_labels(labels, mov_imgs, fix_imgs)
    problem = Problem(mov_imgs, fix_imgs, m_int, f_int, label_maps, label_ids, device)
    problem.pyramids = {"fixed": Pyramid(f_int, fgrid), "moving": Pyramid(m_int, mgrid)}
    if fixed_mask is not None:
        fmask = load_image(fixed_mask, "fixed mask").batch(device=device)
        if tuple(fmask.shape[2:]) != fgrid.shape:
            raise InputError(f"fixed mask shape {tuple(fmask.shape[2:])} does not match the fixed grid {fgrid.shape}")
        problem.pyramids["mask"] = Pyramid(fmask.float(), fgrid)
    if dice_labels:
        common = sorted(set.intersection(*[set(ids) for ids in label_ids])) if all(label_maps) else []
        if not common:
            raise InputError("dice_weight > 0 needs label maps for every pair with at least one common label")
        onehot_m = torch.stack([torch.stack([lm[0].data[0] == v for v in common]) for lm in label_maps])
        onehot_f = torch.stack([torch.stack([lm[1].data[0] == v for v in common]) for lm in label_maps])
        problem.pyramids["moving_labels"] = Pyramid(onehot_m.float().to(device), mgrid)
        problem.pyramids["fixed_labels"] = Pyramid(onehot_f.float().to(device), fgrid)
    return problem
