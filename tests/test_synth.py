"""Synthetic training pairs (stnreg.learn.synth) and a network trained on them."""

import pytest
import torch

from stnreg.learn import RegistrationTask, SynthConfig, SynthDataModule, synth_pairs
from stnreg.learn.synth import images_from_labels, random_label_maps
from stnreg.losses import RegistrationLoss


def _dice(a, b):
    dims = tuple(range(2, a.dim()))
    return (2 * (a * b).sum(dims) / (a + b).sum(dims).clamp_min(1)).mean()


@pytest.mark.parametrize("shape", [(40, 48), (24, 28, 20)])
def test_pairs_are_deterministic_shaped_and_consistent(shape):
    cfg = SynthConfig(shape=shape, labels=8, cell=6.0)
    a = synth_pairs(2, cfg, torch.Generator().manual_seed(5))
    b = synth_pairs(2, cfg, torch.Generator().manual_seed(5))
    c = synth_pairs(2, cfg, torch.Generator().manual_seed(6))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["fixed"], c["fixed"])
    assert a["moving"].shape == (2, 1, *shape) and a["moving_labels"].shape == (2, 8, *shape)
    for key in ("moving", "fixed"):
        img = a[key]
        assert float(img.amin()) == 0.0 and float(img.amax()) == 1.0
    # One-hot labels: every voxel has exactly one label, and most labels occur in every map.
    for key in ("moving_labels", "fixed_labels"):
        assert torch.equal(a[key].sum(1), torch.ones(2, *shape))
        assert int((a[key].flatten(2).sum(-1) > 0).sum(1).min()) >= 6
    # The pair differs by the drawn deformation and affine, but overlaps well.
    assert 0.2 < float(_dice(a["moving_labels"], a["fixed_labels"])) < 0.95


def test_identity_config_gives_identical_label_maps():
    cfg = SynthConfig(shape=(32, 32), labels=6, deform=0.0, affine=0.0, same_map=1.0)
    a = synth_pairs(3, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a["moving_labels"], a["fixed_labels"])
    assert not torch.allclose(a["moving"], a["fixed"])  # independent contrasts on the same anatomy


def test_images_follow_their_labels():
    """Within a label the intensity varies far less than between labels (before bias and noise it is a
    Gaussian mixture), so the labels are what the images show."""
    g = torch.Generator().manual_seed(3)
    maps = random_label_maps(2, (48, 48), 6, g, cell=8.0)
    img = images_from_labels(maps, 6, g)
    for i in range(2):
        means = torch.stack([img[i, 0][maps[i, 0] == v].mean() for v in range(6) if (maps[i, 0] == v).any()])
        within = torch.stack([img[i, 0][maps[i, 0] == v].std() for v in range(6) if (maps[i, 0] == v).sum() > 1])
        assert float(means.std()) > 2 * float(within.median())


def test_similarity_weight_zero_trains_on_labels_alone():
    loss = RegistrationLoss("mse", similarity_weight=0.0, dice_weight=1.0)
    w, f = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
    lab = torch.zeros(1, 2, 8, 8)
    lab[:, 0] = 1
    terms = loss(w, f, [], lab, lab)
    assert "similarity" not in terms and float(terms["loss"]) < 1e-4


def test_the_dice_of_synthetic_labels_trains_a_network():
    """Labels alone (no image similarity) drive the network: fitted to one synthetic batch, it raises
    the batch's label Dice well above the Dice before registration. (Generalizing to new pairs takes
    thousands of steps: ``configs/synth_affine_svf.yaml``.)"""
    torch.manual_seed(0)
    data = SynthDataModule(shape=[32, 32], labels=4, cell=10.0, deform=0.15, affine=0.0, batch_size=4, val_batches=1)
    task = RegistrationTask(
        ndim=2,
        stages=["svf"],
        encoder=[8, 16, 16],
        decoder=[16, 16, 16],
        final=[8],
        similarity="mse",
        similarity_weight=0.0,
        dice_weight=1.0,
        regularization={"diffusion": 0.1},
    )
    batch = next(iter(data.val_dataloader()))
    before = float(_dice(batch["moving_labels"], batch["fixed_labels"]))
    opt = torch.optim.Adam(task.parameters(), lr=3e-3)
    for _ in range(100):
        out = task(batch["moving"], batch["fixed"])
        terms = task.objective(out, batch["moving"], batch["fixed"], batch["moving_labels"], batch["fixed_labels"])
        assert "similarity" not in terms
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    with torch.no_grad():
        out = task(batch["moving"], batch["fixed"])
        after = float(_dice(task.net.warp(batch["moving_labels"], out.transform), batch["fixed_labels"]))
    assert after > before + 0.1, (before, after)
