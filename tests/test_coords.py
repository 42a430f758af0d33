import pytest
import torch

from stnreg.coords import (
    Grid,
    apply_affine,
    array_order_to_xyz,
    displacement_index_to_normalized,
    index_to_normalized,
    lattice,
    normalized_to_index,
)


def test_normalized_matches_affine_grid_align_corners_false():
    for shape in [(5, 7), (3, 4, 6)]:
        ours = lattice(shape, "normalized", torch.float64)
        eye = torch.eye(len(shape), len(shape) + 1, dtype=torch.float64).unsqueeze(0)
        ref = torch.nn.functional.affine_grid(eye, [1, 1, *shape], align_corners=False)[0]
        torch.testing.assert_close(ours, ref)


def test_index_normalized_round_trip_and_centres():
    pts = torch.tensor([[0.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    u = index_to_normalized(pts, (2, 4))  # H=2, W=4: x has 4 voxels, y has 2
    torch.testing.assert_close(u, torch.tensor([[-0.75, -0.5], [0.75, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(normalized_to_index(u, (2, 4)), pts)


def test_grid_world_maps_are_itk():
    sitk = pytest.importorskip("SimpleITK")
    img = sitk.Image(6, 5, 4, sitk.sitkFloat32)
    img.SetSpacing((0.7, 1.3, 2.1))
    img.SetOrigin((-10.0, 4.0, 2.5))
    rot = sitk.VersorTransform((0.3, -0.5, 0.8), 0.6).GetMatrix()
    img.SetDirection(rot)
    grid = Grid((4, 5, 6), img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    for idx in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        want = img.TransformIndexToPhysicalPoint(idx)
        got = apply_affine(grid.index_to_world(), torch.tensor(idx, dtype=torch.float64))
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    back = apply_affine(grid.world_to_index(), w)
    torch.testing.assert_close(
        back, torch.tensor(img.TransformPhysicalPointToContinuousIndex(w.tolist()), dtype=torch.float64)
    )
    pts = grid.points("world", torch.float64)
    torch.testing.assert_close(
        pts[3, 4, 5], torch.tensor(img.TransformIndexToPhysicalPoint((5, 4, 3)), dtype=torch.float64)
    )


def test_with_shape_keeps_extent():
    grid = Grid((10, 20), (2.0, 1.0), (5.0, -3.0))
    half = grid.with_shape((5, 10))
    edge = lambda g: apply_affine(g.normalized_to_world(), torch.tensor([-1.0, -1.0], dtype=torch.float64))  # noqa: E731
    torch.testing.assert_close(edge(grid), edge(half))
    assert half.spacing == (4.0, 2.0)  # x: 20 -> 10 voxels, y: 10 -> 5


def test_field_helpers():
    u = torch.zeros(1, 2, 4, 8)
    u[:, 0] = 2.0  # 2 voxels along x (W=8)
    torch.testing.assert_close(displacement_index_to_normalized(u)[:, 0], torch.full((1, 4, 8), 0.5))
    torch.testing.assert_close(array_order_to_xyz(u)[:, 1], u[:, 0])


def test_bad_grids():
    with pytest.raises(ValueError, match="singular"):
        Grid((3, 3), direction=[[1, 0], [1, 0]])
    with pytest.raises(ValueError, match="spacing"):
        Grid((3, 3), spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="ndim"):
        Grid((3,))
