import pytest
import torch
from torch import nn

from stnreg import (
    Affine,
    Attention,
    LocalizationCNN,
    MultiSpatialTransformer,
    Projective,
    SpatialTransformer,
    ThinPlateSpline,
    uniform_control_points,
    warp,
)


@pytest.mark.parametrize(
    "transform",
    [Affine(2), Projective(2), Attention(2), ThinPlateSpline(uniform_control_points((4, 4)))],
    ids=["affine", "projective", "attention", "tps"],
)
def test_identity_initialized_and_trainable(transform):
    loc = LocalizationCNN(1, 2, channels=(8,), features=16)
    stn = SpatialTransformer(loc, transform, features=16)
    x = torch.rand(3, 1, 28, 28)
    out = stn(x)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    out.square().mean().backward()
    assert stn.head.weight.grad is not None and stn.head.weight.grad.abs().sum() > 0
    assert torch.isfinite(stn.head.bias.grad).all() and stn.head.bias.grad.abs().sum() > 0
    # With zero head weights, the localization net gets no gradient until the head moves.
    assert all(p.grad is None or not p.grad.any() for p in loc.parameters())


@pytest.mark.parametrize(
    "transform", [Affine(2), ThinPlateSpline(uniform_control_points((4, 4)))], ids=["affine", "tps"]
)
def test_every_parameter_trains_and_old_checkpoints_load(transform):
    loc = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 8), nn.Tanh())
    stn = SpatialTransformer(loc, transform, features=8)
    with torch.no_grad():
        stn.head.weight.normal_(0, 0.1)
    stn(torch.rand(2, 1, 16, 16)).square().sum().backward()
    # No unused template parameters: DDP runs without find_unused_parameters.
    assert all(p.grad is not None for p in stn.parameters())
    assert not any(name.startswith("transform.params") for name in stn.state_dict())
    # A state dict saved while the template still owned parameters loads strictly.
    old = dict(stn.state_dict(), **{"transform.params": transform.identity_params(1)})
    fresh = SpatialTransformer(nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 8), nn.Tanh()), transform, features=8)
    fresh.load_state_dict(old)
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(fresh(x), stn(x))
    assert fresh.double()(x.double()).dtype == torch.float64


def test_output_size_and_3d():
    loc = LocalizationCNN(2, 3, channels=(4,), features=8)
    stn = SpatialTransformer(loc, Affine(3), features=8, output_size=(6, 7, 8))
    x = torch.rand(2, 2, 10, 12, 14)
    assert stn(x).shape == (2, 2, 6, 7, 8)
    # The identity keeps the field of view (-1/+1 at the outer edges): a plain resize.
    want = nn.functional.interpolate(x, size=(6, 7, 8), mode="trilinear", align_corners=False)
    torch.testing.assert_close(stn(x), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="3D transformer"):
        stn(torch.rand(2, 2, 10, 12))


def test_loc_input_and_multi_transformer():
    def make():
        return SpatialTransformer(
            nn.Sequential(nn.Flatten(), nn.Linear(2 * 16 * 16, 8), nn.ReLU()), Affine(2), 8, output_size=(8, 8)
        )

    torch.manual_seed(0)
    first, second = make(), make()
    for t in (first, second):  # away from the identity, so that the two differ
        with torch.no_grad():
            t.head.weight.normal_(0, 0.1)
    multi = MultiSpatialTransformer([first, second])
    x = torch.rand(4, 2, 16, 16)
    out = multi(x)
    assert out.shape == (4, 4, 8, 8)
    torch.testing.assert_close(out, torch.cat([first(x), second(x)], dim=1))
    assert (first(x) - second(x)).abs().max() > 0.05
    # A transformer that sees one input but warps another (registration: look at the pair, warp moving).
    stn = SpatialTransformer(nn.Sequential(nn.Flatten(), nn.Linear(2 * 16 * 16, 8)), Affine(2), 8)
    with torch.no_grad():
        stn.head.weight.normal_(0, 0.1)
    moving = torch.rand(4, 1, 16, 16)
    warped = stn(moving, loc_input=x)
    assert warped.shape == (4, 1, 16, 16)
    torch.testing.assert_close(warped, warp(moving, stn.predict(x)))
    assert (warped - warp(moving, stn.predict(torch.rand(4, 2, 16, 16)))).abs().max() > 0.05


def test_learns_a_translation():
    """End to end: the STN learns to undo a fixed shift of its inputs."""
    torch.manual_seed(0)
    from helpers import smooth_image

    base = torch.cat([smooth_image((24, 24), seed=s, dtype=torch.float32) for s in range(8)])
    shifted = torch.roll(base, shifts=3, dims=-1)
    stn = SpatialTransformer(nn.Sequential(nn.Flatten(), nn.Linear(24 * 24, 16), nn.Tanh()), Affine(2), 16)
    opt = torch.optim.Adam(stn.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        opt.zero_grad()
        loss = (stn(shifted) - base)[..., 4:-4, 4:-4].square().mean()
        first = first if first is not None else float(loss.detach())
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 1e-4 * first  # it converges (to ~1e-9 of the start)
    # A shift of 3 of 24 columns is 0.25 in normalized units; the output samples the input 0.25 to the right.
    theta = stn.predict(shifted).params.detach()
    want = torch.tensor([[1.0, 0.0, 0.25], [0.0, 1.0, 0.0]]).expand_as(theta)
    torch.testing.assert_close(theta, want, atol=2e-3, rtol=0)


def test_rejects_non_family():
    with pytest.raises(TypeError, match="ParametricTransform"):
        SpatialTransformer(nn.Identity(), nn.Identity(), 4)
