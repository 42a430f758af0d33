"""Affine localization by feature centroids (stnreg.nets.centroids)."""

import math

import pytest
import torch

from stnreg.learn import RegistrationNet
from stnreg.nets.centroids import CentroidAffine, fit_affine, map_centroids
from stnreg.transforms import Affine


@pytest.mark.parametrize("d", [2, 3])
def test_fit_affine_recovers_a_known_affine_from_points(d):
    g = torch.Generator().manual_seed(0)
    src = torch.rand(3, 12, d, generator=g, dtype=torch.float64) * 2 - 1
    a = torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(3, d, d, generator=g, dtype=torch.float64)
    t = 0.1 * torch.randn(3, d, generator=g, dtype=torch.float64)
    dst = src @ a.transpose(1, 2) + t.unsqueeze(1)
    m = fit_affine(src, dst, torch.ones(3, 12, dtype=torch.float64), ridge=0.0)
    assert torch.allclose(m[..., :d], a, atol=1e-10) and torch.allclose(m[..., d], t, atol=1e-10)


def test_fit_affine_ignores_zero_weights_and_the_ridge_keeps_few_points_near_identity():
    src = torch.tensor([[[0.0, 0.0], [0.5, 0.0], [0.0, 0.5], [0.3, 0.3]]])
    dst = src + torch.tensor([0.1, -0.2])
    dst[0, 3] = torch.tensor([5.0, 5.0])  # an outlier with weight 0
    m = fit_affine(src, dst, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), ridge=0.0)
    assert torch.allclose(m, torch.tensor([[[1.0, 0.0, 0.1], [0.0, 1.0, -0.2]]]), atol=1e-6)
    # One point fixes a translation only; the ridge chooses the identity for the linear part.
    one = fit_affine(src[:, :1], dst[:, :1], torch.ones(1, 1))
    assert torch.allclose(one, torch.tensor([[[1.0, 0.0, 0.1], [0.0, 1.0, -0.2]]]), atol=1e-5)


def test_map_centroids_of_a_peak_is_its_voxel_centre():
    maps = torch.zeros(1, 1, 8, 10)
    maps[0, 0, 2, 7] = 1.0  # row 2, column 7
    points, mass = map_centroids(maps)
    assert torch.allclose(points[0, 0], torch.tensor([(2 * 7 + 1) / 10 - 1, (2 * 2 + 1) / 8 - 1]))
    assert float(mass[0, 0]) == pytest.approx(1 / 80)


def test_identical_images_give_the_identity_and_gradients_reach_the_features():
    torch.manual_seed(0)
    net = CentroidAffine(2, 1, points=8, widths=(8, 8))
    img = torch.rand(2, 1, 32, 32)
    params = net(torch.cat([img, img], 1))
    assert torch.allclose(params, Affine(2, batch=2).params.reshape(2, -1), atol=1e-5)
    moved = torch.roll(img, 3, dims=-1)
    net(torch.cat([moved, img], 1)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters() if p.dim() > 1)


def test_registration_net_builds_centroid_affine_stages_and_rejects_other_families():
    net = RegistrationNet(2, ["affine", "svf"], matrix_net="centroids", loc_channels=[8, 8], loc_features=8)
    out = net(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    assert out.raw[0].shape == (1, 6) and math.isfinite(float(out.raw[0].sum()))
    assert RegistrationNet(**net.config).config["matrix_net"] == "centroids"
    with pytest.raises(ValueError, match="affine stages only"):
        RegistrationNet(2, ["rigid"], matrix_net="centroids")
    with pytest.raises(ValueError, match="matrix_net"):
        RegistrationNet(2, ["affine"], matrix_net="pooled")
