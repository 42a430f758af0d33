"""The QC figure: its panels in 2D and 3D, with and without labels, the planes it cuts, and folding."""

import numpy as np
import pytest
import torch

import stnreg
from stnreg import Grid, RegistrationResult
from stnreg.fields import jacobian_determinant, world_to_voxel_displacement
from stnreg.image import Image
from stnreg.report import _qc_planes, qc_figure, qc_plot
from stnreg.transforms.base import Composite
from stnreg.transforms.dense import Displacement
from stnreg.transforms.matrix import Affine
from stnreg.viz import checkerboard, plt


def _result(shape, deformable=True, labels=False, spacing=None, direction=None, field=None):
    """A result of known transforms on a small grid: an affine after a smooth displacement field
    (``field`` ``(d, *shape)`` in mm instead, when given), or the affine alone; with ``labels``, a
    box label 1 off the centre of the fixed grid, and the same box in the moving image."""
    d = len(shape)
    g = torch.Generator().manual_seed(3)
    grid = Grid(shape, spacing, None, direction)
    fixed = Image(torch.rand(1, *shape, generator=g), grid, "fixed")
    moving = Image(torch.rand(1, *shape, generator=g), grid, "moving")
    matrix = Affine(d, params=torch.eye(d, d + 1)[None] + 0.02 * torch.randn(1, d, d + 1, generator=g))
    transform, part = matrix, None
    if deformable:
        if field is None:
            coarse = torch.randn(1, d, *([3] * d), generator=g)
            field = torch.nn.functional.interpolate(coarse, size=shape, mode="bilinear" if d == 2 else "trilinear")[0]
        part = Displacement(shape, params=field[None].float(), domain=grid.world_to_normalized())
        transform = Composite([matrix, part])
    warped = stnreg.apply(transform, moving, fixed)
    label_maps = (None, None, [])
    if labels:
        box = torch.zeros(1, *shape, dtype=torch.int64)
        box[(0, *(slice(1, 4) for _ in shape))] = 1
        label_maps = (Image(box, grid, "moving labels"), Image(box.clone(), grid, "fixed labels"), [1])
    settings = {"transform": "affine+field" if deformable else "affine", "loss": "ncc"}
    return RegistrationResult(warped, transform, matrix, part, fixed, moving, settings, label_maps=label_maps)


def _panels(fig):
    """The image panels (axes with a title, colour bars have none) and their titles, row by row."""
    axes = [ax for ax in fig.axes if ax.get_title()]
    return axes, [ax.get_title() for ax in axes]


def _texts(ax):
    return [t.get_text() for t in ax.texts]


@pytest.mark.parametrize(
    ("shape", "labels", "rows", "cols"),
    [((24, 20), False, 1, 4), ((10, 12, 14), False, 3, 4), ((10, 12, 14), True, 3, 5)],
)
def test_qc_panels_in_2d_3d_and_with_labels(shape, labels, rows, cols):
    r = _result(shape, labels=labels)
    fig = qc_plot(r, r.deformable_displacement())
    axes, titles = _panels(fig)
    assert len(axes) == rows * cols
    # One Jacobian colour bar per row, and it says that it clips.
    bars = [ax for ax in fig.axes if not ax.get_title()]
    assert len(bars) == rows and all("clipped to [0, 2]" in ax.get_ylabel() for ax in bars)
    expected = ["before: fixed vs moving", "after: fixed vs warped moving", "grid of the deformable part", "det J"]
    expected += ["labels: fixed green, warped magenta"] if labels else []
    for row in range(rows):
        for col, start in enumerate(expected):
            assert titles[row * cols + col].startswith(start), titles[row * cols + col]
        # The checkerboards say which squares are the fixed image's.
        assert "square (F): fixed" in titles[row * cols] and "square (F): fixed" in titles[row * cols + 1]
    # Each row is named on its first panel (the last text written there).
    names = [_texts(axes[row * cols])[-1] for row in range(rows)]
    if len(shape) == 2:
        assert names == ["2D image, 24 x 20 (H x W)"]
    else:
        assert [n.split(":")[0] for n in names] == ["axial", "coronal", "sagittal"]
        assert [n.split(" = ")[0].split()[-1] for n in names] == ["D", "H", "W"]
    plt.close(fig)


def test_planes_pass_through_the_label_centroid_and_follow_the_direction():
    # The box covers voxels 1..3 along each axis: centroid [2, 2, 2], far from the centre [5, 6, 7].
    r = _result((10, 12, 14), labels=True)
    _, fixed_labels, ids = r.label_maps
    planes = _qc_planes(r.fixed.grid, fixed_labels, ids)
    assert [(p.axis, p.index) for p in planes] == [(0, 2), (1, 2), (2, 2)]
    assert [(p.axis, p.index) for p in _qc_planes(r.fixed.grid)] == [(0, 5), (1, 6), (2, 7)]
    # The label panel draws both outlines through the box on every plane.
    fig = qc_plot(r)
    axes, _ = _panels(fig)
    for row in range(3):
        outline = axes[row * 5 + 4].get_images()[-1].get_array()
        assert outline[..., 3].sum() > 0
    plt.close(fig)
    # Array axis D along world y, H along z, W along x: the plane normal to D is coronal, and
    # superior (+z, along H) is up, so rows run upwards in the planes where H is the row axis.
    permuted = _qc_planes(Grid((10, 12, 14), direction=[[1, 0, 0], [0, 0, 1], [0, 1, 0]]))
    assert [(p.name.split(":")[0], p.axis) for p in permuted] == [("axial", 1), ("coronal", 0), ("sagittal", 2)]
    coronal = permuted[1]
    assert coronal.flip_rows and not coronal.flip_cols and coronal.edges == ("R", "L", "S", "I")
    # Anisotropic spacing: the panels keep the anatomy's proportions.
    r = _result((10, 12, 14), spacing=(1.0, 1.0, 3.0))
    fig = qc_plot(r)
    axes, _ = _panels(fig)
    assert axes[4].get_images()[0].axes.get_aspect() == pytest.approx(3.0)  # coronal: rows are D (z)
    plt.close(fig)


def test_a_folding_field_is_reported():
    shape = (20, 24)
    yy, xx = torch.meshgrid(torch.arange(20.0), torch.arange(24.0), indexing="ij")
    # u_x = -3 (x - 12) near (12, 10): det J = 1 + du_x/dx < 0 there.
    bump = torch.exp(-((xx - 12) ** 2 + (yy - 10) ** 2) / 8)
    field = torch.stack([-3 * (xx - 12) * bump, torch.zeros(shape)])
    r = _result(shape, field=field)
    det = jacobian_determinant(world_to_voxel_displacement(field[None].double(), r.fixed.grid.index_to_world()))
    folded = int((det <= 0).sum())
    assert folded > 0
    fig = qc_plot(r, r.deformable_displacement())
    axes, titles = _panels(fig)
    assert f"folding (≤ 0, green): {folded} px here" in titles[3]
    assert f"{100 * folded / det.numel():.3f}% of the volume" in titles[3]
    # Folded pixels are drawn below the colour range, in the folding colour.
    shown = axes[3].get_images()[0].get_array()
    assert int((shown < 0).sum()) == folded
    plt.close(fig)


def test_without_a_deformable_stage_the_panels_say_so(tmp_path):
    r = _result((8, 9, 10), deformable=False)
    fig = qc_plot(r)
    axes, titles = _panels(fig)
    assert len(axes) == 12
    for row in range(3):
        assert titles[row * 4 + 2].startswith("grid of the whole transform")
        assert "no deformable stage" in titles[row * 4 + 2]
        assert any(t.startswith("no deformable stage") for t in _texts(axes[row * 4 + 3]))
    plt.close(fig)
    assert qc_figure(r, tmp_path / "qc.png").stat().st_size > 10_000


def test_checkerboard_squares_are_square_and_start_with_the_first_image():
    a, b = np.zeros((6, 16)), np.ones((6, 16))
    # Rows 2 mm apart, columns 1 mm: a square is 2 columns wide and 1 row high.
    board = checkerboard(a, b, tiles=8, aspect=2.0)
    assert board[0, 0] == 0 and board[0, 2] == 1 and board[1, 0] == 1 and board[0, 1] == 0
