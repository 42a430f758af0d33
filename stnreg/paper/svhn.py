"""Street View House Numbers in the official formats, for the paper's multi-digit experiment.

- format 1 (what the paper uses): a folder with ``digitStruct.mat`` (MATLAB v7.3, read with h5py)
  and the PNG images it names. Each sample is cropped to the union of its digit boxes, expanded by
  30%, and resized to ``size`` x ``size`` (64 or 128 in the paper); labels are up to 5 digits,
  ``(5,)`` with 10 meaning "no digit" (SVHN's own label 10 for the digit 0 becomes 0).
- format 2: ``*_32x32.mat`` (``X`` ``(32, 32, 3, N)``, ``y`` ``(N, 1)``), one centred digit each.

Images are uint8 ``(N, 3, size, size)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..coords import lattice
from ..sampler import sample

__all__ = ["MAX_DIGITS", "load_svhn", "load_svhn_cropped"]

MAX_DIGITS = 5
BLANK = 10


def _ref_values(f, obj) -> list[float]:
    """A digitStruct field: either an inline scalar or a list of object references to scalars."""
    if obj.shape[0] == 1:
        return [float(obj[0][0])]
    return [float(f[ref[0]][0][0]) for ref in obj]


def _crop_resize(img: np.ndarray, box: tuple[float, float, float, float], size: int) -> Tensor:
    """``img`` ``(H, W, 3)`` uint8 cropped to ``box`` (x0, y0, x1, y1 in pixels) and resized, ``(3, size, size)``."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = box
    t = torch.as_tensor(img).permute(2, 0, 1)[None].float()
    pts = lattice((size, size), dtype=torch.float32)  # [-1, 1] over the output
    # Output normalized -> box pixels -> input normalized (align_corners=False).
    px = (pts[..., 0] + 1) / 2 * (x1 - x0) + x0
    py = (pts[..., 1] + 1) / 2 * (y1 - y0) + y0
    coords = torch.stack([px / w * 2 - 1, py / h * 2 - 1], -1)[None]
    out = sample(t, coords, "linear", "border", antialias=True)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def load_svhn(folder: str | os.PathLike, size: int = 64, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Format 1: images ``(N, 3, size, size)`` uint8 and labels ``(N, 5)`` (10 = no digit)."""
    import h5py
    from skimage.io import imread

    root = Path(folder)
    mat = root / "digitStruct.mat"
    if not mat.exists():
        raise ValueError(f"{root}: no digitStruct.mat (SVHN format 1: train/, test/ or extra/ folders)")
    images, labels = [], []
    try:
        f = h5py.File(mat, "r")
    except OSError as err:
        raise ValueError(f"{mat}: not a MATLAB v7.3 (HDF5) digitStruct file ({err})") from None
    with f:
        names, boxes = f["digitStruct"]["name"], f["digitStruct"]["bbox"]
        n = len(names) if limit is None else min(limit, len(names))
        for i in range(n):
            name = "".join(chr(int(c[0])) for c in f[names[i][0]][()])
            b = f[boxes[i][0]]
            left, top = _ref_values(f, b["left"]), _ref_values(f, b["top"])
            width, height = _ref_values(f, b["width"]), _ref_values(f, b["height"])
            digits = [int(v) % 10 for v in _ref_values(f, b["label"])]
            if len(digits) > MAX_DIGITS:
                continue
            img = imread(root / name)
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, -1)
            x0, y0 = min(left), min(top)
            x1 = max(lf + wd for lf, wd in zip(left, width, strict=True))
            y1 = max(tp + ht for tp, ht in zip(top, height, strict=True))
            cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, 1.3 * max(x1 - x0, y1 - y0) / 2
            images.append(_crop_resize(img[..., :3], (cx - half, cy - half, cx + half, cy + half), size))
            labels.append(digits + [BLANK] * (MAX_DIGITS - len(digits)))
    if not images:
        raise ValueError(f"{mat}: no samples with at most {MAX_DIGITS} digits")
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.int64)


def load_svhn_cropped(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Format 2 (``train_32x32.mat``): images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` in 0-9."""
    from scipy.io import loadmat

    try:
        m = loadmat(path)
    except (OSError, ValueError, NotImplementedError) as err:
        raise ValueError(f"{path}: not a MATLAB SVHN format-2 file ({err})") from None
    if "X" not in m or "y" not in m:
        raise ValueError(f"{path}: missing X or y")
    x = torch.as_tensor(np.ascontiguousarray(m["X"].transpose(3, 2, 0, 1)))
    y = torch.as_tensor(m["y"].reshape(-1).astype(np.int64) % 10)
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y
