import math

import pytest
import torch
from helpers import smooth_image

from stnreg import Grid
from stnreg.fields import jacobian_determinant, world_to_voxel_displacement
from stnreg.losses import bending_energy, dice_loss, diffusion, folding_penalty, lncc_loss, mi_loss, mse_loss, ncc_loss
from stnreg.losses.parzen import parzen_mutual_information
from stnreg.losses.similarity import _box_filter
from stnreg.metrics import centroid_distance, dice, hd95, jacobian_stats, landmark_error


def test_similarities_are_zero_or_minimal_for_identical_images():
    a = smooth_image((20, 22), seed=1)
    assert mse_loss(a, a) == 0
    assert abs(float(mse_loss(a, a + 0.1)) - 0.01) < 1e-12
    # NCC: invariant to a positive linear intensity change, 2 for the negative image.
    assert ncc_loss(a, a) < 1e-6 and ncc_loss(a, 3 * a + 2) < 1e-6
    assert abs(float(ncc_loss(a, 1 - a)) - 2) < 1e-6
    # LNCC (squared local correlation): the same for any linear change; eps keeps flat windows out of it.
    assert lncc_loss(a, a, window=5) < 0.01 and lncc_loss(a, 3 * a + 2, window=5) < 0.01
    assert lncc_loss(a, 1 - a, window=5) < 0.15
    # A shift of 3 voxels (the images vary on a 2.5 voxel scale) costs them most of their similarity (0.58, 0.47).
    shifted = torch.roll(a, 3, dims=-1)
    assert ncc_loss(a, shifted) > 0.3
    assert lncc_loss(a, shifted, 5) > 0.3
    # MI is invariant to a monotone intensity change and prefers aligned images (-1.38 vs -0.27).
    torch.testing.assert_close(mi_loss(a, 1 - a), mi_loss(a, a))
    assert mi_loss(a, a) < mi_loss(a, shifted) - 0.5


def _dense_mi(a, b, bins, weight):
    """Reference: the same cubic B-spline Parzen MI from dense (P, bins + 2) window matrices, by autograd."""

    def window(x):
        u = (x.clamp(0, 1) * (bins - 1)).unsqueeze(-1) - (torch.arange(bins + 2, dtype=x.dtype) - 1)
        r = u.abs()
        return torch.where(r < 1, 2 / 3 - r**2 + r**3 / 2, torch.where(r < 2, (2 - r) ** 3 / 6, torch.zeros_like(r)))

    joint = (window(a) * weight.unsqueeze(-1)).transpose(1, 2) @ window(b)
    p = joint / joint.sum((1, 2), keepdim=True)
    pa, pb = p.sum(2, keepdim=True), p.sum(1, keepdim=True)
    return (p * (torch.log(p.clamp_min(1e-300)) - torch.log((pa * pb).clamp_min(1e-300)))).sum((1, 2))


def test_parzen_mi_matches_a_dense_reference_and_information_identities():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 400, dtype=torch.float64, generator=g).requires_grad_()
    b = (0.9 * a.detach() ** 2 + 0.1 * torch.rand(2, 400, dtype=torch.float64, generator=g)).requires_grad_()
    w = torch.rand(2, 400, dtype=torch.float64, generator=g)
    got = parzen_mutual_information(a, b, 16, w)
    want = _dense_mi(a, b, 16, w)
    torch.testing.assert_close(got, want)
    ga = torch.autograd.grad(got.sum(), (a, b))
    wa = torch.autograd.grad(want.sum(), (a, b))
    for x, y in zip(ga, wa, strict=True):
        torch.testing.assert_close(x, y)
    assert torch.autograd.gradcheck(lambda x, y: parzen_mutual_information(x, y, 6, w[:, :30]), (a[:, :30], b[:, :30]))
    # MI(x, x) is the entropy, unchanged by a monotone remapping; independent samples share ~none.
    x = torch.rand(1, 100_000, dtype=torch.float64, generator=g)
    y = torch.rand(1, 100_000, dtype=torch.float64, generator=g)
    self_mi = parzen_mutual_information(x, x)
    assert float(self_mi) > 2.0
    torch.testing.assert_close(parzen_mutual_information(x, 1 - x), self_mi)
    assert float(parzen_mutual_information(x, y)) < 0.01
    with pytest.raises(ValueError, match="paired samples"):
        parzen_mutual_information(x, y[:, :10])


def test_box_filter_is_a_moving_average():
    x = torch.rand(1, 2, 7, 8, 9, dtype=torch.float64)
    out = _box_filter(x, (3, 5, 1))
    want = torch.nn.functional.avg_pool3d(x, (3, 5, 1), stride=1, padding=(1, 2, 0), count_include_pad=True)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("loss", [mse_loss, ncc_loss, lncc_loss, mi_loss, dice_loss])
def test_losses_gradcheck(loss):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 6, 7, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.rand(1, 1, 6, 7, dtype=torch.float64, generator=g)
    kwargs = {"window": 3} if loss is lncc_loss else {}
    assert torch.autograd.gradcheck(lambda x: loss(x, b, **kwargs), (a,))


def test_masked_similarity_ignores_outside():
    a = smooth_image((16, 16), seed=2)
    b = a.clone()
    b[..., :, 8:] = 0
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    mask[..., :, :8] = 1
    assert mse_loss(a, b, mask) == 0
    torch.testing.assert_close(mse_loss(a, b), a[..., 8:].square().sum() / 256)
    torch.testing.assert_close(mse_loss(a, b, 1 - mask), a[..., 8:].square().mean())


def test_regularizers():
    zero = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    assert diffusion(zero) == 0 and bending_energy(zero) == 0 and folding_penalty(zero) == 0
    # A linear field has no bending but diffuses.
    y, x = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    lin = torch.stack([0.1 * x, 0.2 * y])[None].double()
    assert bending_energy(lin) < 1e-12
    # Mean squared forward differences, summed over axes: (0.1² + 0) / 2 + (0 + 0.2²) / 2.
    assert abs(float(diffusion(lin)) - 0.025) < 1e-7
    # Second differences: 0.2 for 0.1 x², 0.1 (counted twice) for 0.1 x y; averaged over the 2 components.
    flat = torch.zeros_like(y)
    quad = torch.stack([0.1 * x**2, flat])[None].double()
    mixed = torch.stack([0.1 * x * y, flat])[None].double()
    assert abs(float(bending_energy(quad)) - 0.02) < 1e-7
    assert abs(float(bending_energy(mixed)) - 0.01) < 1e-7
    folded = torch.stack([-2.0 * x, flat])[None].double()  # x -> -x: det = -1 everywhere
    assert abs(float(folding_penalty(folded)) - 1.0) < 1e-7
    stretched = torch.stack([0.5 * x, flat])[None].double()  # det = 1.5: no folding, below an eps of 2
    assert folding_penalty(stretched) == 0
    assert abs(float(folding_penalty(stretched, eps=2.0)) - 0.5) < 1e-7


def test_jacobian_of_known_maps():
    z, y, x = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), torch.arange(8.0), indexing="ij")
    disp = torch.stack([0.5 * x, torch.zeros_like(y), -0.25 * z])[None].double()  # scale 1.5 x 1 x 0.75
    torch.testing.assert_close(jacobian_determinant(disp), torch.full((1, 6, 7, 8), 1.125, dtype=torch.float64))
    grid = Grid((6, 7, 8), spacing=(2.0, 1.0, 0.5))
    disp_mm = disp[0] * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64).view(3, 1, 1, 1)
    torch.testing.assert_close(world_to_voxel_displacement(disp_mm[None], grid.index_to_world()), disp)
    stats = jacobian_stats(disp_mm, grid)
    assert stats["folding_percent"] == 0 and abs(stats["jacobian_min"] - 1.125) < 1e-9 and stats["sdlogj"] < 1e-9


def test_dice_hd95_and_distances():
    a = torch.zeros(20, 20, dtype=torch.long)
    b = torch.zeros(20, 20, dtype=torch.long)
    a[5:15, 5:15] = 1
    b[5:15, 7:17] = 1  # shifted by 2 voxels along x
    d = dice(a, b)
    assert abs(d[1] - 2 * 80 / 200) < 1e-12
    grid = Grid((20, 20), spacing=(0.5, 1.0))
    h = hd95(a, b, grid)
    assert abs(h[1] - 1.0) < 1e-9  # 2 voxels of 0.5 mm
    assert abs(centroid_distance(a, b, grid)[1] - 1.0) < 1e-9
    assert math.isnan(dice(a, b, [3])[3])
    err = landmark_error(torch.zeros(3, 3), torch.tensor([[3.0, 4.0, 0.0]] * 3))
    assert err["mean"] == 5.0
