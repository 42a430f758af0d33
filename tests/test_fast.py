import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stnreg
from stnreg.fast import dispatch, fast_available, fast_lncc, fused_affine_warp

pytestmark = pytest.mark.skipif(not fast_available(torch.zeros(1), "zeros"), reason="numba kernels unavailable")


@pytest.fixture
def ran():
    """``ran(site, path)``: how often :mod:`stnreg.fast.dispatch` chose ``path`` at ``site`` in this test."""
    with dispatch.record() as events:
        yield lambda site, path: sum(e[:2] == (site, path) for e in events)


def _reference(image, theta, out, padding):
    grid = F.affine_grid(theta, [theta.shape[0], 1, *out], align_corners=False)
    return F.grid_sample(image, grid, padding_mode=padding, align_corners=False)


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize(("shape", "out"), [((2, 3, 20, 24), (15, 17)), ((2, 2, 10, 12, 14), (9, 11, 13))])
def test_matches_grid_sample_values_and_gradients(shape, out, padding):
    g = torch.Generator().manual_seed(0)
    d = len(out)
    image = torch.rand(shape, generator=g, requires_grad=True)
    theta = (torch.eye(d, d + 1) + 0.15 * torch.randn(2, d, d + 1, generator=g)).requires_grad_()
    ours = fused_affine_warp(image, theta, out, padding)
    ref = _reference(image, theta, out, padding)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    go = torch.randn(ours.shape, generator=g)
    g_ours = torch.autograd.grad(ours, (image, theta), go)
    g_ref = torch.autograd.grad(ref, (image, theta), go)
    torch.testing.assert_close(g_ours[0], g_ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_ours[1], g_ref[1], atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("d", [2, 3])
def test_gradcheck_float64(d):
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 1, *[5] * d, dtype=torch.float64, generator=g).requires_grad_()
    theta = torch.eye(d, d + 1, dtype=torch.float64) + 0.1 * torch.randn(1, d, d + 1, dtype=torch.float64, generator=g)
    theta.requires_grad_()
    assert torch.autograd.gradcheck(lambda i, t: fused_affine_warp(i, t, (4,) * d, "zeros"), (image, theta))


def test_warp_uses_the_fast_path_transparently(monkeypatch, ran):
    image = torch.rand(1, 1, 12, 13, 14)
    t = stnreg.Affine(3, params=torch.eye(3, 4).unsqueeze(0) + 0.05)
    fast = stnreg.warp(image, t, out=(8, 9, 10))
    assert ran("warp", "affine") == 1
    monkeypatch.setenv("STNREG_FAST", "0")
    ref = stnreg.warp(image, t, out=(8, 9, 10))
    assert ran("warp", "affine") == 1 and ran("warp", "reference") == 1
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_the_report_switch_says_which_path_ran_and_why(monkeypatch, capsys):
    monkeypatch.setenv("STNREG_FAST_REPORT", "1")
    t = stnreg.Affine(3, params=torch.eye(3, 4).unsqueeze(0) + 0.05)
    stnreg.warp(torch.rand(1, 1, 6, 7, 8), t)
    stnreg.warp(torch.rand(1, 1, 6, 7), stnreg.Affine(2))
    monkeypatch.setenv("STNREG_FAST", "0")
    stnreg.warp(torch.rand(1, 1, 6, 7, 8), t)
    lines = capsys.readouterr().err.splitlines()
    assert "stnreg.fast: warp: affine" in lines
    assert "stnreg.fast: warp: reference (2D image: grid_sample measured faster)" in lines
    assert "stnreg.fast: warp: reference (STNREG_FAST=0)" in lines


def test_deterministic_across_thread_counts():
    image = torch.rand(1, 1, 16, 18, 20)
    theta = (torch.eye(3, 4) + 0.05).unsqueeze(0).requires_grad_()
    grads = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            (g,) = torch.autograd.grad(fused_affine_warp(image, theta, (16, 18, 20)).square().sum(), theta)
            grads.append(g)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("loss", ["mse", "ncc"])
def test_fused_similarity_matches_autograd(loss, padding):
    from stnreg.fast import fused_affine_loss
    from stnreg.losses import mse_loss, ncc_loss

    g = torch.Generator().manual_seed(2)
    moving = torch.rand(2, 1, 12, 13, 14, dtype=torch.float64, generator=g)
    fixed = torch.rand(2, 1, 9, 10, 11, dtype=torch.float64, generator=g)
    theta = torch.eye(3, 4, dtype=torch.float64) + 0.1 * torch.randn(2, 3, 4, dtype=torch.float64, generator=g)
    theta.requires_grad_()
    ours = fused_affine_loss(moving, fixed, theta, loss, padding)
    warped = _reference(moving, theta, (9, 10, 11), padding)
    ref = (mse_loss if loss == "mse" else ncc_loss)(warped, fixed)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, theta)
    (g_ref,) = torch.autograd.grad(ref, theta)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-12, rtol=1e-10)


def test_fused_similarity_rejects_what_it_cannot_do():
    from stnreg.fast import fused_affine_loss

    theta = torch.eye(3, 4).unsqueeze(0)
    with pytest.raises(ValueError, match="image gradient"):
        fused_affine_loss(torch.rand(1, 1, 4, 4, 4, requires_grad=True), torch.rand(1, 1, 4, 4, 4), theta)
    with pytest.raises(ValueError, match=r"\(N, C, D, H, W\)"):
        fused_affine_loss(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), theta)
    with pytest.raises(ValueError, match="fused losses"):
        fused_affine_loss(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 4), theta, "lncc")


def _coords(shape, out, g, dtype=torch.float32):
    """Smoothly perturbed lattice coordinates reaching a little outside the image."""
    base = stnreg.lattice(out, dtype=dtype).unsqueeze(0) * 1.1
    return (base + 0.1 * torch.randn(shape[0], *out, 3, generator=g, dtype=dtype)).contiguous()


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_grad", [False, True])
@pytest.mark.parametrize("keep_derivative", [True, False])
def test_fast_sample_matches_grid_sample(monkeypatch, padding, channels, image_grad, keep_derivative):
    from stnreg.fast import fast_sample, field

    # Without the budget, multi-channel samples take the second gather pass in the backward.
    monkeypatch.setattr(field, "KEEP_DERIVATIVE_MAX", 2**24 if keep_derivative else 0)
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, channels, 10, 12, 14, generator=g).requires_grad_(image_grad)
    coords = _coords(image.shape, (9, 11, 13), g).requires_grad_()
    ours = fast_sample(image, coords, padding)
    ref = F.grid_sample(image, coords, padding_mode=padding, align_corners=False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    go = torch.randn(ours.shape, generator=g)
    inputs = (image, coords) if image_grad else (coords,)
    for a, b in zip(torch.autograd.grad(ours, inputs, go), torch.autograd.grad(ref, inputs, go), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("spatial", [(1, 5, 6), (2, 1, 7), (4, 3, 1), (2, 2, 2)])
def test_fast_sample_matches_grid_sample_on_thin_images_and_far_positions(padding, spatial):
    """Axes of 1 or 2 voxels have no interior (or one cell), and positions 1e12 pixels away must
    neither crash the cell arithmetic nor read outside the image."""
    from stnreg.fast import fast_sample

    g = torch.Generator().manual_seed(4)
    image = torch.rand(2, 2, *spatial, generator=g, requires_grad=True)
    coords = _coords(image.shape, (3, 4, 5), g)
    coords[0, 0, 0, :3] = torch.tensor([[1e12, 0.0, 0.0], [0.0, -1e12, 0.0], [3e11, 2e11, -1e12]])
    coords.requires_grad_()
    ours = fast_sample(image, coords, padding)
    ref = F.grid_sample(image, coords, padding_mode=padding, align_corners=False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    go = torch.randn(ours.shape, generator=g)
    for a, b in zip(
        torch.autograd.grad(ours, (image, coords), go), torch.autograd.grad(ref, (image, coords), go), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_fast_sample_gradcheck_float64(padding):
    from stnreg.fast import fast_sample

    g = torch.Generator().manual_seed(4)
    image = torch.rand(1, 1, 5, 6, 7, dtype=torch.float64, generator=g).requires_grad_()
    # Away from the kinks of linear interpolation (integer positions), where finite differences fail.
    coords = (_coords(image.shape, (4, 5, 6), g, torch.float64) * 0.9 + 0.013).requires_grad_()
    assert torch.autograd.gradcheck(lambda i, c: fast_sample(i, c, padding), (image, coords))


def test_sample_uses_the_fast_path_for_3d_and_is_deterministic(monkeypatch, ran):
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 1, 16, 18, 20, generator=g)
    coords = _coords(image.shape, (16, 18, 20), g)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            c = coords.clone().requires_grad_()
            out = stnreg.sample(image, c)
            results.append((out, torch.autograd.grad(out.square().sum(), c)[0]))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert ran("sample", "trilinear") == 2
    monkeypatch.setenv("STNREG_FAST", "0")
    torch.testing.assert_close(stnreg.sample(image, coords), results[0][0], atol=1e-5, rtol=1e-5)


def test_fast_paths_reject_non_finite_input():
    from stnreg.fast import fast_sample, fused_affine_warp

    coords = stnreg.lattice((4, 4, 4)).unsqueeze(0).clone()
    coords[0, 1, 2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinity"):
        fast_sample(torch.rand(1, 1, 4, 4, 4), coords)
    theta = torch.eye(3, 4).unsqueeze(0).clone()
    theta[0, 0, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinity"):
        fused_affine_warp(torch.rand(1, 1, 4, 4, 4), theta, (4, 4, 4))


@pytest.mark.parametrize(
    ("size", "window"), [((12, 13, 14), (5, 3, 7)), ((3, 17, 5), (9, 3, 11)), ((20, 9, 1), (1, 21, 3))]
)
def test_box_filter_matches_zero_padded_average_pooling(size, window):
    """The LNCC box filter (running sums by rows, z in blocks of rows), windows larger than the image
    included, against average pooling of the zero-padded image."""
    from stnreg.fast.lncc_cpu import box3d

    x = torch.rand(size, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out, tmp = np.empty(size), np.empty(size)
    box3d(x.numpy(), window, out, tmp)
    padded = F.pad(x, [k // 2 for k in reversed(window) for _ in range(2)])
    ref = F.avg_pool3d(padded[None, None], window, stride=1)[0, 0]
    torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_lncc_matches_autograd(monkeypatch, masked, dtype):
    from stnreg.losses import lncc_loss

    g = torch.Generator().manual_seed(6)
    a = torch.rand(2, 2, 12, 13, 14, generator=g, dtype=dtype)
    b = torch.rand(2, 2, 12, 13, 14, generator=g, dtype=dtype)
    a[:, :, :4] = 0  # flat windows: zero variance, where the clamps act
    b[:, :, :3] = 0
    a.requires_grad_()
    mask = torch.rand(1, 1, 12, 13, 14, generator=g, dtype=dtype) if masked else None
    ours = lncc_loss(a, b, (5, 3, 7), mask)
    (g_ours,) = torch.autograd.grad(ours, a)
    monkeypatch.setenv("STNREG_FAST", "0")
    ref = lncc_loss(a, b, (5, 3, 7), mask)
    (g_ref,) = torch.autograd.grad(ref, a)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(g_ours, g_ref, atol=tol * 1e-3, rtol=1e-5)
    assert g_ref.abs().max() > 1e-4  # the comparison is not between zeros


def test_fast_lncc_keeps_fixed_statistics_only_while_the_fixed_image_is_unchanged(monkeypatch):
    from stnreg.losses import lncc_loss

    g = torch.Generator().manual_seed(7)
    a = torch.rand(2, 1, 10, 11, 12, generator=g)
    b = torch.rand(2, 1, 10, 11, 12, generator=g)

    def ref(x, y, window):
        monkeypatch.setenv("STNREG_FAST", "0")
        out = lncc_loss(x, y, window)
        monkeypatch.delenv("STNREG_FAST")
        return out

    first = lncc_loss(a, b, (3, 3, 3))
    assert fast_lncc(a, b, (3, 3, 3)) == first  # served from the kept statistics
    torch.testing.assert_close(first, ref(a, b, (3, 3, 3)))
    b[1].mul_(0.5).add_(torch.rand(1, 10, 11, 12, generator=g))  # in place: a new version
    torch.testing.assert_close(lncc_loss(a, b, (3, 3, 3)), ref(a, b, (3, 3, 3)))
    torch.testing.assert_close(lncc_loss(a, b, (5, 3, 3)), ref(a, b, (5, 3, 3)))
    other = b.clone()
    other[0].fill_(0.25)  # another tensor with partly the same content
    torch.testing.assert_close(lncc_loss(a, other, (5, 3, 3)), ref(a, other, (5, 3, 3)))


def _warp_twice(monkeypatch, image, make, params, **kw):
    """``stnreg.warp`` with the fast paths and with the reference path: outputs and ``∂/∂params``.

    The on-the-fly B-spline kernel is forced for these small test volumes.
    """
    monkeypatch.setattr(dispatch, "BSPLINE_ON_THE_FLY_MIN", 0)
    results = []
    for fast in ("1", "0"):
        monkeypatch.setenv("STNREG_FAST", fast)
        p = params.detach().clone().requires_grad_()
        out = stnreg.warp(image, make(p), **kw)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
        results.append((out.detach(), torch.autograd.grad(out, p, go)[0]))
    return results


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("channels", [1, 2])
def test_bspline_warp_on_the_fly_matches_the_reference(monkeypatch, ran, padding, channels):
    g = torch.Generator().manual_seed(6)
    image = torch.rand(2, channels, 14, 16, 18, generator=g)
    spline = stnreg.BSpline((5, 6, 7))
    coef = 0.1 * torch.randn(2, 3, 5, 6, 7, generator=g)
    (fast_out, fast_grad), (ref_out, ref_grad) = _warp_twice(
        monkeypatch, image, spline.with_params, coef, out=(12, 15, 17), padding=padding
    )
    assert ran("warp", "bspline") == 1
    torch.testing.assert_close(fast_out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_grad, ref_grad, atol=1e-4 * ref_grad.abs().max().item(), rtol=1e-5)


def _oblique_source_and_fixed() -> tuple[stnreg.Grid, stnreg.Grid]:
    """A moving grid that is oblique and anisotropic, unlike the fixed one, both in mm."""
    c, s = 0.96, 0.28
    source = stnreg.Grid(
        (16, 18, 20),
        spacing=(1.2, 1.0, 0.9),
        origin=(-9.0, -10.0, -8.0),
        direction=((c, -s, 0.0), (s, c, 0.0), (0.0, 0.0, 1.0)),
    )
    return source, stnreg.Grid((13, 15, 17), spacing=(1.3, 1.1, 1.0), origin=(-8.0, -7.0, -6.0))


def _near_identity_affine(g: torch.Generator) -> stnreg.Affine:
    return stnreg.Affine(3, params=(torch.eye(3, 4) + 0.03 * torch.randn(3, 4, generator=g)).unsqueeze(0))


def _after_matrices_twice(monkeypatch, image, affine, inner, params, source, fixed):
    """:func:`_warp_twice` of ``affine ∘ inner(params)`` from ``source`` onto ``fixed`` in world
    space, border padding."""
    return _warp_twice(
        monkeypatch,
        image,
        lambda p: affine.compose(inner.with_params(p)),
        params,
        out=fixed,
        source=source,
        padding="border",
    )


def test_bspline_in_world_space_after_matrices_matches_the_reference(monkeypatch, ran):
    g = torch.Generator().manual_seed(7)
    source, fixed = _oblique_source_and_fixed()
    image = torch.rand(1, 1, *source.shape, generator=g)
    spline = stnreg.BSpline.for_grid(fixed, 4)
    affine = _near_identity_affine(g)
    coef = 0.8 * torch.randn(1, *spline.param_shape, generator=g)
    (fast_out, fast_grad), (ref_out, ref_grad) = _after_matrices_twice(
        monkeypatch, image, affine, spline, coef, source, fixed
    )
    assert ran("warp", "bspline") == 1
    torch.testing.assert_close(fast_out, ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fast_grad, ref_grad, atol=1e-4 * ref_grad.abs().max().item(), rtol=1e-5)
    # A matrix that is itself being optimized, or an image that needs a gradient, takes the reference path.
    monkeypatch.setenv("STNREG_FAST", "1")
    moving = affine.with_params(affine.params.clone().requires_grad_())
    stnreg.warp(image, moving.compose(spline.with_params(coef)), fixed, source)
    stnreg.warp(image.clone().requires_grad_(), spline.with_params(coef), fixed, source)
    assert ran("warp", "bspline") == 1  # still only the comparison's fast call


def test_bspline_on_the_fly_is_deterministic_and_gradchecks(monkeypatch, ran):
    from stnreg.fast import fused_bspline_warp

    g = torch.Generator().manual_seed(8)
    image = torch.rand(1, 1, 9, 10, 11, generator=g)
    spline = stnreg.BSpline((4, 5, 6))
    coef = 0.1 * torch.randn(1, 3, 4, 5, 6, generator=g)
    grads = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            p = coef.clone().requires_grad_()
            grads.append(torch.autograd.grad(stnreg.warp(image, spline.with_params(p)).square().sum(), p)[0])
    finally:
        torch.set_num_threads(old)
    assert torch.equal(grads[0], grads[1])
    # Small volumes whose coefficients need a gradient go through the dense field (measured faster);
    # forward alone always runs on the fly.
    assert ran("warp", "bspline") == 0
    stnreg.warp(image, spline.with_params(coef))
    assert ran("warp", "bspline") == 1
    monkeypatch.setattr(dispatch, "BSPLINE_ON_THE_FLY_MIN", 0)
    grads = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        p = coef.clone().requires_grad_()
        grads.append(torch.autograd.grad(stnreg.warp(image, spline.with_params(p)).square().sum(), p)[0])
    torch.set_num_threads(old)
    assert ran("warp", "bspline") == 3 and torch.equal(grads[0], grads[1])
    img64 = image.double()
    inner, pixel_map = dispatch.warp_chain(img64, spline.with_params(coef), None)
    _, k, r, tables = inner.fast_warp_args((6, 7, 8), pixel_map)
    p64 = coef.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda c: fused_bspline_warp(img64, c, k, r, tables, (6, 7, 8), "zeros"), (p64,))


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("channels", [1, 2])
def test_tps_warp_on_the_fly_matches_the_reference(monkeypatch, ran, padding, channels):
    g = torch.Generator().manual_seed(10)
    image = torch.rand(2, channels, 12, 14, 16, generator=g)
    cp = stnreg.uniform_control_points((3, 3, 3)) * 0.9
    spline = stnreg.ThinPlateSpline(cp)
    params = cp + 0.08 * torch.randn(2, 27, 3, generator=g)
    (fast_out, fast_grad), (ref_out, ref_grad) = _warp_twice(
        monkeypatch, image, spline.with_params, params, out=(10, 13, 15), padding=padding
    )
    assert ran("warp", "tps") == 1
    torch.testing.assert_close(fast_out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_grad, ref_grad, atol=1e-4 * ref_grad.abs().max().item(), rtol=1e-4)


def test_tps_in_world_space_after_matrices_matches_the_reference(monkeypatch, ran):
    g = torch.Generator().manual_seed(11)
    source, fixed = _oblique_source_and_fixed()
    image = torch.rand(1, 1, *source.shape, generator=g)
    cp = torch.rand(20, 3, generator=g) * torch.tensor([17.0, 15.0, 13.0]) + torch.tensor([-8.0, -7.0, -6.0])
    spline = stnreg.ThinPlateSpline(cp)
    affine = _near_identity_affine(g)
    params = cp + 0.7 * torch.randn(1, 20, 3, generator=g)
    (fast_out, fast_grad), (ref_out, ref_grad) = _after_matrices_twice(
        monkeypatch, image, affine, spline, params, source, fixed
    )
    assert ran("warp", "tps") == 1
    torch.testing.assert_close(fast_out, ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fast_grad, ref_grad, atol=1e-4 * ref_grad.abs().max().item(), rtol=1e-4)
    # A matrix being optimized, an image that needs a gradient, or a 2D spline take the reference path.
    moving = affine.with_params(affine.params.clone().requires_grad_())
    stnreg.warp(image, moving.compose(spline.with_params(params)), fixed, source)
    stnreg.warp(image.clone().requires_grad_(), spline.with_params(params), fixed, source)
    cp2 = stnreg.uniform_control_points((3, 3))
    stnreg.warp(torch.rand(1, 1, 8, 9), stnreg.ThinPlateSpline(cp2, params=cp2[None] * 0.9))
    assert ran("warp", "tps") == 1


def test_tps_on_the_fly_is_deterministic_and_gradchecks(ran):
    from stnreg.fast import fused_tps_warp

    g = torch.Generator().manual_seed(12)
    image = torch.rand(1, 1, 9, 10, 11, generator=g)
    cp = stnreg.uniform_control_points((2, 2, 3)) * 0.8
    spline = stnreg.ThinPlateSpline(cp)
    params = cp + 0.1 * torch.randn(1, 12, 3, generator=g)
    grads = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            p = params.clone().requires_grad_()
            grads.append(torch.autograd.grad(stnreg.warp(image, spline.with_params(p)).square().sum(), p)[0])
    finally:
        torch.set_num_threads(old)
    assert ran("warp", "tps") == 2 and torch.equal(grads[0], grads[1])
    img64 = image.double()
    inner, pixel_map = dispatch.warp_chain(img64, spline.with_params(params), None)
    _, cps, p_map, m = inner.fast_warp_args((6, 7, 8), pixel_map)
    coef = spline.with_params(params.double()).coefficients().detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda c: fused_tps_warp(img64, c, cps, p_map, m, (6, 7, 8)), (coef,))
    with pytest.raises(ValueError, match="coefficients"):
        fused_tps_warp(img64, coef[:, :-1], cps, p_map, m, (6, 7, 8))


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("out", [(10, 12, 14), (7, 9, 11)])
def test_displacement_warp_reads_the_field_in_place_and_matches_the_reference(monkeypatch, ran, padding, channels, out):
    g = torch.Generator().manual_seed(11)
    image = torch.rand(2, channels, 9, 11, 13, generator=g)
    field = 0.15 * torch.randn(2, 3, 10, 12, 14, generator=g)
    family = stnreg.Displacement((10, 12, 14), batch=2)
    # Output on the field's own lattice, and a coarser output (the field resized, as the reference does).
    (fast_out, fast_grad), (ref_out, ref_grad) = _warp_twice(
        monkeypatch, image, family.with_params, field, out=out, padding=padding
    )
    assert ran("warp", "field") == 1
    torch.testing.assert_close(fast_out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_grad, ref_grad, atol=1e-5 * ref_grad.abs().max().item(), rtol=1e-5)


def test_field_compositions_read_the_fields_in_place_and_match_the_reference(monkeypatch, ran):
    g = torch.Generator().manual_seed(13)
    # Float64: float32 rounding of the two paths' positions moves a few across a cell boundary
    # (a kink of trilinear interpolation), where the gradients differ by design.
    a = 0.1 * torch.randn(2, 3, 9, 10, 11, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(1, 3, 9, 10, 11, generator=g, dtype=torch.float64)
    # An anisotropic world frame, so that the field-to-lattice vector map is no identity.
    domain = stnreg.Grid((9, 10, 11), spacing=(1.0, 1.5, 2.5)).world_to_normalized()
    velocity = stnreg.StationaryVelocity((9, 10, 11), domain=domain)
    displacement = stnreg.Displacement((9, 10, 11), domain=domain)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("STNREG_FAST", flag)
        pa, pb = a.clone().requires_grad_(), b.clone().requires_grad_()
        exp = velocity.with_params(pa).field()
        composed = displacement.with_params(pb).compose(displacement.with_params(pa)).field()
        go = torch.randn(exp.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grads = torch.autograd.grad((exp * go).sum() + (composed * go).sum(), (pa, pb))
        results.append((exp.detach(), composed.detach(), *grads))
    # Seven squarings and one composition on the kernels, then the same on grid_sample.
    assert ran("displaced", "field") == 8 and ran("displaced", "reference") == 8
    for fast_value, ref_value in zip(*results, strict=True):
        torch.testing.assert_close(fast_value, ref_value, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("channels", [1, 2])
def test_field_warp_backward_twice_gives_the_same_gradient_bit_for_bit(channels):
    # The first backward turns the kept ∂out/∂u into the field's gradient (in place with one
    # channel) and drops it; a second one through the same graph must make it again.
    g = torch.Generator().manual_seed(14)
    image = torch.rand(1, channels, 9, 10, 11, generator=g)
    field = (0.1 * torch.randn(1, 3, 9, 10, 11, generator=g)).requires_grad_()
    out = stnreg.warp(image, stnreg.Displacement((9, 10, 11)).with_params(field))
    go = torch.randn(out.shape, generator=g)
    first = torch.autograd.grad(out, field, go, retain_graph=True)[0]
    kept = first.clone()
    second = torch.autograd.grad(out, field, go)[0]
    assert torch.equal(first, kept) and torch.equal(second, first)
    assert second.abs().sum() > 0


def test_velocity_field_after_matrices_in_world_space_matches_the_reference(monkeypatch, ran):
    g = torch.Generator().manual_seed(12)
    source, fixed = _oblique_source_and_fixed()
    image = torch.rand(1, 1, *source.shape, generator=g)
    svf = stnreg.StationaryVelocity.for_grid(fixed)
    affine = _near_identity_affine(g)
    velocity = 0.7 * torch.randn(1, *svf.param_shape, generator=g)
    (fast_out, fast_grad), (ref_out, ref_grad) = _after_matrices_twice(
        monkeypatch, image, affine, svf, velocity, source, fixed
    )
    assert ran("warp", "field") == 1
    torch.testing.assert_close(fast_out, ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fast_grad, ref_grad, atol=1e-5 * ref_grad.abs().max().item(), rtol=1e-5)
    # A matrix being optimized with the field takes the reference path (its gradient needs the grid).
    monkeypatch.setenv("STNREG_FAST", "1")
    moving = affine.with_params(affine.params.clone().requires_grad_())
    stnreg.warp(image, moving.compose(svf.with_params(velocity)), fixed, source)
    assert ran("warp", "field") == 1


def test_displacement_warp_image_gradient_broadcast_determinism_and_gradcheck(monkeypatch, ran):
    from stnreg.fast import fused_field_warp

    g = torch.Generator().manual_seed(13)
    image = torch.rand(3, 1, 8, 9, 10, generator=g)
    family = stnreg.Displacement((8, 9, 10))
    field = 0.2 * torch.randn(1, 3, 8, 9, 10, generator=g)  # one field for a batch of three
    results = []
    old = torch.get_num_threads()
    try:
        for fast, threads in (("1", 1), ("1", 2), ("0", 1)):
            monkeypatch.setenv("STNREG_FAST", fast)
            torch.set_num_threads(threads)
            x, u = image.clone().requires_grad_(), field.clone().requires_grad_()
            out = stnreg.warp(x, family.with_params(u))
            go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            results.append((out.detach(), *torch.autograd.grad(out, (x, u), go)))
    finally:
        torch.set_num_threads(old)
    assert ran("warp", "field") == 2
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1], strict=True))  # 1 and 2 threads: same bits
    for a, b in zip(results[0], results[2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-5)
    img64 = image[:1].double()
    inner, pixel_map = dispatch.warp_chain(img64, family, None)
    _, k, r = inner.fast_warp_args((8, 9, 10), pixel_map)
    u64 = field.double().requires_grad_()
    x64 = img64.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, u: fused_field_warp(x, u, k, r, "zeros"), (x64, u64))
    bad = field.clone()
    bad[0, 1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        stnreg.warp(image, family.with_params(bad))
    with pytest.raises(ValueError, match="NaN or infinity"):
        fused_field_warp(image, bad, k.float(), r.float())


def test_kernel_caches_older_than_a_kernel_source_are_dropped():
    """numba would load a kernel cached before an edit to a helper it inlines from another module."""
    import os
    from pathlib import Path

    from stnreg.fast import loader

    here = Path(loader.__file__).resolve().parent
    cache = here / "__pycache__"
    cache.mkdir(exist_ok=True)
    stale, fresh = cache / "stnreg_test_stale.nbi", cache / "stnreg_test_fresh.nbc"
    newest = max(f.stat().st_mtime for pattern in loader.KERNEL_SOURCES for f in here.glob(pattern))
    try:
        for f, t in ((stale, newest - 60), (fresh, newest + 60)):
            f.write_bytes(b"")
            os.utime(f, (t, t))
        loader.drop_stale_kernel_caches()
        assert not stale.exists()
        assert fresh.exists()
    finally:
        stale.unlink(missing_ok=True)
        fresh.unlink(missing_ok=True)


def _label_coords(n, out, in_shape, dtype, g, ties):
    """Normalized coordinates reaching past the edges, or on half-voxel positions, where neighbour
    weights tie exactly (``ties``)."""
    d = len(in_shape)
    if not ties:
        return torch.rand(n, *out, d, generator=g, dtype=torch.float64).to(dtype) * 2.6 - 1.3
    sizes = torch.tensor(list(reversed(in_shape)), dtype=dtype)
    half = torch.randint(-3, 2 * max(in_shape) + 2, (n, *out, d), generator=g).to(dtype) / 2
    return (half + 0.5) * 2 / sizes - 1


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("in_shape", "out"), [((37, 41), (45, 39)), ((11, 13, 12), (9, 10, 8))])
def test_label_sampling_votes_on_the_kernel_with_the_reference_values(monkeypatch, ran, in_shape, out, dtype, padding):
    """stnreg.sample(mode="label") takes the numba vote and gives the per-label reference's labels, ties,
    negative labels, float and uint8 labels and a broadcast batch included."""
    g = torch.Generator().manual_seed(len(in_shape) * 10 + (dtype == torch.float64))
    many = torch.randint(-5, 120, (2, 2, *in_shape), generator=g)
    few = torch.nn.functional.interpolate(
        torch.randint(0, 6, (2, 2, *(s // 3 for s in in_shape)), generator=g).double() * 7, size=in_shape
    ).long()
    cases = 0
    for labels in (many, few, few.float() + 0.5, (few > 20).to(torch.uint8)):
        for ties in (False, True):
            for n_coords in (2, 1):
                coords = _label_coords(n_coords, out, in_shape, dtype, g, ties)
                monkeypatch.setenv("STNREG_FAST", "1")
                ours = stnreg.sample(labels, coords, "label", padding)
                monkeypatch.setenv("STNREG_FAST", "0")
                ref = stnreg.sample(labels, coords, "label", padding)
                assert ours.dtype == ref.dtype == labels.dtype
                assert torch.equal(ours, ref), (labels.dtype, ties, n_coords, int((ours != ref).sum()))
                cases += 1
    assert ran("label", "label") == cases and ran("label", "reference") == cases
