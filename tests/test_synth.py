"""Synthetic training pairs (stnreg.learn.synth) and a network trained on them."""

import pytest
import torch

from stnreg.learn import RegistrationTask, SynthConfig, SynthDataModule, synth_pairs
from stnreg.learn.synth import images_from_labels, random_label_maps
from stnreg.losses import RegistrationLoss


def _small_svf_task(**kwargs) -> RegistrationTask:
    """A small 2D SVF network trained by labels (no image similarity)."""
    net = {"encoder": [8, 16, 16], "decoder": [16, 16, 16], "final": [8]}
    return RegistrationTask(ndim=2, stages=["svf"], similarity_weight=0.0, dice_weight=1.0, **net, **kwargs)


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
    thousands of steps: ``configs/synth_svf.yaml``.)"""
    torch.manual_seed(0)
    data = SynthDataModule(shape=[32, 32], labels=4, cell=10.0, deform=0.15, affine=0.0, batch_size=4, val_batches=1)
    task = _small_svf_task(similarity="mse", regularization={"diffusion": 0.1})
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


@pytest.mark.parametrize("same_map", [1.0, 0.0])
def test_target_is_the_exact_map_that_made_the_pair(same_map):
    """``target`` undoes every warp applied to the moving map: the moving labels resampled through it
    match the fixed labels far better than before, and as well as nearest-label resampling allows."""
    from stnreg.sampler import sample

    cfg = SynthConfig(shape=(64, 64), labels=8, cell=8.0, deform=0.1, affine=1.0, same_map=same_map)
    b = synth_pairs(4, cfg, torch.Generator().manual_seed(2))
    assert b["target"].shape == (4, 64, 64, 2)
    before = float(_dice(b["moving_labels"], b["fixed_labels"]))
    after = float(_dice(sample(b["moving_labels"], b["target"], "linear", "border") > 0.5, b["fixed_labels"]))
    assert before < 0.7 and after > 0.85, (before, after)


def test_same_contrast_shares_the_label_intensities():
    """With ``same_contrast=1`` the two images give each label the same mean intensity (up to bias,
    gamma and noise); with 0 the means are unrelated."""

    def corr(p):
        cfg = SynthConfig(shape=(48, 48), labels=8, cell=8.0, deform=0.0, affine=0.0, same_map=1.0, same_contrast=p)
        b = synth_pairs(8, cfg, torch.Generator().manual_seed(4))
        lab = b["fixed_labels"].bool()
        rs = []
        for i in range(8):
            m = [(b["moving"][i, 0][lab[i, v]].mean(), b["fixed"][i, 0][lab[i, v]].mean()) for v in range(8)]
            rs.append(float(torch.corrcoef(torch.tensor(m).T)[0, 1]))
        return sum(rs) / len(rs)

    assert corr(1.0) > 0.9 and abs(corr(0.0)) < 0.5


def test_contrast_warmup_falls_linearly_to_the_configured_probability():
    dm = SynthDataModule(shape=[8, 8], same_contrast=0.2, contrast_warmup=10)
    stream = dm.train_dataloader().dataset
    ps = [stream._config(k).same_contrast for k in (0, 5, 10, 50)]
    assert ps == pytest.approx([1.0, 0.6, 0.2, 0.2])
    assert dm.val_config.same_contrast == 0.0  # validation pairs always cross contrasts


def test_flow_term_is_the_squared_end_point_error_in_voxels():
    """An untrained (identity) network against a target shifted by 2 voxels along x: flow = 4."""
    from stnreg.coords import lattice

    task = RegistrationTask(ndim=2, stages=["svf"], similarity_weight=0.0, flow_weight=1.0, regularization={})
    img = torch.rand(1, 1, 32, 32)
    target = lattice((32, 32)).unsqueeze(0).clone()
    target[..., 0] += 2 * 2.0 / 32
    terms = task.objective(task(img, img), img, img, target=target)
    assert float(terms["flow"]) == pytest.approx(4.0, rel=1e-3)


def test_exact_map_supervision_teaches_a_network_faster_than_dice():
    """On one batch, 150 steps with the flow term reach a lower end-point error than 150 steps of Dice
    alone: the exact map is a signal at every voxel, the Dice only at label boundaries."""
    cfg = SynthConfig(shape=(32, 32), labels=6, cell=6.0, deform=0.15, affine=0.0, same_contrast=1.0)
    batch = synth_pairs(4, cfg, torch.Generator().manual_seed(0))
    errors = {}
    for fw in (0.0, 1.0):
        torch.manual_seed(0)
        task = _small_svf_task(flow_weight=fw, regularization={"diffusion": 0.05})
        opt = torch.optim.Adam(task.parameters(), lr=3e-3)
        for _ in range(150):
            terms = task.objective(
                task(batch["moving"], batch["fixed"]),
                batch["moving"],
                batch["fixed"],
                batch["moving_labels"],
                batch["fixed_labels"],
                batch["target"],
            )
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
        scorer = RegistrationTask(ndim=2, stages=["svf"], similarity_weight=0.0, flow_weight=1.0, regularization={})
        with torch.no_grad():
            out = task(batch["moving"], batch["fixed"])
            errors[fw] = float(scorer.objective(out, batch["moving"], batch["fixed"], target=batch["target"])["flow"])
    with torch.no_grad():
        identity = float(
            scorer.objective(
                scorer(batch["moving"], batch["fixed"]), batch["moving"], batch["fixed"], target=batch["target"]
            )["flow"]
        )
    assert errors[1.0] < 0.5 * identity and errors[1.0] < 0.5 * errors[0.0], (identity, errors)


def test_the_shipped_model_registers_unseen_synthetic_pairs():
    """The committed ``synth`` network, on pairs drawn from a seed it never trained on (one contrast
    per pair, as it was trained): the label Dice rises over the identity's, and nothing folds."""
    from stnreg.fields import jacobian_determinant
    from stnreg.learn.task import load_task, voxel_displacement

    task = load_task("synth")
    cfg = SynthConfig(shape=(64, 64, 64), labels=16, cell=8.0, deform=0.08, affine=1.0, same_contrast=1.0)
    b = synth_pairs(2, cfg, torch.Generator().manual_seed(12345))
    with torch.no_grad():
        out = task(b["moving"], b["fixed"])
        warped = task.net.warp(b["moving_labels"], out.transform) > 0.5
        jac = jacobian_determinant(voxel_displacement(out.transform, (64, 64, 64)))
    before, after = float(_dice(b["moving_labels"], b["fixed_labels"])), float(_dice(warped.float(), b["fixed_labels"]))
    assert after > before + 0.05 and float((jac <= 0).float().mean()) == 0.0, (before, after)
