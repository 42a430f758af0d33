import csv

import pytest
import torch
from helpers import smooth_image

import stnreg
from stnreg import Grid
from stnreg.batch import group_pairs, read_pairs, register_pairs
from stnreg.image import Image
from stnreg.io import write_image
from stnreg.register import register_many


def _dataset(tmp_path, n=3, size=40):
    fixed = Image(smooth_image((size, size), seed=0, dtype=torch.float32)[0], Grid((size, size), (0.9, 0.9)), "f")
    fp = write_image(tmp_path / "fixed.nii.gz", fixed)
    rows = []
    for k in range(n):
        shift = stnreg.Translation(2, params=torch.tensor([[1.0 + k, -1.0 * k]]))
        mp = write_image(tmp_path / f"m{k}.nii.gz", stnreg.apply(shift.inverse(), fixed, fixed, padding="border"))
        rows.append({"moving": mp.name, "fixed": fp.name})
    other = Image(smooth_image((32, 36), seed=1, dtype=torch.float32)[0], Grid((32, 36)), "o")
    op = write_image(tmp_path / "other.nii.gz", other)
    rows.append({"moving": op.name, "fixed": op.name})
    with open(tmp_path / "pairs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["moving", "fixed"])
        w.writeheader()
        w.writerows(rows)
    return tmp_path / "pairs.csv", fixed


def test_batched_equals_single(tmp_path):
    csv_path, _ = _dataset(tmp_path)
    rows = read_pairs(csv_path)
    assert group_pairs(rows, 4) == [[0, 1, 2], [3]]
    assert group_pairs(rows, 2) == [[0, 1], [2], [3]]
    many = register_many(
        [r["moving"] for r in rows[:3]], [r["fixed"] for r in rows[:3]], "rigid", "ncc", progress=False
    )
    single = stnreg.register(rows[1]["moving"], rows[1]["fixed"], "rigid", "ncc", progress=False)
    p = torch.tensor([[[5.0, 7.0], [30.0, 20.0]]])
    assert (many[1].transform(p) - single.transform(p)).abs().max() < 0.05
    for k, r in enumerate(many):
        want = torch.tensor([1.0 + k, -1.0 * k])
        assert (r.transform(p) - p - want).abs().max() < 0.25  # mm; voxels are 0.9 mm


def test_register_pairs_two_processes(tmp_path):
    csv_path, _ = _dataset(tmp_path)
    out = tmp_path / "out"
    summary = register_pairs(csv_path, out, devices=2, transform="affine", loss="ncc")
    assert [r["row"] for r in summary] == [0, 1, 2, 3]
    assert all(r["ncc_after"] > 0.99 for r in summary)
    assert (out / "summary.csv").exists() and (out / "0003_other" / "affine.tfm").exists()


def test_pairs_file_errors(tmp_path):
    bad = tmp_path / "p.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing column"):
        read_pairs(bad)
    bad.write_text("moving,fixed\nnope.nii.gz,nope.nii.gz\n")
    with pytest.raises(ValueError, match="row 1: moving file .* does not exist"):
        read_pairs(bad)


def test_cli_pairs_default_batch_size_through_a_smoothed_field_stage(tmp_path):
    """The README's batch example: several pairs on one grid at the default --batch-size, default pipeline
    (its SVF stage smooths a batch of fields with one sigma), each pair written and recovered."""
    from stnreg.cli import build_parser, main

    csv_path, _ = _dataset(tmp_path)
    assert build_parser().parse_args(["register", "--pairs", "x", "-o", "y"]).batch_size > 1
    out = tmp_path / "out"
    assert main(["register", "--pairs", str(csv_path), "-o", str(out), "-q"]) == 0
    with open(out / "summary.csv") as fh:
        summary = list(csv.DictReader(fh))
    assert [int(r["row"]) for r in summary] == [0, 1, 2, 3]
    assert all(float(r["ncc_after"]) > 0.98 for r in summary)
    assert all((out / name / "deformable.nii.gz").exists() for name in ("0000_m0", "0001_m1", "0002_m2"))
