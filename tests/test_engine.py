"""The registration engine: solvers that converge, exact recovery of known transforms, the syn stage."""

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import smooth_image
from test_register import _pair_3d

import stnreg
from stnreg import Grid
from stnreg.image import Image
from stnreg.io import grid_from_sitk, to_sitk
from stnreg.register import Stage, register, register_many
from stnreg.register.solvers import LBFGS
from stnreg.sampler import gaussian_blur


def test_lbfgs_solves_each_pair_on_its_own():
    """Two independent quadratics with different conditioning: each pair reaches its minimum, flagged
    converged, and the result of a pair does not depend on the other pair in the batch."""
    target = torch.tensor([[3.0, -2.0], [0.5, 7.0]], dtype=torch.float64)
    weights = torch.tensor([[1.0, 30.0], [5.0, 0.2]], dtype=torch.float64)

    def objective(x):
        return (weights * (x - target).square()).sum(1) + 0.1 * (x - target).pow(4).sum(1)

    def step(a, b):
        return (b - a).abs().amax(1)

    both = LBFGS(tol=1e-6).minimize(objective, torch.zeros(2, 2, dtype=torch.float64), 200, step)
    assert bool(both.converged.all()) and both.iterations < 200
    torch.testing.assert_close(both.x, target, atol=1e-5, rtol=0)
    alone = LBFGS(tol=1e-6).minimize(
        lambda x: objective(torch.cat([x, target[1:]]))[:1], torch.zeros(1, 2, dtype=torch.float64), 200, step
    )
    torch.testing.assert_close(alone.x, both.x[:1], atol=1e-9, rtol=0)


def _rotated_pair(shift_px, rotation_deg=0.0, sigma=3.0):
    """A smooth 2D image (texture on a scale of ``sigma`` px) on a grid rotated by 30° with anisotropic
    spacing, and the same image moved by a known ITK transform (resampled with B-splines):
    ``moving(y) = fixed(T⁻¹(y))``."""
    # An object on a dark background (as a brain slice): the moved-in border is background too.
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    window = torch.sigmoid((28.0 - ((yy - 48) ** 2 + (xx - 46) ** 2).sqrt()) / 2.0).double()
    data = smooth_image((96, 96), sigma=sigma, seed=11, dtype=torch.float64)[0] * window
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    grid = Grid((96, 96), spacing=(0.9, 1.1), origin=(10.0, -5.0), direction=[[c, -s], [s, c]])
    fixed = Image(data.float(), grid, "fixed")
    f_itk = to_sitk(fixed)
    origin = np.array(f_itk.TransformContinuousIndexToPhysicalPoint([0.0, 0.0]))
    moved = np.array(f_itk.TransformContinuousIndexToPhysicalPoint([float(v) for v in shift_px]))
    truth = sitk.Euler2DTransform()
    truth.SetCenter(f_itk.TransformContinuousIndexToPhysicalPoint([40.0, 52.0]))
    truth.SetAngle(math.radians(rotation_deg))
    truth.SetTranslation((moved - origin).tolist())
    m_itk = sitk.Resample(f_itk, f_itk, truth.GetInverse(), sitk.sitkBSpline, 0.0)
    moving = Image(torch.from_numpy(sitk.GetArrayFromImage(m_itk)).float()[None], grid_from_sitk(m_itk), "moving")
    return moving, fixed, truth


def _error_px(result, fixed, truth, margin=20):
    """Mean distance (in pixels of the larger spacing) between the recovered and the true map over the
    fixed image's central region."""
    pts = fixed.grid.points("world", torch.float64)[margin:-margin, margin:-margin].reshape(-1, 2)
    want = torch.tensor([truth.TransformPoint(p) for p in pts.tolist()], dtype=torch.float64)
    got = result.transform(pts.float().unsqueeze(0))[0].double()
    return float((got - want).norm(dim=-1).mean()) / max(fixed.grid.spacing)


@pytest.mark.parametrize(
    ("family", "shift", "angle", "limit"),
    [("translation", (13.0, 17.0), 0.0, 0.01), ("rigid", (13.0, 17.0), 0.0, 0.01), ("rigid", (3.37, -2.81), 4.0, 0.01)],
)
def test_exact_2d_transform_recovered(family, shift, angle, limit):
    """Only fixed pixels mapped inside the moving image are scored (ITK's rule): the moved-in border
    does not pull the optimum."""
    moving, fixed, truth = _rotated_pair(shift, angle)
    r = register(moving, fixed, family, progress=False, device="cpu")
    assert _error_px(r, fixed, truth) < limit
    # Every level of the matrix stage ended by convergence, not by its iteration cap.
    assert all(all(s["converged"]) and s["iterations"] < s["cap"] for s in r.settings["solves"])
    assert r.settings["stage_losses"] == ["ncc"]  # the default lncc becomes a global NCC for matrix stages


def test_cubic_reading_removes_the_subpixel_bias_of_linear_interpolation():
    """A fine texture shifted by a fraction of a pixel: the NCC optimum through linear interpolation
    sits 0.03 px off (it low-passes by an amount that depends on the fraction); the default 2D
    reading, cubic B-splines at the last level, recovers the shift to 0.005 px."""
    moving, fixed, truth = _rotated_pair((3.37, -2.81), sigma=1.0)
    cubic = register(moving, fixed, "translation", progress=False, device="cpu")
    linear = register(moving, fixed, [Stage("translation", interpolation="linear")], progress=False, device="cpu")
    assert _error_px(cubic, fixed, truth) < 0.005
    assert _error_px(linear, fixed, truth) > 0.01


def test_3d_known_affine_recovered_to_0_1_mm():
    moving, fixed, truth = _pair_3d()
    r = register(moving, fixed, "affine", loss="ncc", progress=False, device="cpu")
    pts = fixed.grid.points("world", torch.float64).reshape(-1, 3)
    want = torch.tensor([truth.TransformPoint(p) for p in pts.tolist()], dtype=torch.float64)
    got = r.transform(pts.float().unsqueeze(0))[0].double()
    err = (got - want).norm(dim=-1)
    assert float(err.mean()) < 0.1, float(err.mean())


def test_batched_matrix_pairs_equal_separate_runs():
    moving_a, fixed, truth_a = _rotated_pair((2.5, -1.5))
    moving_b, _, truth_b = _rotated_pair((-4.0, 3.25), 3.0)
    batch = register_many([moving_a, moving_b], [fixed, fixed], "rigid", progress=False, device="cpu")
    for res, mov, truth in ((batch[0], moving_a, truth_a), (batch[1], moving_b, truth_b)):
        alone = register(mov, fixed, "rigid", progress=False, device="cpu")
        p = fixed.grid.points("world")[::9, ::9].reshape(1, -1, 2)
        assert float((res.transform(p) - alone.transform(p)).abs().max()) < 1e-3
        assert _error_px(res, fixed, truth) < 0.02


def test_syn_stage_recovers_a_smooth_warp_without_folding():
    """The symmetric greedy stage on a 2D pair related by a known diffeomorphism: the recovered map
    approaches the truth, the similarity rises, and no pixel folds."""
    grid = Grid((80, 80))
    fixed = Image(smooth_image((80, 80), sigma=2.5, seed=3, dtype=torch.float32)[0], grid, "fixed")
    g = torch.Generator().manual_seed(4)
    velocity = gaussian_blur(torch.randn(1, 2, 80, 80, generator=g), torch.full((1, 2), 8.0)) * 60  # mm
    truth = stnreg.StationaryVelocity((80, 80), domain=grid.world_to_normalized(), params=velocity)
    moving = stnreg.apply(truth.inverse(), fixed, fixed, padding="border")
    stages = [Stage("syn", shrink=(2, 1), iterations=(80, 40))]
    r = register(moving, fixed, stages, loss="lncc", window=5, progress=False, device="cpu")
    pts = grid.points("world")[15:-15, 15:-15].reshape(1, -1, 2)
    moved = float((truth(pts) - pts).norm(dim=-1).mean())
    err = float((r.transform(pts) - truth(pts)).norm(dim=-1).mean())
    assert moved > 1.0 and err < 0.3 * moved, (moved, err)
    m = r.metrics
    assert m["ncc_after"] > 0.97 > m["ncc_before"] + 0.05, m
    assert m["jacobian"]["folding_percent"] == 0.0


@pytest.mark.parametrize("loss", ["mse", "ncc"])
def test_fused_overlap_loss_matches_the_masked_reference(loss):
    """The fused kernel's overlap mode scores only voxels whose trilinear cell lies inside the moving
    image: the same value and θ gradient as the reference warp + loss with that mask, per pair."""
    from stnreg.fast import fused_affine_loss
    from stnreg.losses import SIMILARITIES
    from stnreg.sampler import sample

    g = torch.Generator().manual_seed(0)
    moving = torch.rand(2, 1, 10, 11, 12, dtype=torch.float64, generator=g)
    fixed = torch.rand(2, 1, 9, 10, 11, dtype=torch.float64, generator=g)
    theta = torch.eye(3, 4, dtype=torch.float64).repeat(2, 1, 1)
    theta[:, :, 3] = torch.tensor([[0.3, -0.2, 0.1], [-0.25, 0.15, 0.3]], dtype=torch.float64)
    theta[1, 0, 1] = 0.1
    theta.requires_grad_(True)
    ours = fused_affine_loss(moving, fixed, theta, loss, "border", reduce=False, overlap=True)
    (g_ours,) = torch.autograd.grad(ours.sum(), theta)
    coords = torch.nn.functional.affine_grid(theta, list(fixed.shape), align_corners=False)
    sizes = torch.tensor([12.0, 11.0, 10.0], dtype=torch.float64)
    index = ((coords.detach() + 1) * sizes - 1) / 2
    inside = ((index >= 0) & (index <= sizes - 1)).all(-1).unsqueeze(1).double()
    assert 0.2 < float(inside.mean()) < 0.95  # the test exercises both sides of the rule
    ref = SIMILARITIES[loss](sample(moving, coords, "linear", "border"), fixed, mask=inside, reduce=False)
    (g_ref,) = torch.autograd.grad(ref.sum(), theta)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-9)


def test_no_overlap_scores_infinity_so_a_line_search_backs_off():
    from stnreg.fast import fused_affine_loss

    moving, fixed = torch.rand(2, 1, 8, 8, 8, dtype=torch.float64), torch.rand(2, 1, 8, 8, 8, dtype=torch.float64)
    theta = torch.eye(3, 4, dtype=torch.float64).repeat(2, 1, 1)
    theta[1, 0, 3] = 5.0  # pair 1 maps every fixed voxel beyond the moving image
    theta.requires_grad_(True)
    value = fused_affine_loss(moving, fixed, theta, "ncc", "border", reduce=False, overlap=True)
    assert math.isfinite(float(value[0].detach())) and float(value[1].detach()) == math.inf
    (grad,) = torch.autograd.grad(value.sum(), theta)
    assert bool(grad[1].eq(0).all()) and bool(grad[0].ne(0).any())


def test_deformable_displacement_of_a_field_on_the_fixed_frame_equals_the_mapped_points():
    moving, fixed, _ = _pair_3d((20, 22, 24))
    stages = [Stage("affine", shrink=(2,), iterations=(30,)), Stage("svf", shrink=(2, 1), iterations=(10, 10))]
    r = register(moving, fixed, stages, progress=False, device="cpu")
    pts = fixed.grid.points("world", torch.float64)
    want = torch.movedim(r.deformable.mapped_lattice(fixed.grid).double()[0] - pts, -1, 0).float()
    got = r.deformable_displacement()
    assert float(want.abs().max()) > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
