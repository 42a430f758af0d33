"""The paper's experiments: data generators, loaders, models, and that an ST-CNN learns."""

import gzip
import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import quiet_trainer

from stnreg.cli import main
from stnreg.paper import (
    EXPERIMENTS,
    ClassificationTask,
    CoLocalizationTask,
    CoLocalizer,
    MNISTVariants,
    STClassifier,
    box_iou,
    load_mnist,
    make_variant,
    read_idx,
)


def _digits(n=64, seed=0):
    """Blocky synthetic 'digits': a bright 12x8 bar at the centre of a 28x28 frame, class = seed-free index."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28), np.uint8)
    x[:, 8:20, 10:18] = rng.integers(128, 256, (n, 1, 1))
    return x, np.arange(n) % 10


def _write_idx(path, arr, gz=True):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(data)


def test_idx_folder_and_npz_load_identically(tmp_path):
    x, y = _digits(20)
    for name, arr in (
        ("train-images-idx3-ubyte", x),
        ("train-labels-idx1-ubyte", y),
        ("t10k-images-idx3-ubyte", x[:5]),
        ("t10k-labels-idx1-ubyte", y[:5]),
    ):
        _write_idx(tmp_path / f"{name}.gz", arr, gz=name.startswith("train"))
        if not name.startswith("train"):
            (tmp_path / f"{name}.gz").rename(tmp_path / name)
    a = load_mnist(tmp_path)
    np.savez(tmp_path / "m.npz", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    b = load_mnist(tmp_path / "m.npz")
    for k in a:
        assert np.array_equal(a[k], b[k])
    assert a["x_train"].shape == (20, 28, 28) and a["y_train"].dtype == np.int64


def test_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    x, _ = _digits(3)
    _write_idx(tmp_path / "short.gz", x)
    with gzip.open(tmp_path / "short.gz") as fh:
        raw = fh.read()
    with gzip.open(tmp_path / "short.gz", "wb") as fh:
        fh.write(raw[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short.gz")
    with pytest.raises(ValueError, match="IDX files"):
        load_mnist(tmp_path)
    np.savez(tmp_path / "m.npz", x_train=x)
    with pytest.raises(ValueError, match="missing arrays"):
        load_mnist(tmp_path / "m.npz")


SIZES = {
    "R": (1, 28),
    "RTS": (1, 42),
    "P": (1, 28),
    "E": (1, 28),
    "TC": (1, 60),
    "addition": (2, 42),
    "coloc-T": (1, 84),
    "coloc-TC": (1, 84),
}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_generators_shapes_determinism_and_labels(name):
    x, y = _digits(40)
    v = make_variant(name, x, y, seed=3, chunk=16)
    c, s = SIZES[name]
    assert v.images.shape == (40, c, s, s) and v.images.dtype == torch.uint8
    assert int(v.images.max()) > 100  # the digit is visible
    again = make_variant(name, x, y, seed=3, chunk=16)
    assert torch.equal(v.images, again.images) and torch.equal(v.labels, again.labels)
    other = make_variant(name, x, y, seed=4, chunk=16)
    assert not torch.equal(v.images, other.images)
    if name == "addition":
        assert v.labels.min() >= 0 and v.labels.max() <= 18 and not torch.equal(v.labels, torch.as_tensor(y))
    else:
        assert torch.equal(v.labels, torch.as_tensor(y))
    assert (v.boxes is not None) == (name in ("TC", "coloc-T", "coloc-TC"))


@pytest.mark.parametrize("name", ["TC", "coloc-T", "coloc-TC"])
def test_true_box_holds_the_digit(name):
    x, y = _digits(30)
    v = make_variant(name, x, y, seed=0)
    for i in range(30):
        x0, y0, x1, y1 = v.boxes[i].tolist()
        assert x1 - x0 == 28 and y1 - y0 == 28 and x0 >= 0 and x1 <= SIZES[name][1]
        crop = v.images[i, 0, y0:y1, x0:x1]
        # Max-pasted clutter may add ink on top, never remove the digit's.
        assert bool((crop >= torch.as_tensor(x[i])).all())
        if name == "coloc-T":
            assert torch.equal(crop, torch.as_tensor(x[i])) and int(v.images[i].sum()) == int(x[i].sum())


def test_rotation_keeps_ink_and_rts_stays_in_canvas():
    x, y = _digits(50)
    r = make_variant("R", x, y, seed=0).images.float().sum((1, 2, 3))
    mass = torch.as_tensor(x).float().sum((1, 2))
    assert torch.allclose(r, mass, rtol=0.05)
    rts = make_variant("RTS", x, y, seed=0).images.float()
    border = rts[..., :2, :].sum() + rts[..., -2:, :].sum() + rts[..., :, :2].sum() + rts[..., :, -2:].sum()
    assert float(border) == 0.0


@pytest.mark.parametrize("transform", ["affine", "projective", "tps"])
def test_st_classifiers_start_at_identity(transform):
    x = torch.rand(4, 1, 28, 28)
    m = STClassifier("st-cnn", (1, 28, 28), 10, transform)
    assert torch.allclose(m.transformed(x), x, atol=1e-5)
    assert m(x).shape == (4, 10)
    assert torch.equal(STClassifier("cnn", (1, 28, 28)).transformed(x), x)
    two = STClassifier("st-fcn", (2, 42, 42), 19, transform, transformers=2)
    assert two(torch.rand(3, 2, 42, 42)).shape == (3, 19)


@pytest.mark.parametrize("transform", ["affine", "tps"])
def test_channels_last_gives_the_same_logits_and_gradients(transform):
    tasks = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        task = ClassificationTask("st-cnn", [1, 42, 42], transform=transform, st_pool=2, channels_last=channels_last)
        with torch.no_grad():  # a non-identity transform, so the sampler's gradient is exercised
            task.model.transformer.head.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
        tasks.append(task)
    assert tasks[1].model.classifier[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(8, 1, 42, 42, generator=torch.Generator().manual_seed(2))
    a = tasks[0](x)
    b = tasks[1](x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    a.square().sum().backward()
    b.square().sum().backward()
    # Every parameter gets a gradient (the STN's template transform holds none of its own).
    named = zip(tasks[0].named_parameters(), tasks[1].parameters(), strict=True)
    grads = {n: (pa.grad, pb.grad) for (n, pa), pb in named}
    assert all(ga is not None for ga, _ in grads.values())
    assert grads["model.transformer.head.weight"][0].abs().sum() > 0
    for ga, gb in grads.values():
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)


def test_colocalizer_window_and_iou():
    m = CoLocalizer()
    # A blank image gives a flat heatmap: the soft-argmax is the centre, a digit-sized window.
    w = m.window(torch.zeros(2, 1, 84, 84))
    assert torch.allclose(w, torch.tensor([[28.0, 28.0, 56.0, 56.0]] * 2), atol=1e-4)
    # Any image: windows stay inside it, at the digit's size (or the scale asked for).
    x = torch.rand(3, 1, 84, 84)
    w = m.window(x)
    assert bool((w >= -1e-4).all() and (w <= 84 + 1e-4).all())
    assert torch.allclose(w[:, 2:] - w[:, :2], torch.full((3, 2), 28.0), atol=1e-4)
    p = m.attention(x, scale=0.9)
    assert torch.allclose(p[:, 0], torch.full((3,), 0.9)) and bool((p[:, 1:].abs() <= 0.1 + 1e-6).all())
    assert m(x).shape[0] == 3 and torch.allclose(m(x).norm(dim=1), torch.ones(3), atol=1e-5)
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [20, 20, 30, 30]])
    assert torch.allclose(box_iou(a, b), torch.tensor([1 / 3, 0.0]))


def test_colocalizer_centre_follows_a_bright_spot():
    """The soft-argmax maps heatmap pixels back to the right input coordinates."""
    m = CoLocalizer(beta=1.0)
    with torch.no_grad():
        for layer in m.localization:
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.zero_()
                layer.bias.zero_()
                k = layer.weight.shape[-1]
                layer.weight[:, :, k // 2, k // 2] = 1.0  # a centre tap: the heatmap is the (pooled) image
    x = torch.zeros(1, 1, 84, 84)
    x[0, 0, 40:42, 60:62] = 100.0  # one pooled pixel at (x, y) = (30, 20) of 42, centre (61, 41) px
    c = m.centre(x)[0]
    assert torch.allclose(c, torch.tensor([61 / 84 * 2 - 1, 41 / 84 * 2 - 1]), atol=1e-3)


def test_st_cnn_learns_rts_quickly(data_dir):
    """A few thousand RTS digits: the error falls well below chance (90%) within seconds."""
    dm = MNISTVariants("RTS", str(data_dir / "mnist" / "mnist.npz"), train_size=4000, test_size=1000, batch_size=64)
    L.seed_everything(0)
    task = ClassificationTask("st-cnn", [1, 42, 42], st_pool=2, optimizer="adam", lr=2e-3)
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(task, dm)
    error = float(trainer.validate(task, dm, verbose=False)[0]["val/error"])
    assert error < 40.0


def test_colocalization_trains_and_scores(tmp_path):
    x, _ = _digits(64)
    np.savez(
        tmp_path / "m.npz", x_train=x, y_train=np.zeros(64, np.int64), x_test=x[:32], y_test=np.zeros(32, np.int64)
    )
    dm = MNISTVariants("coloc-T", str(tmp_path / "m.npz"), digit=0, batch_size=16)
    task = CoLocalizationTask(pretrain_digits=64)
    assert not bool(task.pretrained)
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(task, dm)
    # The encoder was pre-trained on the data module's digits at fit start, then frozen.
    assert bool(task.pretrained) and float(task.pretrain_error) == 0.0
    assert not any(p.requires_grad for p in task.model.encoder.parameters())
    acc = float(trainer.validate(task, dm, verbose=False)[0]["val/accuracy"])
    # The windows the score uses are the ones the figure draws.
    imgs, _, boxes = dm.test_set.tensors
    hits = box_iou(task.model.window(imgs.float() / 255), boxes.float()) > 0.5
    assert acc == pytest.approx(100.0 * float(hits.float().mean()), abs=1e-3)
    from stnreg.paper.figures import colocalization_figure

    assert colocalization_figure(task.model, imgs[:4], boxes[:4], tmp_path / "coloc.png").exists()
    # A checkpoint restores the pre-trained encoder and does not pre-train again.
    trainer.save_checkpoint(tmp_path / "coloc.ckpt")
    back = CoLocalizationTask.load_from_checkpoint(tmp_path / "coloc.ckpt", map_location="cpu")
    assert bool(back.pretrained)
    for a, b in zip(back.model.parameters(), task.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_triplet_loss_prefers_windows_on_the_digit(data_dir):
    """With the pre-trained fixed encoder, the paper's loss is lower on the digits than beside them or off them."""
    mnist = load_mnist(data_dir / "mnist" / "mnist.npz")
    L.seed_everything(0)
    task = CoLocalizationTask()
    task.pretrain(mnist["x_train"][:10_000], mnist["y_train"][:10_000])
    keep = mnist["y_test"] == 7
    v = make_variant("coloc-T", mnist["x_test"][keep][:128], mnist["y_test"][keep][:128], seed=0)
    x = v.images.float() / 255
    s = 28 / 84
    centre = (v.boxes[:, :2].float() + 14) / 84 * 2 - 1

    def loss_at(shift):
        t = (centre + shift).clamp(-(1 - s), 1 - s)
        e = task.model.embed(task.model.sample_window(x, torch.cat([torch.full((len(x), 1), s), t], 1)))
        neg = task.model.embed(task.random_crops(x))
        pos = torch.cdist(e, e).pow(2)
        hinge = torch.relu(pos - (e - neg).pow(2).sum(1)[:, None] + 1.0)
        return float(hinge[~torch.eye(len(x), dtype=torch.bool)].mean())

    with torch.no_grad():
        # 12 px off the digit in a random direction per image, as an untrained localizer would be.
        angle = torch.rand(len(x), generator=torch.Generator().manual_seed(0)) * 2 * torch.pi
        on, beside = loss_at(0.0), loss_at(torch.stack([angle.cos(), angle.sin()], 1) * 12 / 42)
        empty = float(task.triplet_loss(torch.zeros_like(x)))
    assert on < beside - 0.3 and on < empty - 0.3


def test_colocalizer_window_moves_to_the_digit(data_dir):
    """A tiny budget (a few seconds): the windows go from the image centre onto the digits."""
    dm = MNISTVariants(
        "coloc-T", str(data_dir / "mnist" / "mnist.npz"), train_size=1000, test_size=300, digit=3, batch_size=32
    )
    dm.setup()
    L.seed_everything(0)
    task = CoLocalizationTask(pretrain_digits=3000)
    imgs, _, boxes = dm.test_set.tensors
    x, boxes = imgs.float() / 255, boxes.float()

    def miss():
        with torch.no_grad():
            w = task.model.window(x)
        dist = ((w[:, :2] + w[:, 2:]) / 2 - (boxes[:, :2] + boxes[:, 2:]) / 2).norm(dim=1)
        return float(dist.mean()), 100.0 * float((box_iou(w, boxes) > 0.5).float().mean())

    dist_before, acc_before = miss()
    quiet_trainer(max_epochs=2, limit_val_batches=0).fit(task, dm)
    dist_after, acc_after = miss()
    assert acc_before < 30.0 and dist_before > 10.0
    assert dist_after < 4.0 and acc_after > 90.0


def test_paper_config_runs_with_stnreg_fit(tmp_path, data_dir, monkeypatch):
    args = [
        "fit",
        "--config",
        "configs/paper/distorted_rts.yaml",
        "--trainer.max_steps",
        "3",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.callbacks",
        "[]",
        "--trainer.enable_checkpointing",
        "false",
        "--data.init_args.data",
        str(data_dir / "mnist" / "mnist.npz"),
        "--data.init_args.train_size",
        "512",
        "--data.init_args.test_size",
        "256",
        "--model.init_args.transform",
        "tps",
    ]
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(args) == 0


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown experiment"):
        make_variant("XYZ", *_digits(2), seed=0)
    with pytest.raises(ValueError, match="unknown architecture"):
        STClassifier("resnet")
    with pytest.raises(ValueError, match="unknown transform"):
        STClassifier("st-cnn", transform="spline")
    with pytest.raises(ValueError, match="unknown experiment"):
        MNISTVariants("XYZ")


def test_fresh_training_sets_change_every_epoch(tmp_path):
    x, y = _digits(40)
    np.savez(tmp_path / "m.npz", x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    dm = MNISTVariants("addition", str(tmp_path / "m.npz"), batch_size=16)
    dm.setup()
    assert len(dm.train_dataloader()) == 2
    epochs = []
    for e in range(3):
        dm._epoch = lambda e=e: e
        batches = list(dm.train_dataloader())
        assert [b[0].shape for b in batches] == [(16, 2, 42, 42)] * 2
        epochs.append(torch.cat([b[0] for b in batches]))
        labels = torch.cat([b[1] for b in batches])
        assert ((labels >= 0) & (labels <= 18)).all()
    # Epoch 0 is train_set (shuffled); later epochs draw new partners and distortions.
    first = {bytes(im.numpy().tobytes()) for im in dm.train_set.tensors[0]}
    assert {bytes(im.numpy().tobytes()) for im in epochs[0]} <= first
    assert not any(bytes(im.numpy().tobytes()) in first for im in epochs[1])
    assert not torch.equal(epochs[1], epochs[2])
    # Deterministic: the same epoch gives the same batches again.
    dm._epoch = lambda: 1
    assert torch.equal(torch.cat([b[0] for b in dm.train_dataloader()]), epochs[1])
    fixed = MNISTVariants("addition", str(tmp_path / "m.npz"), batch_size=16, fresh=False)
    fixed.setup()
    assert torch.equal(fixed.draw_train(5).tensors[0], fixed.train_set.tensors[0])


def test_projective_views_never_fold_or_mirror():
    from scipy import ndimage

    from stnreg.paper.data import _convex

    square = torch.tensor([[[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]], dtype=torch.float64)
    assert _convex(square).item() and not _convex(square[:, [0, 2, 1, 3]]).item()
    # A bright full frame maps to one convex quadrilateral; a copy mirrored through the horizon
    # (canvas points with w <= 0) would be a second blob.
    frame = np.full((2000, 28, 28), 255, np.uint8)
    v = make_variant("P", frame, np.zeros(2000, np.int64), seed=3)
    blobs = [ndimage.label(im[0].numpy() > 0, np.ones((3, 3)))[1] for im in v.images]
    assert max(blobs) == 1


def test_projective_maps_move_the_corners_as_specified_and_invert():
    from stnreg.paper.data import projective_maps, warp_projective

    n = 4000
    h = projective_maps(n, torch.Generator().manual_seed(0))
    corners = torch.tensor([[-14.0, -14.0, 1.0], [14.0, -14.0, 1.0], [14.0, 14.0, 1.0], [-14.0, 14.0, 1.0]])
    inv = torch.linalg.inv(h)
    moved = torch.einsum("nij,kj->nki", inv, corners.double())
    moved = moved[..., :2] / moved[..., 2:]  # where the digit's corners land on the canvas
    # Scale U(0.75, 1.0) (mean 0.875 x 14 px) and N(0, 5 px) per corner coordinate: the spread is
    # sqrt(5^2 + (14 x 0.25)^2 / 12) = 5.1 px, a little less after redrawing folded quadrilaterals.
    assert abs(float((moved * corners[:, :2].sign()).mean()) - 0.875 * 14) < 0.3
    spread = (moved - moved.mean(0)).std(0)
    assert ((spread > 4.5) & (spread < 5.5)).all()
    # The digit lies on the visible side of every map (w > 0 at its corners, not only mostly).
    assert (torch.einsum("nij,nkj->nki", h, torch.cat([moved, torch.ones(n, 4, 1)], -1))[..., 2] > 0).all()
    # out(p) = in(h(p)): a linear ramp per axis, which bilinear sampling reproduces exactly, reads
    # back the mapped point wherever it falls inside the input's pixel centres.
    yy, xx = torch.meshgrid(torch.arange(28.0) - 13.5, torch.arange(28.0) - 13.5, indexing="ij")
    ramps = torch.stack([xx + 100, yy + 100])[None].expand(64, 2, 28, 28)
    out = warp_projective(ramps, h[:64]).double()
    hom = torch.stack([xx, yy, torch.ones_like(xx)], -1).double()
    mapped = torch.einsum("nij,hwj->nhwi", h[:64], hom)
    pts = mapped[..., :2] / mapped[..., 2:]
    inside = (pts.abs() < 13.4).all(-1) & (mapped[..., 2] > 0)
    assert inside.float().mean() > 0.3
    err = (out.permute(0, 2, 3, 1) - (pts + 100))[inside].abs()
    assert float(err.max()) < 1e-3
    with pytest.raises(ValueError, match="28, 28"):
        warp_projective(torch.zeros(2, 1, 42, 42), h[:2])
    with pytest.raises(ValueError, match="one"):
        warp_projective(torch.zeros(2, 1, 28, 28), h[:3])


def test_projective_corner_std_sets_the_spread_and_reaches_the_data_module():
    from stnreg.paper.data import projective_maps

    corners = torch.tensor([[-14.0, -14.0, 1.0], [14.0, -14.0, 1.0], [14.0, 14.0, 1.0], [-14.0, 14.0, 1.0]])
    # No corner noise leaves the scale alone: canvas -> digit is p / s with s in U(0.75, 1.0).
    h = projective_maps(500, torch.Generator().manual_seed(1), 0.0)
    h = h / h[:, 2:, 2:]
    inv_s = h[:, 0, 0]
    assert torch.allclose(h, torch.diag_embed(torch.stack([inv_s, inv_s, torch.ones_like(inv_s)], -1)), atol=1e-9)
    assert float(inv_s.min()) >= 1.0 and float(inv_s.max()) <= 1 / 0.75
    moved = torch.einsum(
        "nij,kj->nki", torch.linalg.inv(projective_maps(4000, torch.Generator().manual_seed(0), 2.0)), corners.double()
    )
    spread = (moved[..., :2] / moved[..., 2:]).std(0)
    # sqrt(2^2 + 3.5^2 / 12) = 2.2 px; folded quadrilaterals are rare at this spread.
    assert ((spread > 2.0) & (spread < 2.4)).all()
    with pytest.raises(ValueError, match="corner_std"):
        projective_maps(2, torch.Generator(), -1.0)
    with pytest.raises(ValueError, match="p_corner_std must be a finite"):
        MNISTVariants(experiment="P", p_corner_std=float("nan"))
    with pytest.raises(ValueError, match="P experiment only"):
        MNISTVariants(experiment="RTS", p_corner_std=3.5)
    x = np.zeros((20, 28, 28), np.uint8)
    x[:, 10:18, 12:16] = 255
    y = np.arange(20) % 10
    mild, harsh = (make_variant("P", x, y, seed=3, p_corner_std=v).images.float() for v in (0.5, 5.0))
    assert torch.equal(make_variant("P", x, y, seed=3).images.float(), harsh)
    from_module = MNISTVariants(experiment="P", p_corner_std=0.5)._make((x, y), 3).tensors[0]
    assert torch.equal(from_module.float(), mild)
    # The bar stays near the centre under mild corner noise, and moves about under the issue's.
    centre = torch.arange(28.0) - 13.5

    def centroid_x(img: torch.Tensor) -> torch.Tensor:
        return (img[:, 0].sum(1) * centre).sum(1) / img[:, 0].sum((1, 2))

    assert float(centroid_x(mild).std()) < float(centroid_x(harsh).std()) / 3


def test_cnn_hidden_layers_keep_the_default_layout():
    plain = STClassifier("cnn", (2, 42, 42), 19)
    keys = ["0.0.weight", "0.0.bias", "0.3.weight", "0.3.bias", "3.weight", "3.bias"]
    assert list(plain.classifier.state_dict()) == keys
    deep = STClassifier("cnn", (2, 42, 42), 19, cnn_hidden=[64])
    linear = [m for m in deep.classifier if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(32 * 11 * 11, 64), (64, 19)]
    assert deep(torch.rand(3, 2, 42, 42)).shape == (3, 19)


def _write_digit_struct(folder, samples):
    """A MATLAB v7.3 digitStruct.mat as SVHN ships it (HDF5 with object references)."""
    import h5py

    with h5py.File(folder / "digitStruct.mat", "w") as f:
        refs = f.create_group("#refs#")
        g = f.create_group("digitStruct")
        names = g.create_dataset("name", (len(samples), 1), dtype=h5py.ref_dtype)
        bboxes = g.create_dataset("bbox", (len(samples), 1), dtype=h5py.ref_dtype)
        for i, (name, boxes) in enumerate(samples):
            names[i, 0] = refs.create_dataset(f"n{i}", data=np.array([[ord(c)] for c in name], np.uint16)).ref
            b = refs.create_group(f"b{i}")
            for j, key in enumerate(("label", "left", "top", "width", "height")):
                vals = [float(box[j]) for box in boxes]
                if len(vals) == 1:
                    b.create_dataset(key, data=np.array([[vals[0]]]))
                else:
                    ds = b.create_dataset(key, (len(vals), 1), dtype=h5py.ref_dtype)
                    for k, v in enumerate(vals):
                        ds[k, 0] = refs.create_dataset(f"v{i}_{key}_{k}", data=np.array([[v]])).ref
            bboxes[i, 0] = b.ref


def test_svhn_format1_and_format2_loaders(tmp_path):
    from scipy.io import savemat
    from skimage.io import imsave

    from stnreg.paper.svhn import load_svhn, load_svhn_cropped

    rng = np.random.default_rng(0)
    for name in ("1.png", "2.png"):
        imsave(tmp_path / name, rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), check_contrast=False)
    # label, left, top, width, height; SVHN writes the digit 0 as label 10.
    _write_digit_struct(tmp_path, [("1.png", [(10, 5, 6, 8, 20)]), ("2.png", [(3, 10, 5, 9, 22), (7, 20, 6, 9, 21)])])
    x, y = load_svhn(tmp_path, size=32)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == [[0, 10, 10, 10, 10], [3, 7, 10, 10, 10]]
    savemat(
        tmp_path / "train_32x32.mat",
        {"X": rng.integers(0, 255, (32, 32, 3, 4), dtype=np.uint8), "y": np.array([[10], [1], [2], [9]])},
    )
    x2, y2 = load_svhn_cropped(tmp_path / "train_32x32.mat")
    assert x2.shape == (4, 3, 32, 32) and y2.tolist() == [0, 1, 2, 9]
    with pytest.raises(ValueError, match="digitStruct"):
        load_svhn(tmp_path / "nowhere")


def test_cub_loader_and_models(tmp_path):
    from skimage.io import imsave

    from stnreg.paper import PartAttentionNet, SVHNNet
    from stnreg.paper.cub import CUBDataset

    (tmp_path / "images" / "001.Albatross").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines, labels, split = [], [], []
    for i in range(1, 5):
        rel = f"001.Albatross/bird{i}.jpg"
        imsave(tmp_path / "images" / rel, rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8), check_contrast=False)
        lines.append(f"{i} {rel}")
        labels.append(f"{i} {1 + i % 2}")
        split.append(f"{i} {int(i <= 3)}")
    (tmp_path / "images.txt").write_text("\n".join(lines))
    (tmp_path / "image_class_labels.txt").write_text("\n".join(labels))
    (tmp_path / "train_test_split.txt").write_text("\n".join(split))
    train, test = CUBDataset(tmp_path, True, 64), CUBDataset(tmp_path, False, 64)
    assert len(train) == 3 and len(test) == 1
    img, label = test[0]
    assert img.shape == (3, 64, 64) and img.dtype == torch.uint8 and label == 0
    assert PartAttentionNet(4, crop=32, channels=(8, 8), classes=200)(torch.rand(2, 3, 64, 64)).shape == (2, 200)
    assert SVHNNet(64, "multi", channels=(8, 8, 8, 8), hidden=16)(torch.rand(2, 3, 64, 64)).shape == (2, 5, 11)
    (tmp_path / "train_test_split.txt").unlink()
    with pytest.raises(ValueError, match="train_test_split"):
        CUBDataset(tmp_path)


def test_figure_script_from_checkpoint(tmp_path):
    from stnreg.paper.figures import main as figure_main

    x, y = _digits(64)
    np.savez(tmp_path / "m.npz", x_train=x, y_train=y, x_test=x[:16], y_test=y[:16])
    dm = MNISTVariants("RTS", str(tmp_path / "m.npz"), batch_size=16)
    task = ClassificationTask("st-cnn", [1, 42, 42], st_pool=2, optimizer="adam", lr=1e-3)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(task, dm)
    trainer.save_checkpoint(tmp_path / "st.ckpt")
    out = tmp_path / "fig.png"
    assert (
        figure_main(
            [
                str(tmp_path / "st.ckpt"),
                "--experiment",
                "RTS",
                "--data",
                str(tmp_path / "m.npz"),
                "-n",
                "4",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert out.exists()
