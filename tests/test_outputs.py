"""Outputs that cost little: the one-pass label vote, the NIfTI field writer, save_result and its metrics."""

import gzip
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import stnreg
from stnreg import Grid, RegistrationResult
from stnreg.fast import fast_available
from stnreg.fields import jacobian_determinant, world_to_voxel_displacement
from stnreg.image import Image
from stnreg.io import read_transform, write_displacement
from stnreg.metrics import _jacobian_determinant_blocks, jacobian_stats
from stnreg.report import _deformable_on, _slab, qc_figure, save_result
from stnreg.sampler import sample
from stnreg.transforms.base import Composite
from stnreg.transforms.dense import StationaryVelocity
from stnreg.transforms.matrix import Affine

needs_numba = pytest.mark.skipif(not fast_available(torch.zeros(1), "zeros"), reason="numba kernels unavailable")


def _oblique_grid(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = len(shape)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    spacing = (0.7 + torch.rand(d, generator=g, dtype=torch.float64)).tolist()
    return Grid(shape, spacing, (20 * torch.randn(d, generator=g, dtype=torch.float64)).tolist(), q.tolist())


def _coords(n, out, ndim, dtype, g, structured=False, in_shape=None):
    """Random normalized coordinates reaching past the edges, or points on half-voxel positions
    (where neighbour weights tie exactly) when ``structured``."""
    if not structured:
        return torch.rand(n, *out, ndim, generator=g, dtype=torch.float64).to(dtype) * 2.6 - 1.3
    sizes = torch.tensor(list(reversed(in_shape)), dtype=dtype)
    half = torch.randint(-3, 2 * max(in_shape) + 2, (n, *out, ndim), generator=g).to(dtype) / 2
    return (half + 0.5) * 2 / sizes - 1


@needs_numba
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ndim", [2, 3])
def test_label_vote_equals_the_per_label_reference(ndim, dtype, padding, monkeypatch):
    from stnreg.fast.labels_cpu import label_sample

    g = torch.Generator().manual_seed(ndim * 10 + (dtype == torch.float64))
    in_shape = (11, 13, 12) if ndim == 3 else (37, 41)
    out = (9, 10, 8) if ndim == 3 else (45, 39)
    # Many labels (negative ones too) in small regions, few in large ones, over two items and channels.
    many = torch.randint(-5, 120, (2, 2, *in_shape), generator=g)
    few = torch.nn.functional.interpolate(
        torch.randint(0, 6, (2, 2, *(s // 3 for s in in_shape)), generator=g).double() * 7, size=in_shape
    ).long()
    for labels in (many, few, few.float() + 0.5, (few > 20).to(torch.uint8)):
        for structured in (False, True):
            for n_coords in (2, 1):
                coords = _coords(n_coords, out, ndim, dtype, g, structured, in_shape)
                # The reference is the per-label torch path: sample() would take the kernel itself.
                monkeypatch.setenv("STNREG_FAST", "0")
                ref = sample(labels, coords, "label", padding)
                monkeypatch.delenv("STNREG_FAST")
                ours = label_sample(labels, coords, padding)
                assert ours.dtype == labels.dtype
                assert torch.equal(ours, ref), (labels.dtype, structured, n_coords, int((ours != ref).sum()))


@needs_numba
def test_label_vote_needs_no_gradient_and_keeps_the_public_paths(monkeypatch):
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 40, (1, 1, 10, 11, 12), generator=g)
    coords = _coords(1, (7, 8, 9), 3, torch.float32, g).requires_grad_()
    ref = sample(labels.float(), coords, "label", "zeros")
    # Float labels whose tensor asks for a gradient, coordinates that ask for one: no graph either way.
    float_labels = labels.float().requires_grad_()
    out = stnreg.warp(float_labels, stnreg.Affine(3), out=(7, 8, 9), mode="label")
    assert not out.requires_grad
    from stnreg.fast.labels_cpu import label_sample

    ours = label_sample(float_labels, coords, "zeros")
    assert not ours.requires_grad and torch.equal(ours, ref)
    with torch.no_grad():
        assert torch.equal(label_sample(labels, coords, "zeros"), ref.long())
    # stnreg.apply and stnreg.warp give the reference path's labels.
    grid = Grid((10, 11, 12), (1.1, 0.9, 1.0), (-4.0, 3.0, 1.0))
    t = stnreg.Affine(3, params=torch.eye(3, 4).unsqueeze(0) + 0.03 * torch.randn(1, 3, 4, generator=g))
    image = Image(labels[0], grid)
    fast_apply = stnreg.apply(t, image, grid.with_shape((9, 12, 10)), "label")
    fast_warp = stnreg.warp(labels, t, out=(8, 8, 8), mode="label", padding="border")
    monkeypatch.setenv("STNREG_FAST", "0")
    assert torch.equal(fast_apply.data, stnreg.apply(t, image, grid.with_shape((9, 12, 10)), "label").data)
    assert torch.equal(fast_warp, stnreg.warp(labels, t, out=(8, 8, 8), mode="label", padding="border"))


@pytest.mark.parametrize("shape", [(6, 7, 5), (9, 8)])
def test_field_files_hold_the_bytes_itk_writes(tmp_path, shape):
    grid = _oblique_grid(shape)
    field = torch.randn(len(shape), *shape, generator=torch.Generator().manual_seed(1))
    path = write_displacement(tmp_path / "field.nii.gz", field, grid)
    plain = write_displacement(tmp_path / "field.nii", field, grid)
    img = sitk.GetImageFromArray(np.moveaxis(field.double().numpy(), 0, -1), isVector=True)
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    img.SetDirection([v for row in grid.direction for v in row])
    sitk.WriteImage(img, str(tmp_path / "itk.nii"))
    itk_bytes = (tmp_path / "itk.nii").read_bytes()
    assert gzip.decompress(path.read_bytes()) == itk_bytes
    assert plain.read_bytes() == itk_bytes
    # A displacement field transform straight from the file, no cast needed.
    back = sitk.ReadImage(str(path))
    assert back.GetPixelID() == sitk.sitkVectorFloat64
    sitk.DisplacementFieldTransform(back)
    # Formats other than NIfTI still go through ITK's writer.
    mha = write_displacement(tmp_path / "field.mha", field, grid)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(mha))), np.moveaxis(field.numpy(), 0, -1))


def test_jacobian_blocks_and_the_matrix_factor():
    g = torch.Generator().manual_seed(2)
    u = 0.4 * torch.randn(1, 3, 37, 9, 10, generator=g)
    i2w = _oblique_grid((37, 9, 10), seed=3).index_to_world()
    assert torch.equal(_jacobian_determinant_blocks(u, i2w), jacobian_determinant(world_to_voxel_displacement(u, i2w)))
    # Stats of x -> A (x + u(x)) + t from u and A equal those of the whole displacement in float64.
    grid = _oblique_grid((37, 9, 10), seed=4)
    disp = torch.nn.functional.avg_pool3d(3 * torch.randn(1, 3, 37, 9, 10, generator=g), 5, 1, 2)[0]
    a = torch.tensor([[1.1, 0.1, 0.0], [-0.05, 0.9, 0.2], [0.0, 0.1, 1.2]], dtype=torch.float64)
    pts = grid.points("world", torch.float64)
    total = torch.movedim((pts + torch.movedim(disp.double(), 0, -1)) @ a.T + 2.0 - pts, -1, 0)
    ours = jacobian_stats(disp, grid, a)
    det = jacobian_determinant(world_to_voxel_displacement(total[None], grid.index_to_world()))
    assert math.isclose(ours["folding_percent"], float((det <= 0).double().mean() * 100), abs_tol=0.2)
    assert math.isclose(ours["jacobian_min"], float(det.min()), rel_tol=1e-4, abs_tol=1e-4)
    assert math.isclose(ours["jacobian_max"], float(det.max()), rel_tol=1e-4)
    assert math.isclose(ours["sdlogj"], float(torch.log(det.clamp(1e-9, 1e9)).std()), rel_tol=1e-3)


def _result(shape=(14, 15, 13)):
    """A registration result from known transforms: an affine after a stationary velocity field."""
    g = torch.Generator().manual_seed(5)
    fixed_grid = _oblique_grid(shape, seed=6)
    fixed = Image(torch.rand(1, *shape, generator=g), fixed_grid, "fixed")
    moving = Image(torch.rand(1, 16, 17, 18, generator=g), Grid((16, 17, 18), origin=(-8.0, -9.0, -7.0)), "moving")
    matrix = Affine(3, params=torch.eye(3, 4)[None] + 0.05 * torch.randn(1, 3, 4, generator=g))
    velocity = 1.5 * torch.randn(1, 3, 5, 6, 5, generator=g)
    svf = StationaryVelocity((5, 6, 5), params=velocity, domain=fixed_grid.world_to_normalized())
    full = Composite([matrix, svf])
    warped = stnreg.apply(full, moving, fixed)
    settings = {"transform": "affine+svf", "loss": "lncc"}
    return RegistrationResult(warped, full, matrix, svf, fixed, moving, settings)


def test_save_result_writes_less_by_default_and_lists_it(tmp_path):
    r = _result()
    files = save_result(r, tmp_path / "out")
    assert set(files) == {"warped", "affine", "deformable", "qc", "report"}
    report = json.loads(files["report"].read_text())
    assert report["total_displacement"] is None
    assert report["files"] == {k: p.name for k, p in files.items()}
    assert {p.name for p in (tmp_path / "out").iterdir()} == set(report["files"].values())
    # The Jacobian statistics from the deformable field and the matrix are the whole transform's.
    grid = r.fixed.grid
    det = jacobian_determinant(world_to_voxel_displacement(r.displacement()[None].double(), grid.index_to_world()))
    assert math.isclose(report["metrics"]["jacobian"]["jacobian_min"], float(det.min()), rel_tol=1e-4)
    assert math.isclose(report["metrics"]["jacobian"]["sdlogj"], float(torch.log(det).std()), rel_tol=1e-3)
    # The folder reads back as the same map.
    pts = grid.points("world").reshape(1, -1, 3)
    torch.testing.assert_close(read_transform(tmp_path / "out")(pts), r.transform(pts), atol=1e-3, rtol=0)
    # On request, the whole transform as one field too.
    files = save_result(r, tmp_path / "all", total_displacement=True)
    report = json.loads(files["report"].read_text())
    assert report["total_displacement"] == "total_displacement.nii.gz" == report["files"]["total_displacement"]
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(files["total_displacement"])))
    np.testing.assert_allclose(back, np.moveaxis(r.displacement().numpy(), 0, -1), atol=1e-6)


@pytest.mark.parametrize(("axis", "where"), [(0, "middle"), (1, "middle"), (2, "middle"), (1, "edge")])
def test_qc_figure_slabs_match_the_volume(tmp_path, axis, where):
    r = _result((9, 10, 11))
    grid = r.fixed.grid
    k = grid.shape[axis] // 2 if where == "middle" else 0
    plane, slab, mid = _slab(grid, axis, k)
    pts = grid.points("world", torch.float64)
    torch.testing.assert_close(slab.points("world", torch.float64).select(axis, mid), pts.select(axis, k))
    torch.testing.assert_close(plane.points("world", torch.float64).select(axis, 0), pts.select(axis, k))
    # The deformable part's displacement cut from its field is the part evaluated on the slab ...
    deform = r.deformable_displacement()
    from_field = _deformable_on(r, slab, axis, k - mid, deform)
    torch.testing.assert_close(from_field, _deformable_on(r, slab, axis, k - mid, None), atol=1e-4, rtol=0)
    # ... and its Jacobian on the plane (central differences across it from the slab, one-sided at
    # the edge) is the whole volume's there.
    full = jacobian_determinant(world_to_voxel_displacement(deform[None].double(), grid.index_to_world()))
    part = jacobian_determinant(world_to_voxel_displacement(from_field[None], slab.index_to_world()))
    torch.testing.assert_close(part[0].select(axis, mid), full[0].select(axis, k))
    if axis == 0:
        assert qc_figure(r, tmp_path / "qc.png", deform).stat().st_size > 10_000
