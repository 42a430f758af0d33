import math

import numpy as np
import pytest
import torch
from helpers import smooth_image

from stnreg.coords import lattice
from stnreg.sampler import gaussian_blur, local_scale, sample


@pytest.mark.parametrize("shape", [(5, 6), (3, 4, 5)])
def test_gradcheck_image_and_coords(shape):
    d = len(shape)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 2, *shape, dtype=torch.float64, generator=g).requires_grad_()
    coords = (lattice(shape, dtype=torch.float64).unsqueeze(0) * 0.8 + 0.05).repeat(2, *[1] * (d + 1))
    coords = (coords + 0.03 * torch.rand(coords.shape, dtype=torch.float64, generator=g)).requires_grad_()
    for padding in ("zeros", "border", "reflection"):
        assert torch.autograd.gradcheck(lambda im, c, p=padding: sample(im, c, "linear", p), (image, coords))


@pytest.mark.parametrize("shape", [(7, 9), (4, 5, 6)])
def test_identity_lattice_reproduces_image(shape):
    image = torch.rand(2, 3, *shape)
    out = sample(image, lattice(shape).unsqueeze(0))
    torch.testing.assert_close(out, image, atol=1e-6, rtol=0)
    assert torch.equal(sample(image, lattice(shape).unsqueeze(0), "nearest"), image)


def test_known_shift_in_voxels():
    image = torch.arange(20.0).reshape(1, 1, 4, 5)
    coords = lattice((4, 5)).unsqueeze(0).clone()
    coords[..., 0] += 2.0 / 5  # one voxel in x
    out = sample(image, coords, padding="border")
    torch.testing.assert_close(out[0, 0, :, :4], image[0, 0, :, 1:])


def test_label_mode_keeps_values():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (1, 1, 12, 12), generator=g) * 7  # values {0, 7, 14, 21}
    coords = lattice((17, 15)).unsqueeze(0) * 0.93 + 0.021
    for padding in ("zeros", "border"):
        out = sample(labels, coords, "label", padding)
        assert out.dtype == labels.dtype
        assert set(out.unique().tolist()) <= set(labels.unique().tolist())
    floats = labels.double() + 0.5
    out = sample(floats, coords, "label", "border")
    assert set(out.unique().tolist()) <= set(floats.unique().tolist())
    # A uniform region stays its label, and the result is not simply nearest everywhere.
    assert (sample(labels, coords, "label") != sample(labels.double(), coords, "linear").round().long()).any()


def test_nearest_integer_and_3d_label():
    labels = torch.randint(0, 30, (1, 1, 6, 7, 8))
    coords = lattice((5, 5, 5)).unsqueeze(0) * 0.9
    out = sample(labels, coords, "nearest")
    assert out.dtype == labels.dtype and out.shape == (1, 1, 5, 5, 5)
    assert set(out.unique().tolist()) <= set(labels.unique().tolist())
    out = sample(labels, coords, "label")
    assert set(out.unique().tolist()) <= set(labels.unique().tolist()) | {0}


def test_antialias_suppresses_aliasing_when_shrinking():
    x = torch.arange(128).view(1, 128).expand(128, 128)
    stripes = (x % 2).float().view(1, 1, 128, 128)  # the highest frequency along x
    coords = lattice((16, 15)).unsqueeze(0)  # about 8.5x shrink along x, 8x along y
    plain = sample(stripes, coords)
    smooth = sample(stripes, coords, antialias=True)
    assert plain.std() > 0.2  # bilinear at 8x reads single stripes: aliasing
    assert smooth.std() < 0.05 and abs(smooth.mean() - 0.5) < 0.05
    # Enlarging is never blurred.
    up = lattice((256, 256)).unsqueeze(0)
    torch.testing.assert_close(sample(stripes, up, antialias=True), sample(stripes, up))


def test_local_scale_of_affine_and_blur_per_item():
    coords = torch.nn.functional.affine_grid(
        torch.tensor([[[2.0, 0, 0], [0, 1.0, 0]]]), [1, 1, 10, 10], align_corners=False
    )
    scale = local_scale(coords, (20, 20))
    torch.testing.assert_close(scale, torch.tensor([[4.0, 2.0]]))
    img = smooth_image((16, 16), dtype=torch.float32).repeat(2, 1, 1, 1)
    out = gaussian_blur(img, torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    torch.testing.assert_close(out[0], img[0])
    assert not torch.allclose(out[1], img[1])


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_gaussian_blur_matches_scipy_per_item_and_axis_and_is_differentiable(padding):
    from scipy.ndimage import correlate1d

    g = torch.Generator().manual_seed(3)
    img = torch.rand(2, 2, 7, 9, 11, dtype=torch.float64, generator=g)
    sigma = torch.tensor([[0.8, 0.0, 1.7], [2.2, 1.1, 0.05]], dtype=torch.float64)  # (x, y, z) per item
    out = gaussian_blur(img, sigma, padding)
    mode = "nearest" if padding == "border" else "constant"
    for i in range(2):
        ref = img[i].numpy()
        # The taps span ceil(3 sigma) of the largest sigma along the axis; sigma < 0.1 leaves it alone.
        for a in range(3):
            s = float(sigma[i, a])
            if s < 0.1:
                continue
            radius = math.ceil(3.0 * float(sigma[:, a].max()))
            taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / s) ** 2)
            ref = correlate1d(ref, taps / taps.sum(), axis=3 - a, mode=mode)
        torch.testing.assert_close(out[i], torch.from_numpy(ref))
    small = img[:, :, :4, :5, :6].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: gaussian_blur(x, sigma, padding), (small,))


def test_bad_input_errors():
    img = torch.rand(2, 1, 8, 8)
    grid = lattice((8, 8)).unsqueeze(0)
    with pytest.raises(ValueError, match="shape"):
        sample(torch.rand(8, 8), grid)
    with pytest.raises(TypeError, match="floating-point"):
        sample(torch.randint(0, 3, (1, 1, 8, 8)), grid)
    with pytest.raises(ValueError, match="batch"):
        sample(img, grid.repeat(3, 1, 1, 1))
    with pytest.raises(ValueError, match=r"\(N, H_out, W_out, 2\)"):
        sample(img, lattice((4, 4, 4)).unsqueeze(0))
    with pytest.raises(ValueError, match="mode"):
        sample(img, grid, mode="quintic")
    with pytest.raises(ValueError, match="empty"):
        sample(torch.rand(1, 1, 0, 4), grid)


def test_gaussian_blur_one_sigma_for_a_batch_and_bad_sigma_named():
    img = torch.rand(3, 2, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    one = gaussian_blur(img, torch.tensor([[1.3, 0.7]], dtype=torch.float64))
    each = gaussian_blur(img, torch.tensor([[1.3, 0.7]] * 3, dtype=torch.float64))
    assert torch.equal(one, each) and not torch.allclose(one, img)
    with pytest.raises(ValueError, match=r"sigma must be \(3, 2\) or \(1, 2\)"):
        gaussian_blur(img, torch.ones(2, 2))


@pytest.mark.parametrize("shape", [(17, 23), (9, 11, 13)])
@pytest.mark.parametrize("fast", [True, False])
def test_cubic_matches_scipy_and_differentiates(shape, fast, monkeypatch):
    """``mode="cubic"`` is scipy's ``map_coordinates(order=3, mode="mirror")``, through the numba kernel
    and the torch reference alike, with gradients to coordinates and image."""
    from scipy.ndimage import map_coordinates

    from stnreg.coords import index_to_normalized

    if not fast:
        monkeypatch.setenv("STNREG_FAST", "0")
    d = len(shape)
    g = torch.Generator().manual_seed(3)
    img = torch.rand(1, 1, *shape, dtype=torch.float64, generator=g)
    pts = torch.rand(1, 40, d, dtype=torch.float64, generator=g) * (torch.tensor(shape[::-1], dtype=torch.float64) - 1)
    coords = index_to_normalized(pts, shape).view(1, *[1] * (d - 1), 40, d)
    got = sample(img, coords, "cubic", "border").flatten().numpy()
    want = map_coordinates(img[0, 0].numpy(), pts[0].numpy()[:, ::-1].T, order=3, mode="mirror")
    np.testing.assert_allclose(got, want, atol=1e-12)
    # At the voxel centres the prefiltered spline interpolates the image itself.
    nodes = lattice(shape, dtype=torch.float64)[None]
    torch.testing.assert_close(sample(img, nodes, "cubic", "border"), img, atol=1e-10, rtol=0)
    co = coords.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: sample(img, c, "cubic", "zeros"), (co,))
    im = img.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sample(x, coords, "cubic", "border"), (im,))


def test_cubic_padding_outside_the_image():
    img = torch.rand(1, 1, 8, 8, dtype=torch.float64) + 1.0
    far = torch.tensor([[[[1.5, 0.0], [-1.5, 0.2]]]], dtype=torch.float64)  # beyond the outer edges in x
    assert sample(img, far, "cubic", "zeros").abs().max() == 0
    edge = torch.tensor([[[[1.0 - 1 / 8, 0.0], [-1.0 + 1 / 8, 0.0]]]], dtype=torch.float64)  # outer voxel centres
    torch.testing.assert_close(
        sample(img, far[..., :1, :], "cubic", "border"), sample(img, edge[..., :1, :], "cubic", "border")
    )
    mirrored = torch.tensor([[[[1.0 + 1 / 16, 0.0]]]], dtype=torch.float64)  # a quarter voxel past the edge
    inside = torch.tensor([[[[1.0 - 1 / 16, 0.0]]]], dtype=torch.float64)
    torch.testing.assert_close(sample(img, mirrored, "cubic", "reflection"), sample(img, inside, "cubic", "reflection"))
