"""Figures people look at: overlays, checkerboards, deformed grids (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.image import AxesImage
from torch import Tensor

__all__ = [
    "FOLD_COLOR",
    "checkerboard",
    "checkerboard_panel",
    "deformed_grid",
    "jacobian_image",
    "label_outlines",
    "save_figure",
    "warp_figure",
]

# Folding (det J <= 0) in a green that neither the gray images nor RdBu_r use.
FOLD_COLOR = "#39ff14"
# Label outlines: fixed, warped moving, both (RGBA).
_OUTLINE_COLORS = ((0.0, 1.0, 0.0, 1.0), (1.0, 0.0, 1.0, 1.0), (1.0, 1.0, 1.0, 1.0))


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8, aspect: float = 1.0) -> np.ndarray:
    """Interleave two equally shaped 2D images ``(H, W)`` in squares, ``tiles`` along the longer side.

    The square holding pixel ``[0, 0]``, and every other one, shows ``a``.

    Args:
        aspect: a pixel's height over its width (row spacing / column spacing): the squares are
            square on screen in ``imshow(..., aspect=aspect)``.
    """
    h, w = a.shape
    side = max(h * aspect, w) / tiles
    rows = (np.arange(h) * aspect / side).astype(np.int64)
    cols = (np.arange(w) / side).astype(np.int64)
    return np.where((rows[:, None] + cols[None, :]) % 2 == 0, a, b)


def checkerboard_panel(
    ax: plt.Axes, a: np.ndarray, b: np.ndarray, aspect: float = 1.0, tiles: int = 8, names: tuple[str, str] = ("F", "M")
) -> None:
    """Show :func:`checkerboard` of two images ``(H, W)`` in [0, 1] (gray), and write ``names`` into
    the first square of each (pixel ``[0, 0]``'s and its right neighbour), so that the panel says
    which squares are which whatever way its axes are turned."""
    h, w = a.shape
    ax.imshow(
        checkerboard(a, b, tiles, aspect), cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest"
    )
    # The squares' side in columns and in rows, as checkerboard makes them.
    side = max(h * aspect, w) / tiles
    style = {"ha": "center", "va": "center", "color": "yellow", "fontsize": 8, "fontweight": "bold"}
    for k, name in enumerate(names):
        ax.text(min((k + 0.5) * side, w - 1), min(0.5 * side / aspect, h - 1), name, **style)


def deformed_grid(ax: plt.Axes, rows: np.ndarray, cols: np.ndarray, steps: tuple[int, int], color: str = "c") -> None:
    """Draw a deformed lattice: every ``steps[0]``-th row and ``steps[1]``-th column of it.

    Args:
        rows, cols: ``(H, W)`` positions (in pixels, row and column) where each lattice point is drawn.
    """
    lines_c = [cols[:: steps[0]], cols[:, :: steps[1]].T]
    lines_r = [rows[:: steps[0]], rows[:, :: steps[1]].T]
    # Every line in one artist, NaN between lines: 64 plot calls took 0.3 s to build.
    breaks = [np.full((len(c), 1), np.nan) for c in lines_c]
    ax.plot(
        np.concatenate([np.hstack([c, n]).ravel() for c, n in zip(lines_c, breaks, strict=True)]),
        np.concatenate([np.hstack([r, n]).ravel() for r, n in zip(lines_r, breaks, strict=True)]),
        "-",
        color=color,
        lw=0.5,
    )


def jacobian_image(ax: plt.Axes, det: np.ndarray, aspect: float = 1.0, vmax: float = 2.0) -> AxesImage:
    """Show a Jacobian determinant map ``(H, W)`` clipped to ``[0, vmax]`` (``RdBu_r``: blue shrinks,
    white keeps, red grows), with folding (``det <= 0``) in :data:`FOLD_COLOR`.

    Returns the image, whose colour bar should be drawn with ``extend="both"``: its ends show the
    clipped values, the lower one in the folding colour.
    """
    cmap = plt.get_cmap("RdBu_r").with_extremes(under=FOLD_COLOR)
    # Folded pixels moved below vmin, so that det == 0 exactly is drawn as folding too.
    shown = np.where(det > 0, det, -1.0)
    return ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=vmax, aspect=aspect, interpolation="nearest")


def _boundary(labels: np.ndarray) -> np.ndarray:
    """Pixels of a 2D label map ``(H, W)`` with a non-zero label that differs from a 4-neighbour's."""
    nonzero = labels != 0
    edge = np.zeros(labels.shape, dtype=bool)
    rows = labels[1:] != labels[:-1]
    edge[1:] |= rows & nonzero[1:]
    edge[:-1] |= rows & nonzero[:-1]
    cols = labels[:, 1:] != labels[:, :-1]
    edge[:, 1:] |= cols & nonzero[:, 1:]
    edge[:, :-1] |= cols & nonzero[:, :-1]
    return edge


def label_outlines(fixed: np.ndarray, warped: np.ndarray) -> np.ndarray:
    """RGBA overlay ``(H, W, 4)`` of the label boundaries of two 2D label maps ``(H, W)`` (0 is
    background): ``fixed``'s green, ``warped``'s magenta, white where both; transparent elsewhere.

    Boundaries by pixel, not contours: cheap for any number of labels (116 in the AAL atlas).
    """
    f, w = _boundary(fixed), _boundary(warped)
    out = np.zeros((*fixed.shape, 4))
    for mask, color in zip((f & ~w, w & ~f, f & w), _OUTLINE_COLORS, strict=True):
        out[mask] = color
    return out


def _grid_lines(ax, coords: np.ndarray, step: int) -> None:
    """Draw the deformed grid from normalized coords ``(H, W, 2)`` in the input's normalized frame."""
    for i in range(0, coords.shape[0], step):
        ax.plot(coords[i, :, 0], coords[i, :, 1], "c-", lw=0.6)
    for j in range(0, coords.shape[1], step):
        ax.plot(coords[:, j, 0], coords[:, j, 1], "c-", lw=0.6)


def warp_figure(fixed: Tensor, moving: Tensor, warped: Tensor, coords: Tensor, title: str = "") -> plt.Figure:
    """Four panels for a 2D warp: before/after checkerboards, difference, deformed grid.

    Args:
        fixed, moving, warped: ``(H, W)`` images (moving on its own grid, warped on fixed's).
        coords: ``(H, W, 2)`` normalized sampling coordinates that produced ``warped``.
    """
    f, m, w = (t.detach().float().cpu().numpy() for t in (fixed, moving, warped))
    m_on_f = torch.nn.functional.interpolate(moving[None, None].float(), size=fixed.shape, mode="bilinear")[0, 0]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    axes[0].imshow(checkerboard(f, m_on_f.numpy()), cmap="gray")
    axes[0].set_title("before: fixed / moving")
    axes[1].imshow(checkerboard(f, w), cmap="gray")
    axes[1].set_title("after: fixed / warped")
    diff = np.abs(f - w)
    im = axes[2].imshow(diff, cmap="magma")
    axes[2].set_title(f"|fixed - warped|, mean {diff.mean():.3f}")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    axes[3].imshow(m, cmap="gray", extent=(-1, 1, 1, -1))
    _grid_lines(axes[3], coords.detach().float().cpu().numpy(), max(1, coords.shape[0] // 24))
    axes[3].set_title("sampling grid on moving")
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: str | Path, compress_level: int = 6) -> Path:
    """Save and close a figure; the folder is created if needed. ``compress_level`` is the PNG's zlib
    level (0-9; 1 wrote the QC figure in half the time of 6, 20% larger)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, pil_kwargs={"compress_level": compress_level})
    plt.close(fig)
    return path
