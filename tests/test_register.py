import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import smooth_image

import stnreg
from stnreg import Grid
from stnreg.image import Image
from stnreg.io import read_image, to_sitk, write_image
from stnreg.losses import bending_energy
from stnreg.register import Stage, parse_pipeline, register
from stnreg.transforms.base import _cached_world_lattice


def _blobs(points: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A smooth analytic image: a sum of Gaussian blobs (3-6 mm) evaluated at world points ``(..., 3)``."""
    g = torch.Generator().manual_seed(seed)
    centers = (torch.rand(40, 3, generator=g, dtype=torch.float64) - 0.5) * 36
    sigmas = 3 + 3 * torch.rand(40, generator=g, dtype=torch.float64)
    amps = 0.5 + torch.rand(40, generator=g, dtype=torch.float64)
    d2 = (points.double().unsqueeze(-2) - centers).square().sum(-1)
    return (amps * torch.exp(-d2 / (2 * sigmas**2))).sum(-1).float()


def _pair_3d(shape=(28, 30, 32)):
    """Fixed on an oblique anisotropic grid, moving on an axis-aligned 1 mm grid of another size, both
    sampled from one analytic scene: ``moving(y) = scene(T^-1(y))`` with a known ITK affine ``T``."""
    rot = sitk.VersorTransform((0.3, -0.2, 0.9), 0.25).GetMatrix()
    fgrid = Grid(shape, (1.1, 1.0, 0.9), (-15.0, -14.0, -12.0), rot)
    fixed = Image(_blobs(fgrid.points("world", torch.float64))[None], fgrid, "fixed")
    truth = sitk.AffineTransform(3)
    c, s = math.cos(0.12), math.sin(0.12)
    truth.SetMatrix([c * 1.04, -s, 0.02, s, c * 0.97, 0.0, -0.03, 0.0, 1.02])
    truth.SetCenter(to_sitk(fixed).TransformContinuousIndexToPhysicalPoint([n / 2 for n in reversed(shape)]))
    truth.SetTranslation([1.5, -2.0, 1.0])
    mgrid = Grid((44, 46, 48), origin=(-24.0, -23.0, -22.0))  # covers the fixed field of view
    inv = truth.GetInverse()
    ypts = mgrid.points("world", torch.float64).reshape(-1, 3)
    xpts = torch.tensor([inv.TransformPoint(p) for p in ypts.tolist()], dtype=torch.float64)
    moving = Image(_blobs(xpts).reshape(1, *mgrid.shape), mgrid, "moving")
    return moving, fixed, truth


def test_parse_pipeline():
    stages = parse_pipeline("rigid+affine+svf")
    assert [s.family for s in stages] == ["rigid", "affine", "svf"]
    assert stages[2].iterations and stages[2].shrink
    with pytest.raises(ValueError, match="must come last"):
        parse_pipeline("svf+affine")
    with pytest.raises(ValueError, match="unknown transform"):
        parse_pipeline("rigid+warp")


def test_affine_recovered_in_world_space_across_grids():
    moving, fixed, truth = _pair_3d()
    stages = [Stage("affine", shrink=(2, 1), iterations=(200, 100), lr=0.005)]
    r = register(moving, fixed, transform=stages, loss="mse", progress=False, device="cpu")
    pts = fixed.grid.points("world", torch.float64).reshape(-1, 3)[::97]
    want = torch.tensor([truth.TransformPoint(p.tolist()) for p in pts], dtype=torch.float64)
    got = r.transform(pts.float().unsqueeze(0))[0].double()
    err = (got - want).norm(dim=-1)
    assert err.median() < 0.25 and err.max() < 1.0, (float(err.median()), float(err.max()))
    assert r.metrics["ncc_after"] > 0.99 > r.metrics["ncc_before"]
    # No full-resolution world lattice outlives the call.
    assert _cached_world_lattice.cache_info().currsize == 0


def test_saved_transforms_reproduce_with_simpleitk(tmp_path):
    moving, fixed, _ = _pair_3d((20, 22, 24))
    stages = [Stage("affine", shrink=(2,), iterations=(60,)), Stage("svf", shrink=(2, 1), iterations=(30, 20))]
    r = register(moving, fixed, transform=stages, loss="lncc", progress=False, device="cpu")
    files = r.save(tmp_path, total_displacement=True)
    report = json.loads(files["report"].read_text())
    assert report["transform"] == ["affine.tfm", "deformable.nii.gz"]
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(sitk.ReadTransform(str(tmp_path / "affine.tfm")))
    field = sitk.Cast(sitk.ReadImage(str(tmp_path / "deformable.nii.gz")), sitk.sitkVectorFloat64)
    # The SVF's displacement is written on its own lattice (field_factor 2: half the fixed grid).
    assert field.GetSize() == tuple(r.deformable.shape[::-1]) == (12, 11, 10)
    composite.AddTransform(sitk.DisplacementFieldTransform(field))
    fixed_itk = sitk.ReadImage(str(files["warped"]))
    theirs = sitk.GetArrayFromImage(sitk.Resample(to_sitk(moving), fixed_itk, composite, sitk.sitkLinear, 0.0))
    ours = r.warped.data[0].numpy()
    rng = float(moving.data.max() - moving.data.min())
    assert np.abs(theirs - ours).mean() < 0.01 * rng
    pts = fixed.grid.points("world", torch.float64).reshape(-1, 3)[::37]
    itk_pts = torch.tensor([composite.TransformPoint(p.tolist()) for p in pts], dtype=torch.float64)
    our_pts = r.transform(pts.float().unsqueeze(0))[0].double()
    assert (itk_pts - our_pts).norm(dim=-1).max() < 0.1 * min(fixed.grid.spacing)
    # The total displacement field alone is the same map.
    total = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.ReadImage(str(tmp_path / "total_displacement.nii.gz")), sitk.sitkVectorFloat64)
    )
    tot_pts = torch.tensor([total.TransformPoint(p.tolist()) for p in pts], dtype=torch.float64)
    assert (tot_pts - our_pts).norm(dim=-1).max() < 0.1 * min(fixed.grid.spacing)
    assert (tmp_path / "qc.png").stat().st_size > 10_000


def test_deformable_2d_with_labels_and_apply():
    size = 64
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = ((xx - 30) ** 2 + (yy - 32) ** 2 < 15**2).long() + ((xx - 30) ** 2 + (yy - 32) ** 2 < 7**2).long()
    img = labels.float() + 0.2 * smooth_image((size, size), seed=3, dtype=torch.float32)[0, 0]
    fixed = Image(img[None], Grid((size, size)), "fixed")
    fixed_lab = Image(labels[None], fixed.grid, "fixed labels")
    shift = stnreg.Translation(2, params=torch.tensor([[3.0, -2.0]]))
    moving = stnreg.apply(shift.inverse(), fixed, fixed)
    moving_lab = stnreg.apply(shift.inverse(), fixed_lab, fixed, "label")
    r = register(moving, fixed, transform="affine+svf", loss="lncc", labels=(moving_lab, fixed_lab), progress=False)
    assert r.metrics["dice_after"] > 0.95 > r.metrics["dice_before"]
    assert r.metrics["jacobian"]["folding_percent"] == 0.0
    warped_lab = stnreg.apply(r.transform, moving_lab, fixed, "label")
    assert set(warped_lab.data.unique().tolist()) <= {0, 1, 2}


def test_multimodal_mi():
    fixed_t = smooth_image((64, 64), seed=5, dtype=torch.float32, sigma=3.0)[0]
    fixed = Image(fixed_t, Grid((64, 64)), "fixed")
    rot = stnreg.Rigid(2, params=torch.tensor([[0.08, 2.0, -1.5]]), center=[31.5, 31.5])
    moving = stnreg.apply(rot.inverse(), fixed, fixed)
    moving = moving.with_data(1.0 - moving.data)  # inverted contrast: only MI can match it
    r = register(moving, fixed, transform="rigid", loss="mi", progress=False)
    p = torch.tensor([[[20.0, 40.0], [45.0, 15.0]]])
    assert (r.transform(p) - rot(p)).norm(dim=-1).max() < 0.5


def test_bad_inputs_are_named():
    img2 = Image(torch.rand(1, 16, 16), Grid((16, 16)), "two_d")
    img3 = Image(torch.rand(1, 8, 8, 8), Grid((8, 8, 8)), "three_d")
    with pytest.raises(ValueError, match="dimension mismatch: moving two_d is 2D, fixed three_d is 3D"):
        register(img2, img3, progress=False)
    flat = Image(torch.ones(1, 16, 16), Grid((16, 16)), "flat")
    with pytest.raises(ValueError, match="flat: the image is constant"):
        register(flat, img2, transform="affine", progress=False)
    nan = torch.rand(16, 16)
    nan[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        register(nan, img2, transform="affine", progress=False)
    a = Image(torch.ones(1, 16, 16, dtype=torch.long), img2.grid, "labels_a")
    b = Image(2 * torch.ones(1, 16, 16, dtype=torch.long), img2.grid, "labels_b")
    with pytest.raises(ValueError, match="share no non-zero label"):
        register(img2, img2, transform="affine", labels=(a, b), progress=False)
    with pytest.raises(ValueError, match="loss must be one of"):
        register(img2, img2, loss="ssd", progress=False)


def test_cli_register_apply_and_errors(tmp_path, capsys):
    from stnreg.cli import main

    size = 48
    fixed_t = smooth_image((size, size), seed=7, dtype=torch.float32, sigma=2.0)[0]
    fixed = Image(fixed_t, Grid((size, size), (0.8, 0.8), (10.0, -5.0)), "f")
    shift = stnreg.Translation(2, params=torch.tensor([[2.0, 1.0]]))
    moving = stnreg.apply(shift.inverse(), fixed, fixed)
    labels = Image((fixed_t > 0.5).long(), fixed.grid)
    fp, mp = write_image(tmp_path / "fixed.nii.gz", fixed), write_image(tmp_path / "moving.nii.gz", moving)
    lp = write_image(tmp_path / "labels.nii.gz", labels)
    out = tmp_path / "out"
    assert main(["register", str(mp), str(fp), "-o", str(out), "--transform", "affine", "--loss", "ncc", "-q"]) == 0
    assert {p.name for p in out.iterdir()} >= {"warped.nii.gz", "affine.tfm", "report.json", "qc.png"}
    assert read_image(out / "warped.nii.gz").grid.same_geometry(fixed.grid)
    assert (
        main(
            [
                "apply",
                str(out),
                str(lp),
                "--reference",
                str(fp),
                "-o",
                str(tmp_path / "lab_w.nii.gz"),
                "--interpolation",
                "label",
            ]
        )
        == 0
    )
    warped = read_image(tmp_path / "lab_w.nii.gz", label=True)
    assert set(warped.data.unique().tolist()) <= {0, 1}
    # Errors: one line naming the file, exit code 2, nothing written.
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    out2 = tmp_path / "out2"
    capsys.readouterr()
    assert main(["register", str(bad), str(fp), "-o", str(out2), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.nii.gz" in err and len(err.splitlines()) == 1
    assert not out2.exists()
    vol = write_image(tmp_path / "vol.nii.gz", Image(torch.rand(1, 6, 6, 6), Grid((6, 6, 6))))
    assert main(["register", str(vol), str(fp), "-o", str(out2), "-q"]) == 2
    assert "dimension mismatch" in capsys.readouterr().err
    before = fp.read_bytes()
    assert main(["apply", str(out), str(mp), "--reference", str(fp), "-o", str(fp)]) == 2
    assert fp.read_bytes() == before


def test_saved_transforms_reproduce_with_ants(tmp_path):
    ants = pytest.importorskip("ants")
    moving, fixed, _ = _pair_3d((20, 22, 24))
    stages = [Stage("affine", shrink=(2,), iterations=(60,)), Stage("svf", shrink=(2, 1), iterations=(30, 20))]
    r = register(moving, fixed, transform=stages, loss="lncc", progress=False, device="cpu")
    files = r.save(tmp_path)
    mp = write_image(tmp_path / "moving.nii.gz", moving)
    report = json.loads(files["report"].read_text())
    chain = [str(tmp_path / f) for f in report["ants_transformlist"]]
    assert report["ants_transformlist"] == report["transform"][::-1]
    warped = ants.apply_transforms(
        ants.image_read(str(files["warped"])), ants.image_read(str(mp)), transformlist=chain, interpolator="linear"
    )
    theirs = warped.numpy().transpose(2, 1, 0)  # ANTs arrays are x, y, z
    rng = float(moving.data.max() - moving.data.min())
    # The same linear interpolation at the same points: 7e-9 of the range measured; the chain applied
    # in the reverse order is off by 1.5e-3, the affine alone by 4e-3.
    assert np.abs(theirs - r.warped.data[0].numpy()).mean() < 1e-4 * rng


@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 8)])
def test_world_moments_match_the_per_voxel_definition(shape):
    from stnreg.register.initialize import world_moments

    torch.manual_seed(0)
    d = len(shape)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    spacing = tuple(float(x) for x in torch.rand(d) + 0.5)
    grid = Grid(shape, spacing=spacing, origin=tuple(float(x) for x in torch.randn(d)), direction=q.tolist())
    img = torch.rand(1, 1, *shape)
    centre, cov = world_moments(img, grid)
    w = img[0, 0].double().flatten()
    pts = grid.points("world", torch.float64).reshape(-1, d)
    expected = (w[:, None] * pts).sum(0) / w.sum()
    rel = pts - expected
    torch.testing.assert_close(centre, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(cov, (rel * w[:, None]).T @ rel / w.sum(), rtol=0, atol=1e-12)


def test_tol_stops_an_adam_level_once_its_best_loss_stalls():
    from collections import Counter

    from stnreg.register.solvers import Adam

    patience = Adam(lr=1.0).patience

    grid = Grid((48, 48))
    fixed = Image(smooth_image((48, 48), seed=5, dtype=torch.float32)[0], grid)
    moving = Image(torch.roll(fixed.data, 2, -1), grid)
    stages = [Stage("affine", shrink=(2, 1), iterations=(60, 60), solver="adam")]
    every = register(moving, fixed, stages, loss="mse", progress=False, device="cpu", tol=0.0)
    assert Counter(h["level"] for h in every.history) == {2: 60, 1: 60}
    stopped = register(moving, fixed, stages, loss="mse", progress=False, device="cpu", tol=1e-3)
    per_level = Counter(h["level"] for h in stopped.history)
    assert min(per_level.values()) < 60, per_level
    for level, n in per_level.items():
        best = np.minimum.accumulate([h["loss"] for h in stopped.history if h["level"] == level])
        gains = (best[:-patience] - best[patience:]) / np.abs(best[patience:])
        if n < 60:
            # Stopped at the first iteration whose best loss gained less than tol over `patience` iterations.
            assert np.argmax(gains < 1e-3) + patience == n - 1
        else:
            assert (gains >= 1e-3).all()
    with pytest.raises(ValueError, match="tol"):
        register(moving, fixed, "affine", progress=False, tol=-1.0)


def test_bspline_stage_runs_on_the_fly_with_the_same_result(monkeypatch):
    from stnreg.fast import dispatch

    moving, fixed, _ = _pair_3d((20, 22, 24))
    stages = [Stage("affine", shrink=(1,), iterations=(30,), lr=0.01), Stage("bspline", shrink=(1,), iterations=(15,))]
    with dispatch.record() as events:
        dense = register(moving, fixed, transform=stages, loss="ncc", progress=False, device="cpu", tol=0)
    # These small lattices take the dense field while optimizing; only the final resampling (no
    # gradient: on the fly is faster at any size) goes through the kernel.
    assert events.count(("warp", "bspline", "")) == 1
    monkeypatch.setattr(dispatch, "BSPLINE_ON_THE_FLY_MIN", 0)
    with dispatch.record() as events:
        fly = register(moving, fixed, transform=stages, loss="ncc", progress=False, device="cpu", tol=0)
    assert events.count(("warp", "bspline", "")) >= 16  # every B-spline iteration and the final resampling
    assert fly.metrics["ncc_after"] == pytest.approx(dense.metrics["ncc_after"], abs=1e-5)
    assert fly.metrics["ncc_after"] > dense.metrics["ncc_before"]


def test_bspline_regularizer_sees_coefficients_in_control_spacings():
    from stnreg.register.parametrize import field_for_regularizer

    fields = []
    for mm in (1.0, 0.4):
        grid = Grid((40, 48, 56), spacing=(mm, mm, mm))
        spline = stnreg.BSpline.for_grid(grid, 8)  # 8 voxels: 8 mm, then 3.2 mm
        coef = torch.randn(1, *spline.param_shape, generator=torch.Generator().manual_seed(0)) * 8 * mm
        fields.append(field_for_regularizer(spline, coef))
    # The same deformation in voxels gives the same bending energy at any voxel size.
    torch.testing.assert_close(fields[0], fields[1], rtol=1e-5, atol=1e-6)
    assert bending_energy(fields[0]) > 0
