"""The Triton (CUDA) kernels of stnreg.fast: on a GPU when there is one, else in Triton's interpreter.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported (lightning and monai import it
early), so on a machine without a GPU :func:`test_kernels_in_the_triton_interpreter` runs this file
again in a child process with ``TRITON_INTERPRET=1``. There the kernels execute with NumPy and
``stnreg.fast.loader.use_triton`` is patched so that CPU tensors take the CUDA route through the public
functions.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import stnreg
from stnreg import fast
from stnreg.losses import mse_loss, ncc_loss

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


@pytest.mark.skipif(INTERPRETED or DEVICE == "cuda", reason="the kernels run directly")
def test_kernels_in_the_triton_interpreter():
    pytest.importorskip("triton")
    env = os.environ | {"TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", __file__]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    # Every kernel test ran (only this launcher skips itself there).
    assert re.search(r"\b20 passed, 1 skipped\b", summary), summary


@pytest.fixture
def kernels(monkeypatch):
    if not (INTERPRETED or DEVICE == "cuda"):
        pytest.skip("run by test_kernels_in_the_triton_interpreter")
    module = fast.loader.triton()
    assert module is not None, "triton did not import"
    monkeypatch.setattr(fast.loader, "use_triton", lambda image: image.device.type == DEVICE)
    return module


def _reference(image, theta, out, padding):
    grid = F.affine_grid(theta, [theta.shape[0], 1, *out], align_corners=False)
    return F.grid_sample(image, grid, padding_mode=padding, align_corners=False)


def _case(seed, channels=2, size=(10, 12, 14)):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, channels, *size, generator=g)
    # Large enough a perturbation that part of the output samples outside the image.
    theta = torch.eye(3, 4) + 0.2 * torch.randn(2, 3, 4, generator=g)
    return g, image.to(DEVICE), theta.to(DEVICE)


@pytest.mark.parametrize("padding", ["zeros", "border"])
# The (3, 19, 70) output spans several tiles in y and x, with partial tiles at both far edges.
@pytest.mark.parametrize(
    ("channels", "size", "out"),
    [(1, (10, 12, 14), (9, 11, 13)), (3, (10, 12, 14), (9, 11, 13)), (1, (4, 16, 60), (3, 19, 70))],
)
def test_triton_warp_matches_grid_sample(kernels, padding, channels, size, out):
    g, image, theta = _case(0, channels, size)
    image.requires_grad_()
    theta.requires_grad_()
    assert fast.fused_available(image, padding)
    _assert_warp_matches(image, theta, out, padding, g, theta_atol=1e-3)


def _assert_warp_matches(image, theta, out, padding, g, theta_atol):
    """The fused warp, its image gradient and its θ gradient against affine_grid + grid_sample."""
    ours = fast.fused_affine_warp(image, theta, out, padding)
    ref = _reference(image, theta, out, padding)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    go = torch.randn(ours.shape, generator=g).to(DEVICE)
    g_ours = torch.autograd.grad(ours, (image, theta), go)
    g_ref = torch.autograd.grad(ref, (image, theta), go)
    # The image gradient sums float32 contributions in another order than grid_sample's (both are
    # about 5e-6 of its largest entry from a float64 reference): 1e-5 of that scale.
    torch.testing.assert_close(g_ours[0], g_ref[0], atol=1e-5 * g_ref[0].abs().max().item(), rtol=1e-5)
    torch.testing.assert_close(g_ours[1], g_ref[1], atol=theta_atol, rtol=1e-4)


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_triton_cells_at_the_edges_of_the_image(kernels, padding):
    # Zoomed out 1.5x (2.5x in depth) and shifted, so that along every axis the positions run from
    # beyond the first voxel (the band before it, where only one corner is in, and further) to beyond
    # the last (checked below on affine_grid's positions); the depth axis has the fewest voxels the
    # kernels take, 2. Each read is clamped into the image and the corners zero padding leaves out
    # get weight 0: values and both gradients must still be grid_sample's.
    g = torch.Generator().manual_seed(4)
    image = torch.rand(2, 1, 2, 7, 9, generator=g).to(DEVICE).requires_grad_()
    theta = torch.tensor([[1.5, 0.05, 0.0, 0.1], [0.0, 1.5, 0.05, -0.2], [0.05, 0.0, 2.5, 0.15]])
    theta = theta.expand(2, 3, 4).contiguous().to(DEVICE).requires_grad_()
    out = (5, 9, 13)
    grid = F.affine_grid(theta.detach(), [2, 1, *out], align_corners=False)
    for axis, n in enumerate((9, 7, 2)):  # grid holds (x, y, z)
        i = ((grid[..., axis] + 1) * n - 1) / 2
        bands = [i <= -1, (i > -1) & (i < 0), (i > n - 1) & (i < n), i >= n]
        assert all(band.any() for band in bands), f"axis {axis} misses a band"
    _assert_warp_matches(image, theta, out, padding, g, theta_atol=1e-4)


def test_triton_declines_an_axis_of_one_voxel(kernels):
    # A cell needs two voxels along each axis: a single-slice volume goes to grid_sample, and the
    # kernel itself refuses it by name.
    image = torch.rand(1, 1, 1, 8, 9, device=DEVICE)
    theta = (torch.eye(3, 4) + 0.05).unsqueeze(0).to(DEVICE)
    assert not fast.fused_available(image, "zeros")
    assert fast.fused_available(torch.rand(1, 1, 2, 8, 9, device=DEVICE), "zeros")
    out = stnreg.warp(image, stnreg.Affine(3, params=theta), out=(1, 8, 9))
    torch.testing.assert_close(out, _reference(image, theta, (1, 8, 9), "zeros"))
    with pytest.raises(ValueError, match="at least 2 voxels"):
        kernels.forward(image, theta, (1, 8, 9), False)


@pytest.mark.parametrize("loss", ["mse", "ncc"])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_triton_fused_similarity_matches_autograd(kernels, loss, padding):
    g, image, theta = _case(1)
    fixed = torch.rand(2, 2, 9, 11, 13, generator=g).to(DEVICE)
    theta.requires_grad_()
    ours = fast.fused_affine_loss(image, fixed, theta, loss, padding)
    warped = _reference(image, theta, fixed.shape[2:], padding)
    ref = mse_loss(warped, fixed) if loss == "mse" else ncc_loss(warped, fixed)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    (g_ours,) = torch.autograd.grad(ours, theta)
    (g_ref,) = torch.autograd.grad(ref, theta)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-4)


def test_triton_reducing_kernels_with_more_slices_per_program(kernels, monkeypatch):
    # Large volumes take Z_PER_LARGE slices per program (a partial last group here: 40 slices); the
    # sums and gradients must not change beyond float32 summation order.
    monkeypatch.setattr(kernels, "MIN_PROGRAMS", 1)
    assert kernels._reducing_launch((40, 5, 6), 2)[0]["Z_PER"] == kernels.Z_PER_LARGE
    g = torch.Generator().manual_seed(5)
    image, fixed = (
        torch.rand(2, 1, 36, 6, 7, generator=g).to(DEVICE),
        torch.rand(2, 1, 40, 5, 6, generator=g).to(DEVICE),
    )
    theta = (torch.eye(3, 4) + 0.1 * torch.randn(2, 3, 4, generator=g)).to(DEVICE).requires_grad_()
    ours = fast.fused_affine_loss(image, fixed, theta, "ncc", "border")
    ref = ncc_loss(_reference(image, theta, fixed.shape[2:], "border"), fixed)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        torch.autograd.grad(ours, theta)[0], torch.autograd.grad(ref, theta)[0], atol=1e-5, rtol=1e-4
    )
    go = torch.randn(2, 1, 40, 5, 6, generator=g).to(DEVICE)
    warped = fast.fused_affine_warp(image, theta, (40, 5, 6), "zeros")
    (ours,) = torch.autograd.grad(warped, theta, go)
    (ref,) = torch.autograd.grad(_reference(image, theta, (40, 5, 6), "zeros"), theta, go)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_warp_routes_cuda_images_to_triton_and_is_deterministic(kernels, monkeypatch):
    calls = []
    forward = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda *a: calls.append(1) or forward(*a))
    image = torch.rand(1, 1, 12, 13, 14, device=DEVICE)
    theta = (torch.eye(3, 4, device=DEVICE) + 0.05).unsqueeze(0).requires_grad_()
    t = stnreg.Affine(3, params=theta)
    first = stnreg.warp(image, t, out=(8, 9, 10))
    second = stnreg.warp(image, t, out=(8, 9, 10))
    assert len(calls) == 2
    assert torch.equal(first, second)
    grads = [torch.autograd.grad(stnreg.warp(image, t, out=(8, 9, 10)).square().sum(), theta)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])
    # float64 and 2D images are not the Triton path's: they go to grid_sample.
    assert not fast.fused_available(image.double(), "zeros")
    assert not fast.fused_available(torch.rand(1, 1, 8, 8, device=DEVICE), "zeros")
    assert not fast.fused_available(image, "reflection")


def test_triton_image_gradient_alone_and_under_deterministic_algorithms(kernels, monkeypatch):
    g, image, theta = _case(2, channels=2, size=(6, 9, 20))
    image.requires_grad_()
    go = torch.randn(2, 2, 7, 8, 21, generator=g).to(DEVICE)
    (ref,) = torch.autograd.grad(_reference(image, theta, (7, 8, 21), "zeros"), image, go)
    asked = []
    backward = kernels.backward
    monkeypatch.setattr(kernels, "backward", lambda *a: asked.append(a[-2:]) or backward(*a))
    # θ needs no gradient: the kernel scatters the image gradient only.
    (ours,) = torch.autograd.grad(fast.fused_affine_warp(image, theta, (7, 8, 21)), image, go)
    torch.testing.assert_close(ours, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)
    assert asked == [(False, True)]
    # The scatter is nondeterministic on a GPU, so under torch's deterministic mode the image gradient
    # comes from grid_sample's backward and torch's own rule applies: deterministic on the CPU,
    # an error on CUDA (torch has no deterministic grid_sample backward there).
    asked.clear()
    theta.requires_grad_()
    torch.use_deterministic_algorithms(True)
    try:
        out = fast.fused_affine_warp(image, theta, (7, 8, 21))
        if DEVICE == "cuda":
            with pytest.raises(RuntimeError, match="deterministic"):
                torch.autograd.grad(out, (image, theta), go)
            return
        ours, _ = torch.autograd.grad(out, (image, theta), go)
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert asked == [(True, False)]


@pytest.mark.parametrize(("z_per", "stream"), [(3, False), (1, True), (4, True)])
def test_triton_forward_settings_give_the_same_bits(kernels, z_per, stream):
    # Slices per program (3 leaves a partial last group of the 7 slices) and streaming stores are
    # tuning knobs for the card: each voxel is computed alone, so the output must not change at all.
    _, image, theta = _case(3, channels=2, size=(6, 9, 20))
    ref = kernels.forward(image, theta, (7, 10, 21), False)
    out = torch.full_like(ref, float("nan"))
    grid = kernels._launch((7, 10, 21), 2, 2, 16, z_per)
    kernels._forward_kernel[grid](
        image, theta, out, 2, 6, 9, 20, 7, 10, 21, False, 2, 16, z_per, stream, **kernels.OPTIONS
    )
    assert torch.equal(out, ref)


def test_triton_rejects_non_finite_parameters(kernels):
    image = torch.rand(1, 1, 6, 6, 6, device=DEVICE)
    theta = torch.eye(3, 4, device=DEVICE).unsqueeze(0).clone()
    theta[0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fast.fused_affine_warp(image, theta, (6, 6, 6))
