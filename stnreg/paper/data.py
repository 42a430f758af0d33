"""The paper's MNIST variants, generated deterministically from a seed, vectorized.

All variants are made with stnreg's own sampler (:func:`stnreg.sampler.sample`, bilinear, zero
padding) from MNIST digits ``(N, 28, 28)``; no per-image Python loop. Distortions are written as
output-to-digit maps ``out(x) = digit(T(x))`` in the digit's normalized coordinates
(``align_corners=False``; ``(x, y)`` order).

| name | canvas | what |
|---|---|---|
| ``R`` | 28 | rotation uniform in ±90° |
| ``RTS`` | 42 | rotation ±45°, scale 0.7-1.2, random placement (the scaled digit frame stays inside) |
| ``P`` | 28 | scale 0.75-1.0, then each corner moved by N(0, 5 px) (a homography) |
| ``E`` | 28 | scale 0.75-1.0, then a 4x4 thin-plate-spline control grid moved by N(0, 1.5 px) |
| ``TC`` | 60 | the digit at a random integer position, plus six 6x6 clutter crops of other digits |
| ``addition`` | 2 x 42 | two digits, each in its own channel with an independent RTS distortion; label a+b |
| ``coloc-T`` | 84 | a digit at a random position; ``boxes`` give its 28x28 frame |
| ``coloc-TC`` | 84 | as ``coloc-T`` with 16 6x6 clutter crops |

Images are uint8 ``(N, C, H, W)`` (pixel values clipped to [0, 255]); labels int64 ``(N,)``.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..coords import lattice
from ..sampler import sample
from ..transforms.tps import ThinPlateSpline, uniform_control_points

__all__ = [
    "EXPERIMENTS",
    "P_CORNER_STD",
    "Variant",
    "load_mnist",
    "make_variant",
    "projective_maps",
    "read_idx",
    "warp_projective",
]

EXPERIMENTS = ("R", "RTS", "P", "E", "TC", "addition", "coloc-T", "coloc-TC")
P_CORNER_STD = 5.0  # the P corner noise, N(0, 5 px); the paper's data matches about 3.5 px
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An array from an IDX file (MNIST's original format), gzipped or not."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{p}: cannot read ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{p}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    body = raw[4 + 4 * ndim :]
    if len(body) != math.prod(dims) * dtype.itemsize:
        raise ValueError(f"{p}: truncated or padded IDX data ({len(body)} bytes for shape {dims})")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def load_mnist(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """MNIST from an ``.npz`` (``x_train, y_train, x_test, y_test``) or a folder of the original IDX files.

    Returns:
        ``x_train`` ``(N, 28, 28)`` uint8, ``y_train`` ``(N,)`` int64, and the same for ``test``.
    """
    p = Path(path)
    if p.is_dir():
        names = {
            "x_train": "train-images-idx3-ubyte",
            "y_train": "train-labels-idx1-ubyte",
            "x_test": "t10k-images-idx3-ubyte",
            "y_test": "t10k-labels-idx1-ubyte",
        }
        out = {}
        for key, stem in names.items():
            cands = [
                p / stem,
                p / f"{stem}.gz",
                p / stem.replace("-idx", ".idx"),
                p / f"{stem.replace('-idx', '.idx')}.gz",
            ]
            found = next((c for c in cands if c.exists()), None)
            if found is None:
                raise ValueError(f"{p}: no {stem}[.gz] (MNIST's IDX files)")
            out[key] = read_idx(found)
    elif p.suffix == ".npz" and p.exists():
        with np.load(p) as z:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
            if missing:
                raise ValueError(f"{p}: missing arrays {sorted(missing)}")
            out = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    else:
        raise ValueError(f"{p}: give an MNIST .npz or a folder of IDX files")
    for split in ("train", "test"):
        x, y = out[f"x_{split}"], out[f"y_{split}"]
        if x.ndim != 3 or len(x) != len(y):
            raise ValueError(f"{p}: x_{split} {x.shape} and y_{split} {y.shape} do not describe N images of H x W")
    return {k: (v.astype(np.int64) if k.startswith("y") else v.astype(np.uint8)) for k, v in out.items()}


@dataclass
class Variant:
    """A generated dataset: ``images`` uint8 ``(N, C, H, W)``, ``labels`` ``(N,)``, and for
    co-localization ``boxes`` ``(N, 4)`` = ``x0, y0, x1, y1`` of the digit's 28x28 frame in pixels."""

    images: Tensor
    labels: Tensor
    boxes: Tensor | None = None


def _uniform(g: torch.Generator, n: int, lo: float, hi: float, *shape: int) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, *shape, generator=g, dtype=torch.float64)


def _canvas_points(size: int, n: int) -> Tensor:
    """Pixel centres of a ``size`` x ``size`` canvas in pixel units relative to its centre, ``(n, H, W, 2)``."""
    pts = lattice((size, size), dtype=torch.float64) * (size / 2)
    return pts.expand(n, size, size, 2)


def _sample(digits: Tensor, digit_points: Tensor) -> Tensor:
    """Digits ``(N, 1, 28, 28)`` float at points in digit pixels relative to the digit centre."""
    coords = (digit_points / 14.0).to(torch.float32)
    return sample(digits, coords, "linear", "zeros")


def _to_uint8(x: Tensor) -> Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


def _rts(digits: Tensor, g: torch.Generator, canvas: int, angle: float, scale: tuple[float, float]) -> Tensor:
    n = digits.shape[0]
    theta = _uniform(g, n, -angle, angle) * math.pi / 180
    s = _uniform(g, n, *scale)
    room = ((canvas - 28 * s) / 2).clamp(min=0)
    shift = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * room[:, None]
    c, si = torch.cos(theta), torch.sin(theta)
    # Inverse of x -> R s x + shift: x -> R^T (x - shift) / s.
    inv = torch.stack([torch.stack([c, si], -1), torch.stack([-si, c], -1)], -2) / s[:, None, None]
    pts = _canvas_points(canvas, n) - shift[:, None, None, :]
    return _sample(digits, torch.einsum("nij,nhwj->nhwi", inv, pts))


def _homography(src: Tensor, dst: Tensor) -> Tensor:
    """``(N, 3, 3)`` homographies mapping four ``src`` points to ``dst`` points (both ``(N, 4, 2)``)."""
    n = src.shape[0]
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    z, o = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, o, z, z, z, -u * x, -u * y], -1)
    rows_v = torch.stack([z, z, z, x, y, o, -v * x, -v * y], -1)
    a = torch.cat([rows_u, rows_v], 1)
    b = torch.cat([u, v], 1)
    h = torch.linalg.solve(a, b)
    return torch.cat([h, torch.ones(n, 1, dtype=h.dtype)], 1).reshape(n, 3, 3)


def _convex(quad: Tensor) -> Tensor:
    """Whether quadrilaterals ``(N, 4, 2)`` (corners in order) are strictly convex and counter-clockwise."""
    edge = quad.roll(-1, 1) - quad
    nxt = edge.roll(-1, 1)
    return (edge[..., 0] * nxt[..., 1] - edge[..., 1] * nxt[..., 0] > 0).all(1)


def _check_corner_std(value: float, name: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number of pixels >= 0, got {value}")


def projective_maps(n: int, g: torch.Generator, corner_std: float = P_CORNER_STD) -> Tensor:
    """The ``P`` variant's random homographies, ``(N, 3, 3)`` float64, canvas -> digit.

    They act on homogeneous ``(x, y, 1)`` points in pixels relative to the centre of the 28x28
    canvas and digit: the digit's frame, scaled by U(0.75, 1.0) about its centre, then each corner
    moved by N(0, ``corner_std`` px) (the issue's 5 px by default), is where the digit appears on
    the canvas. Folded quadrilaterals are drawn again, so every map is a view of a plane, and
    ``w > 0`` on the digit's side of the horizon.
    """
    _check_corner_std(corner_std, "corner_std")
    s = _uniform(g, n, 0.75, 1.0)
    corners = torch.tensor([[-14.0, -14.0], [14.0, -14.0], [14.0, 14.0], [-14.0, 14.0]], dtype=torch.float64)
    moved = corners * s[:, None, None] + corner_std * torch.randn(n, 4, 2, generator=g, dtype=torch.float64)
    # A folded quadrilateral (about 1% of draws) is no view of a plane: draw its corners again.
    bad = ~_convex(moved)
    while bad.any():
        noise = torch.randn(int(bad.sum()), 4, 2, generator=g, dtype=torch.float64)
        moved[bad] = corners * s[bad, None, None] + corner_std * noise
        bad = ~_convex(moved)
    h = _homography(moved, corners.expand(n, 4, 2))
    # h is fixed up to a factor; the sign that puts the quadrilateral on the visible side (w > 0)
    # is that of w at its centroid. With h[2, 2] = 1 the canvas centre has w = 1, which is the wrong
    # side when the horizon runs between it and a quadrilateral pushed off-centre (1 draw in 4000).
    centroid = torch.cat([moved.mean(1), torch.ones(n, 1, dtype=moved.dtype)], 1)
    return h * torch.einsum("nj,nj->n", h[:, 2], centroid).sign()[:, None, None]


def warp_projective(images: Tensor, h: Tensor) -> Tensor:
    """``images`` ``(N, C, 28, 28)`` float seen through homographies ``h`` ``(N, 3, 3)`` (output -> input).

    ``h`` maps output pixels to input pixels, both relative to the image centre. Output pixels whose
    point lies beyond the input plane's horizon (``w <= 0``) are zero.
    """
    if images.dim() != 4 or tuple(images.shape[2:]) != (28, 28):
        raise ValueError(f"need images of shape (N, C, 28, 28), got {tuple(images.shape)}")
    if tuple(h.shape) != (len(images), 3, 3):
        raise ValueError(f"need one (3, 3) homography per image, ({len(images)}, 3, 3), got {tuple(h.shape)}")
    pts = _canvas_points(28, len(images))
    hom = torch.cat([pts, torch.ones(*pts.shape[:-1], 1, dtype=pts.dtype)], -1)
    mapped = torch.einsum("nij,nhwj->nhwi", h, hom)
    # Canvas points with w <= 0 lie beyond the digit plane's horizon (about 12% of the draws reach
    # into the canvas): they see nothing, rather than a mirrored copy of the digit.
    w = mapped[..., 2:]
    visible = (w > 0).to(torch.float32)[:, None, :, :, 0]
    return _sample(images, mapped[..., :2] / torch.where(w > 0, w, 1.0)) * visible


def _elastic(digits: Tensor, g: torch.Generator) -> Tensor:
    n = digits.shape[0]
    s = _uniform(g, n, 0.75, 1.0)
    cp = uniform_control_points((4, 4)).double() * 14.0  # canvas pixels about the centre
    targets = cp + 1.5 * torch.randn(n, 16, 2, generator=g, dtype=torch.float64)
    tps = ThinPlateSpline(cp).with_params(targets)
    pts = tps(_canvas_points(28, n).reshape(n, -1, 2)).reshape(n, 28, 28, 2)
    return _sample(digits, pts / s[:, None, None, None])


def _paste(canvas: Tensor, patches: Tensor, x0: Tensor, y0: Tensor) -> Tensor:
    """Max-paste ``patches`` ``(N, K, h, w)`` into ``canvas`` ``(N, H, W)`` at integer corners ``(N, K)``."""
    n, _, h, w = patches.shape
    width = canvas.shape[-1]
    dy, dx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    idx = (y0[..., None, None] + dy) * width + (x0[..., None, None] + dx)
    flat = canvas.reshape(n, -1).clone()
    flat.scatter_reduce_(1, idx.reshape(n, -1), patches.reshape(n, -1).to(flat.dtype), "amax")
    return flat.reshape(canvas.shape)


def _clutter(canvas: Tensor, pool: Tensor, g: torch.Generator, count: int) -> Tensor:
    """Add ``count`` random 6x6 crops of random digits from ``pool`` ``(M, 28, 28)`` at random places."""
    n, size = canvas.shape[0], canvas.shape[-1]
    src = torch.randint(0, pool.shape[0], (n, count), generator=g)
    # Crops from the digit's central 20x20, where the ink is, so the clutter looks like strokes.
    sy, sx = (torch.randint(4, 24 - 6 + 1, (n, count), generator=g) for _ in range(2))
    dy, dx = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    crops = pool[src[..., None, None], sy[..., None, None] + dy, sx[..., None, None] + dx]
    y0, x0 = (torch.randint(0, size - 6 + 1, (n, count), generator=g) for _ in range(2))
    return _paste(canvas, crops, x0, y0)


def _translated(digits: Tensor, g: torch.Generator, size: int) -> tuple[Tensor, Tensor]:
    """Digits pasted at random integer positions of a ``size`` canvas, and their 28x28 frames."""
    n = digits.shape[0]
    y0, x0 = (torch.randint(0, size - 28 + 1, (n, 1), generator=g) for _ in range(2))
    canvas = _paste(torch.zeros(n, size, size, dtype=digits.dtype), digits[:, None], x0, y0)
    boxes = torch.cat([x0, y0, x0 + 28, y0 + 28], 1)
    return canvas, boxes


def check_variant_options(name: str, p_corner_std: float) -> None:
    """Raise on an unknown variant ``name`` or a ``p_corner_std`` that is invalid or set for another variant."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    _check_corner_std(p_corner_std, "p_corner_std")
    if name != "P" and p_corner_std != P_CORNER_STD:
        raise ValueError(f"p_corner_std applies to the P experiment only, got {p_corner_std} for {name!r}")


def make_variant(
    name: str,
    images: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    seed: int,
    chunk: int = 10_000,
    p_corner_std: float = P_CORNER_STD,
) -> Variant:
    """Generate variant ``name`` of every digit in ``images`` ``(N, 28, 28)`` uint8.

    Deterministic: the same seed (and chunk size) gives the same bytes. Clutter and the second
    digit of ``addition`` come from the same ``images`` (other, randomly chosen digits).
    ``p_corner_std`` is the ``P`` variant's corner displacement in pixels (see :func:`projective_maps`).
    """
    check_variant_options(name, p_corner_std)
    x = torch.as_tensor(np.asarray(images))
    y = torch.as_tensor(np.asarray(labels)).long()
    if x.dim() != 3 or tuple(x.shape[1:]) != (28, 28) or len(x) != len(y):
        raise ValueError(f"need (N, 28, 28) digits with N labels, got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) == 0:
        raise ValueError("no digits given")
    g = torch.Generator().manual_seed(int(seed))
    out_imgs, out_labels, out_boxes = [], [], []
    for start in range(0, len(x), chunk):
        xd = x[start : start + chunk]
        yd = y[start : start + chunk]
        digits = xd.float()[:, None]
        boxes = None
        if name == "R":
            img = _rts(digits, g, 28, 90.0, (1.0, 1.0))
        elif name == "RTS":
            img = _rts(digits, g, 42, 45.0, (0.7, 1.2))
        elif name == "P":
            img = warp_projective(digits, projective_maps(len(digits), g, p_corner_std))
        elif name == "E":
            img = _elastic(digits, g)
        elif name == "addition":
            other = torch.randint(0, len(x), (len(xd),), generator=g)
            second = x[other].float()[:, None]
            img = torch.cat([_rts(digits, g, 42, 45.0, (0.7, 1.2)), _rts(second, g, 42, 45.0, (0.7, 1.2))], 1)
            yd = yd + y[other]
        else:
            size = 60 if name == "TC" else 84
            canvas, boxes = _translated(xd, g, size)
            count = {"TC": 6, "coloc-TC": 16}.get(name, 0)
            if count:
                canvas = _clutter(canvas, x, g, count)
            img = canvas.float()[:, None]
        out_imgs.append(_to_uint8(img))
        out_labels.append(yd)
        if boxes is not None:
            out_boxes.append(boxes)
    return Variant(torch.cat(out_imgs), torch.cat(out_labels), torch.cat(out_boxes) if out_boxes else None)
