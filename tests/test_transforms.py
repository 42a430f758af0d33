import itertools
import math

import pytest
import torch
from helpers import smooth_image

import stnreg
from stnreg import (
    Affine,
    Attention,
    BSpline,
    Composite,
    Displacement,
    Grid,
    Projective,
    Rigid,
    Similarity,
    StationaryVelocity,
    ThinPlateSpline,
    Translation,
    uniform_control_points,
    warp,
)
from stnreg.coords import lattice


def make_family(name: str, ndim: int):
    shape = (6, 7) if ndim == 2 else (4, 5, 6)
    if name == "tps":
        return ThinPlateSpline(uniform_control_points((3,) * ndim, 0.8))
    if name == "bspline":
        return BSpline((5,) * ndim)
    if name == "displacement":
        return Displacement(shape)
    if name == "svf":
        return StationaryVelocity(shape)
    return stnreg.FAMILIES[name](ndim)


FAMILY_NAMES = list(stnreg.FAMILIES)


def random_params(t, scale: float, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = t.identity_params(1).to(dtype)
    return base + scale * torch.randn(base.shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_identity_reproduces_input(name, ndim):
    t = make_family(name, ndim)
    shape = (9, 11) if ndim == 2 else (5, 6, 7)
    image = torch.rand(1, 2, *shape)
    assert t.params.shape == (1, *t.param_shape)
    assert t.num_params == math.prod(t.param_shape)
    out = warp(image, t)
    torch.testing.assert_close(out, image, atol=1e-6, rtol=0)
    pts = torch.rand(1, 13, ndim) * 2 - 1
    torch.testing.assert_close(t(pts), pts, atol=1e-6, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_gradcheck_parameters(name, ndim):
    t = make_family(name, ndim).double()
    shape = (5, 6) if ndim == 2 else (3, 4, 5)
    image = smooth_image(shape, seed=3)
    p = random_params(t, 0.02, seed=ndim).requires_grad_()

    def fn(params):
        return warp(image, t.with_params(params), out=(4, 5) if ndim == 2 else (3, 3, 4), padding="border")

    assert torch.autograd.gradcheck(fn, (p,), eps=1e-6, atol=1e-5)


def _sitk_image(sitk, array, spacing, origin, direction):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("family", ["rigid", "affine"])
def test_world_warp_matches_simpleitk(family, ndim):
    sitk = pytest.importorskip("SimpleITK")
    g = torch.Generator().manual_seed(7)
    shape = (40, 48) if ndim == 2 else (20, 24, 28)
    image = smooth_image(shape, seed=5)[0, 0]
    if ndim == 2:
        spacing, origin = (0.8, 1.1), (-12.0, 5.0)
        c, s = math.cos(0.3), math.sin(0.3)
        direction = (c, -s, s, c)
        out_spacing, out_origin, out_dir = (0.9, 1.0), (-10.0, 6.0), (1.0, 0.0, 0.0, 1.0)
        out_shape = (36, 44)
    else:
        spacing, origin = (0.8, 1.1, 1.3), (-12.0, 5.0, -3.0)
        direction = sitk.VersorTransform((0.2, 0.4, -0.7), 0.35).GetMatrix()
        out_spacing, out_origin, out_dir = (0.9, 1.0, 1.2), (-10.0, 6.0, -1.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
        out_shape = (18, 22, 24)
    moving = _sitk_image(sitk, image.numpy(), spacing, origin, direction)
    reference = _sitk_image(sitk, torch.zeros(out_shape).numpy(), out_spacing, out_origin, out_dir)
    src, dst = Grid(shape, spacing, origin, direction), Grid(out_shape, out_spacing, out_origin, out_dir)
    center = [float(v) for v in reference.TransformContinuousIndexToPhysicalPoint([n / 2 for n in reversed(out_shape)])]
    if family == "rigid":
        t = Rigid(ndim, params=random_params(Rigid(ndim), 0.15, 11).double(), center=center)
    else:
        t = Affine(ndim, params=random_params(Affine(ndim), 0.08, 12).double(), center=center)
    m = t.matrix()[0]
    itk_t = sitk.AffineTransform(ndim)
    itk_t.SetMatrix(m[:ndim, :ndim].reshape(-1).tolist())
    itk_t.SetTranslation(m[:ndim, ndim].tolist())
    ref = sitk.GetArrayFromImage(sitk.Resample(moving, reference, itk_t, sitk.sitkLinear, 0.0, sitk.sitkFloat64))
    ours = warp(image[None, None], t, dst, src)[0, 0]
    # Away from borders: voxels whose sampled position lies well inside the moving image.
    coords = t.sampling_grid(dst, src)[0]
    inside = (coords.abs() < 0.9).all(-1)
    assert inside.float().mean() > 0.3
    diff = (ours - torch.from_numpy(ref))[inside].abs().max()
    assert diff < 1e-4 * float(image.max() - image.min()), float(diff)
    del g


@pytest.mark.parametrize("ndim", [2, 3])
def test_tps_reproduces_control_point_displacements(ndim):
    cp = uniform_control_points((4,) * ndim if ndim == 2 else (3, 3, 3), 0.9)
    t = ThinPlateSpline(cp).double()
    targets = random_params(t, 0.05, 4)
    moved = t.with_params(targets)
    torch.testing.assert_close(moved(cp.double().unsqueeze(0)), targets, atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    "ndim",
    [2, 3],
)
def test_tps_regularization_trades_fit_for_smoothness(ndim):
    # Residual at the control points over their displacement: 0 unregularized, growing with λ towards
    # that of the best affine fit (< 1), never worse than not moving (2D: 0.02, 0.17, 0.58, 0.86, 0.95).
    # In 3D, +λ on the kernel U = r went through a singular system near λ = 1 (residual 3x the displacement).
    cp = uniform_control_points((4,) * ndim if ndim == 2 else (3, 3, 3), 0.9).double()
    targets = random_params(ThinPlateSpline(cp), 0.05, 4)
    residuals = []
    for lam in (0.01, 0.1, 1.0, 10.0, 100.0):
        smooth = ThinPlateSpline(cp, regularization=lam).double().with_params(targets)
        residuals.append(float((smooth(cp.unsqueeze(0)) - targets).norm() / (targets - cp).norm()))
    assert residuals[0] > 0.005 and residuals[-1] < 1, residuals
    assert all(a < b for a, b in itertools.pairwise(residuals)), residuals


def test_tps_kernel_at_zero_is_finite():
    from stnreg.transforms.tps import tps_kernel

    r2 = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64, requires_grad=True)
    for d in (2, 3):
        u = tps_kernel(r2, d)
        assert u[0] == 0 and torch.isfinite(u).all()
        (g,) = torch.autograd.grad(u.sum(), r2)
        assert torch.isfinite(g).all()


def test_tps_rejects_degenerate_points():
    with pytest.raises(ValueError, match="degenerate"):
        ThinPlateSpline(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))


@pytest.mark.parametrize("ndim", [2, 3])
def test_bspline_separable_matches_pointwise(ndim):
    t = BSpline((6, 5) if ndim == 2 else (5, 4, 6)).double()
    moved = t.with_params(random_params(t, 0.05, 9))
    shape = (13, 11) if ndim == 2 else (7, 9, 8)
    fast = moved.sampling_grid(shape)
    slow = moved(lattice(shape, dtype=torch.float64).unsqueeze(0))
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=0)
    assert moved.displacement(shape) is not None


def test_bspline_for_world_grid():
    grid = Grid((20, 30), (1.5, 2.0), (3.0, -4.0))
    t = BSpline.for_grid(grid, spacing=5)
    assert t.control_shape == (7, 9)
    torch.testing.assert_close(t.sampling_grid(grid, grid), grid.points("normalized").unsqueeze(0), atol=1e-6, rtol=0)


def _jacobian_det_voxels(disp_vox: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) with central differences, u in voxels, (1, 3, D, H, W) -> interior (D-2, H-2, W-2)."""
    u = disp_vox[0]
    grads = []
    for comp in range(3):
        row = []
        for axis in range(3):  # derivative along x, y, z -> array dims 2, 1, 0
            dim = 2 - axis
            f = u[comp]
            g = (f.narrow(dim, 2, f.shape[dim] - 2) - f.narrow(dim, 0, f.shape[dim] - 2)) / 2
            sl = [slice(1, -1)] * 3
            sl[dim] = slice(None)
            row.append(g[tuple(sl)])
        grads.append(torch.stack(row, -1))
    jac = torch.stack(grads, -2) + torch.eye(3, dtype=u.dtype)
    return torch.linalg.det(jac)


def test_svf_is_diffeomorphic_and_inverts():
    from stnreg.sampler import gaussian_blur

    shape = (40, 40, 40)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 3, *shape, generator=g, dtype=torch.float64)
    v_vox = gaussian_blur(noise, torch.full((1, 3), 6.0, dtype=torch.float64))  # smooth on a ~6 voxel scale
    v_vox = v_vox * (4.0 / v_vox.abs().max())  # velocities up to 4 voxels
    v = stnreg.displacement_index_to_normalized(v_vox)
    t = StationaryVelocity(shape, params=v)
    disp_vox = stnreg.displacement_normalized_to_index(t.field())
    assert disp_vox.abs().max() > 2.0  # displacements of several voxels
    assert _jacobian_det_voxels(disp_vox).min() > 0
    roundtrip = t.compose(t.inverse())
    err_vox = stnreg.displacement_normalized_to_index(roundtrip.field())
    assert err_vox[..., 6:-6, 6:-6, 6:-6].abs().max() < 0.05


def test_field_domain_survives_load_state_dict_and_with_params():
    # A world-space velocity field (anisotropic mm, so its vector map is no identity) restored into a
    # transform built with the default domain must warp as the original, through with_params too.
    grid = stnreg.Grid((10, 12, 14), spacing=(1.5, 1.0, 2.5), origin=(-5.0, 3.0, 7.0))
    v = 0.8 * torch.randn(1, 3, *grid.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    original = StationaryVelocity.for_grid(grid).double()
    restored = StationaryVelocity(grid.shape).double()
    restored.load_state_dict(original.state_dict())
    torch.testing.assert_close(restored.with_params(v).field(), original.with_params(v).field())
    image = smooth_image(grid.shape, seed=4).double()
    ours = warp(image, restored.with_params(v), grid, grid)
    torch.testing.assert_close(ours, warp(image, original.with_params(v), grid, grid))
    assert not torch.equal(ours, warp(image, StationaryVelocity(grid.shape).double().with_params(v), grid, grid))


@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_equals_warping_twice(ndim):
    # a.compose(b) maps x -> a(b(x)), so warping by it equals warping by a, then by b. The perturbations
    # are large enough that b∘a is far from a∘b (asserted), and the tolerances tight enough to tell them apart.
    shape = (32, 36) if ndim == 2 else (20, 22, 24)
    image = smooth_image(shape, seed=2, sigma=4.0)
    f = Affine(ndim, params=random_params(Affine(ndim), 0.2, 1))
    g = Similarity(ndim, params=random_params(Similarity(ndim), 0.2, 2))
    field = torch.randn(1, ndim, *[4] * ndim, generator=torch.Generator().manual_seed(ndim), dtype=torch.float64)
    mode = "bilinear" if ndim == 2 else "trilinear"
    u = Displacement(shape, params=0.08 * torch.nn.functional.interpolate(field, size=shape, mode=mode))
    pts = torch.rand(1, 50, ndim, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1.4 - 0.7
    nodes = lattice(shape, dtype=torch.float64).reshape(1, -1, ndim)

    # Points: exact for matrices and for a field after a matrix; the fused field exact at its own nodes.
    assert isinstance(f.compose(g), Affine)
    torch.testing.assert_close(f.compose(g)(pts), f(g(pts)), atol=1e-10, rtol=0)
    assert (g(f(pts)) - f(g(pts))).abs().max() > 0.03
    assert isinstance(u.compose(f), Composite)
    torch.testing.assert_close(u.compose(f)(pts), u(f(pts)), atol=1e-10, rtol=0)
    assert (f(u(pts)) - u(f(pts))).abs().max() > 0.03
    fused = u.compose(u)
    assert isinstance(fused, Displacement)
    torch.testing.assert_close(fused(nodes), u(u(nodes)), atol=1e-10, rtol=0)
    assert (2 * u(nodes) - nodes - u(u(nodes))).abs().max() > 0.03  # adding the displacements is not composing

    # Images: once through the composition = twice through the parts, up to the second resampling
    # (<= 0.004 here); the swapped order is off by >= 0.013.
    inner = (slice(None), slice(None), *tuple(slice(5, -5) for _ in shape))

    def check(composed, first, second):
        twice = warp(warp(image, first, padding="border"), second, padding="border")[inner]
        once = warp(image, composed, padding="border")[inner]
        torch.testing.assert_close(once, twice, atol=0.006, rtol=0)

    check(f.compose(g), f, g)
    check(u.compose(f), u, f)
    check(fused, u, u)


@pytest.mark.parametrize("name", ["translation", "rigid", "similarity", "attention", "affine", "projective"])
def test_matrix_inverse_is_exact(name):
    for ndim in (2, 3):
        t = stnreg.FAMILIES[name](ndim).double()
        t = t.with_params(random_params(t, 0.05, 3))
        pts = torch.rand(1, 20, ndim, dtype=torch.float64) * 2 - 1
        torch.testing.assert_close(t.inverse()(t(pts)), pts, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["tps", "bspline", "displacement"])
def test_numerical_inverse(name):
    t = make_family(name, 2).double()
    t = t.with_params(random_params(t, 0.03, 5))
    pts = torch.rand(1, 20, 2, dtype=torch.float64) * 1.2 - 0.6
    torch.testing.assert_close(t.inverse()(t(pts)), pts, atol=1e-6, rtol=0)
    torch.testing.assert_close(Composite([t.inverse(), t])(pts), pts, atol=1e-6, rtol=0)


def test_rotation_conventions():
    t = Rigid(2, params=torch.tensor([[math.pi / 2, 0.0, 0.0]]))
    torch.testing.assert_close(t(torch.tensor([[[1.0, 0.0]]])), torch.tensor([[[0.0, 1.0]]]), atol=1e-6, rtol=0)
    t3 = Rigid(3, params=torch.tensor([[0.0, 0.0, math.pi / 2, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(
        t3(torch.tensor([[[1.0, 0.0, 0.0]]])), torch.tensor([[[1.0, 1.0, 0.0]]]), atol=1e-6, rtol=0
    )
    c = Rigid(2, params=torch.tensor([[math.pi, 0.0, 0.0]]), center=[1.0, 1.0])
    torch.testing.assert_close(c(torch.tensor([[[1.0, 1.0]]])), torch.tensor([[[1.0, 1.0]]]), atol=1e-6, rtol=0)
    a = Attention(2, params=torch.tensor([[0.5, 0.2, -0.1]]))
    torch.testing.assert_close(a(torch.tensor([[[1.0, 1.0]]])), torch.tensor([[[0.7, 0.4]]]))
    p = Projective(2, params=torch.tensor([[1.0, 0, 0, 0, 1.0, 0, 0.5, 0]]))
    torch.testing.assert_close(p(torch.tensor([[[1.0, 2.0]]])), torch.tensor([[[1 / 1.5, 2 / 1.5]]]))
    tr = Translation(3, params=torch.tensor([[1.0, 2.0, 3.0]]))
    torch.testing.assert_close(tr(torch.zeros(1, 1, 3)), torch.tensor([[[1.0, 2.0, 3.0]]]))


def test_centre_is_honoured_after_load_state_dict_and_with_params():
    params = torch.tensor([[[1.1, 0.1, 0.0, 2.0], [0.0, 0.9, 0.2, -1.0], [0.1, 0.0, 1.2, 0.5]]])
    c = torch.tensor([10.0, -20.0, 30.0])
    centred = Affine(3, center=c.tolist())
    with torch.no_grad():
        centred.params.copy_(params)
    # x -> L (x - c) + c + t, at a point and at the centre itself.
    x = torch.tensor([[[1.0, 2.0, 3.0]]])
    lin, t = params[0, :, :3], params[0, :, 3]
    torch.testing.assert_close(centred(x)[0, 0], lin @ (x[0, 0] - c) + c + t)
    torch.testing.assert_close(centred(c[None, None])[0, 0], c + t)
    # A transform built without a centre takes the saved one with the state (it used to keep its own).
    restored = Affine(3)
    restored.load_state_dict(centred.state_dict())
    torch.testing.assert_close(restored.matrix(), centred.matrix())
    torch.testing.assert_close(restored.with_params(params).matrix(), centred.matrix())
    # And the other way round: a zero centre loaded into a centred transform.
    plain = Affine(3, params=params)
    centred.load_state_dict(Affine(3).state_dict())
    torch.testing.assert_close(centred.with_params(params).matrix(), plain.matrix())
    # The derived constants are not part of the state.
    assert set(restored.state_dict()) == {"params", "center"}


def test_batches_and_flat_params():
    theta = torch.tensor([[1.0, 0, 0.1, 0, 1.0, 0.0], [0.5, 0, 0, 0, 0.5, 0]])
    t = Affine(2).with_params(theta)
    assert t.params.shape == (2, 2, 3)
    image = torch.rand(1, 1, 8, 8)
    out = warp(image, t, out=(4, 4))
    assert out.shape == (2, 1, 4, 4)
    # Each item is warped by its own parameters (one image broadcast over the batch of transforms).
    for i in range(2):
        torch.testing.assert_close(out[i : i + 1], warp(image, Affine(2).with_params(theta[i : i + 1]), out=(4, 4)))
    assert (out[0] - out[1]).abs().max() > 0.1


def test_bad_parameters():
    with pytest.raises(ValueError, match="NaN"):
        Affine(2, params=torch.full((1, 2, 3), float("nan")))
    with pytest.raises(ValueError, match="expects parameters"):
        Rigid(3, params=torch.zeros(1, 4))
    with pytest.raises(TypeError, match="floating-point"):
        Affine(2, params=torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="2D image"):
        warp(torch.rand(1, 1, 8, 8), Affine(3))
    with pytest.raises(ValueError, match="batch"):
        warp(torch.rand(3, 1, 8, 8), Affine(2, batch=2))
    with pytest.raises(ValueError, match="at least 4"):
        BSpline((3, 5))
    with pytest.raises(ValueError, match="source Grid"):
        Affine(2).sampling_grid(Grid((4, 4)))


def test_owned_parameters_are_optimizable():
    """A transform optimized directly recovers a known shift (the demo's instance optimization path)."""
    image = smooth_image((48, 48), seed=4, dtype=torch.float32)
    truth = Translation(2, params=torch.tensor([[0.1, -0.06]]))
    target = warp(image, truth, padding="border")
    t = Translation(2)
    opt = torch.optim.Adam(t.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        loss = (warp(image, t, padding="border") - target).square().mean()
        loss.backward()
        opt.step()
    torch.testing.assert_close(t.params.detach(), truth.params, atol=5e-3, rtol=0)


def test_given_parameters_follow_the_module():
    t = Affine(2).with_params(torch.eye(2, 3).unsqueeze(0))
    assert t.double().params.dtype == torch.float64
    comp = Composite([Affine(2).with_params(torch.eye(2, 3).unsqueeze(0)), Translation(2)])
    assert all(p.dtype == torch.float64 for p in (comp.double().transforms[0].params, comp.transforms[1].params))


@pytest.mark.parametrize("shape", [(20, 24, 28), (15, 21)])
def test_field_on_a_resampled_copy_of_its_grid_matches_pointwise_evaluation(shape):
    # mapped_lattice takes a separable resize when the output lattice shares the field's frame.
    grid = stnreg.Grid(shape, spacing=tuple(0.7 + 0.2 * i for i in range(len(shape))), origin=(2.0,) * len(shape))
    coarse = grid.with_shape(tuple(s // 2 + 1 for s in shape))
    g = torch.Generator().manual_seed(0)
    params = 2.0 * torch.randn(1, len(shape), *coarse.shape, generator=g)
    for cls in (stnreg.Displacement, stnreg.StationaryVelocity):
        t = cls(coarse.shape, params=params, domain=coarse.world_to_normalized())
        fast = t.mapped_lattice(grid)
        pointwise = t(grid.points("world").unsqueeze(0).float())
        torch.testing.assert_close(fast, pointwise, atol=1e-4, rtol=1e-5)


def test_composite_sampling_grid_folds_the_source_map_into_the_matrices():
    g = torch.Generator().manual_seed(3)
    fixed = stnreg.Grid((6, 7, 8), spacing=(1.5, 1.0, 2.0), origin=(-40.0, 120.0, 7.0))
    source = stnreg.Grid((5, 9, 6), spacing=(2.0, 1.2, 1.1), origin=(-35.0, 118.0, 5.0))
    theta = torch.eye(3, 4).unsqueeze(0) + 0.05 * torch.randn(1, 3, 4, generator=g)
    field = Displacement.for_grid(fixed)
    field = field.with_params(torch.randn(1, 3, 6, 7, 8, generator=g).requires_grad_())
    comp = Composite([Affine(3).with_params(theta.requires_grad_()), field])
    folded = comp.sampling_grid(fixed, source)
    pts = fixed.points("world").unsqueeze(0)
    expected = stnreg.coords.apply_affine(source.world_to_normalized(), comp(pts))
    torch.testing.assert_close(folded, expected, atol=1e-5, rtol=1e-5)
    folded.square().sum().backward()
    assert theta.grad is not None and field.params.grad.abs().sum() > 0


def test_scaling_and_squaring_in_normalized_units_equals_composing_in_field_units():
    from stnreg.transforms.dense import compose_fields, scaling_and_squaring

    g = torch.Generator().manual_seed(4)
    v = torch.randn(2, 3, 7, 8, 9, generator=g, dtype=torch.float64) * 3.0
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    vmap = q @ torch.diag(torch.tensor([0.05, 0.08, 0.1], dtype=torch.float64))  # mm -> normalized, oblique
    u = v / 2**6
    for _ in range(6):
        u = compose_fields(u, u, vmap)
    torch.testing.assert_close(scaling_and_squaring(v, 6, vmap), u, atol=1e-10, rtol=1e-10)
    assert u.abs().max() > 0.5  # large enough that the compositions matter
