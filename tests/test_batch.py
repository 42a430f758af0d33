import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import smooth_image

import stnreg
from stnreg import Grid
from stnreg.batch import group_pairs, read_pairs, register_pairs
from stnreg.errors import InputError
from stnreg.image import Image
from stnreg.io import write_image
from stnreg.register import RegisterOptions, register_many

AFFINE = RegisterOptions(transform="affine", loss="ncc")


def _dataset(tmp_path, n=3, size=40, bad=()):
    """``n`` shifted copies of one image on one grid, then a pair on another grid; rows listed in
    ``bad`` (1-based, among the first ``n``) name a missing file, a non-image, or an image with NaN."""
    fixed = Image(smooth_image((size, size), seed=0, dtype=torch.float32)[0], Grid((size, size), (0.9, 0.9)), "f")
    fp = write_image(tmp_path / "fixed.nii.gz", fixed)
    (tmp_path / "text.nii.gz").write_text("not an image")
    nan = fixed.data.clone()
    nan[0, 3, 3] = float("nan")
    write_image(tmp_path / "nan.nii.gz", Image(nan, fixed.grid))
    kinds = ["missing.nii.gz", "text.nii.gz", "nan.nii.gz"]
    rows = []
    for k in range(n):
        shift = stnreg.Translation(2, params=torch.tensor([[1.0 + k % 3, -1.0 * (k % 2)]]))
        mp = write_image(tmp_path / f"m{k}.nii.gz", stnreg.apply(shift.inverse(), fixed, fixed, padding="border"))
        rows.append({"moving": mp.name, "fixed": fp.name})
    for j, row in enumerate(bad):
        rows[row - 1]["moving"] = kinds[j % 3]
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
    pairs, failures, infos = read_pairs(csv_path)
    assert not failures and [p.row for p in pairs] == [1, 2, 3, 4]
    assert group_pairs(pairs, infos, 4) == [[0, 1, 2], [3]]
    assert group_pairs(pairs, infos, 2) == [[0, 1], [2], [3]]
    many = register_many([p.moving for p in pairs[:3]], [p.fixed for p in pairs[:3]], "rigid", "ncc", progress=False)
    single = stnreg.register(pairs[1].moving, pairs[1].fixed, "rigid", "ncc", progress=False)
    p = torch.tensor([[[5.0, 7.0], [30.0, 20.0]]])
    assert (many[1].transform(p) - single.transform(p)).abs().max() < 0.05
    for k, r in enumerate(many):
        want = torch.tensor([1.0 + k, -1.0 * (k % 2)])
        assert (r.transform(p) - p - want).abs().max() < 0.25  # mm; voxels are 0.9 mm


def test_bad_rows_are_skipped_and_listed_with_two_processes(tmp_path):
    """A missing file and a non-image are caught before work; an image with NaN fails inside its batch,
    which is retried pair by pair: every good pair is written, in every process."""
    csv_path, _ = _dataset(tmp_path, n=5, bad=(2, 3, 4))
    out = tmp_path / "out"
    res = register_pairs(csv_path, out, AFFINE, devices=2, progress=False)
    assert [r["row"] for r in res.summary] == [1, 5, 6]
    assert all(r["ncc_after"] > 0.99 for r in res.summary)
    assert [f.row for f in res.failures] == [2, 3, 4]
    reasons = [f.reason for f in res.failures]
    assert "no such file" in reasons[0] and "cannot read as an image" in reasons[1] and "contains NaN" in reasons[2]
    with open(out / "failures.csv") as fh:
        assert [int(r["row"]) for r in csv.DictReader(fh)] == [2, 3, 4]
    assert (out / "0006_other" / "affine.tfm").exists() and not (out / "0004_nan").exists()


def test_output_folder_rules(tmp_path):
    csv_path, _ = _dataset(tmp_path, n=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty; give --overwrite"):
        register_pairs(csv_path, out, AFFINE, progress=False)
    assert not (out / "summary.csv").exists()
    res = register_pairs(csv_path, out, AFFINE, overwrite=True, progress=False)
    assert len(res.summary) == 3 and (out / "notes.txt").read_text() == "mine"
    assert oct((out / "0001_m0" / "affine.tfm").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    with pytest.raises(InputError, match="is a file"):
        register_pairs(csv_path, out / "notes.txt", AFFINE, progress=False)


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_pairs_file_errors(tmp_path):
    bad = tmp_path / "p.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="missing column"):
        read_pairs(bad)
    bad.write_text("moving,fixed\n")
    with pytest.raises(InputError, match="no pairs listed"):
        read_pairs(bad)
    with pytest.raises(InputError, match="no such pairs file"):
        read_pairs(tmp_path / "none.csv")


def _cli(*args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "stnreg.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_cli_batch_of_20_with_3_bad_rows_killed_and_resumed(tmp_path):
    """The issue's case: 20 rows, 3 bad. Killed halfway, a rerun with --resume keeps the finished pairs
    (their files untouched) and registers the rest; the exit status says rows failed."""
    csv_path, _ = _dataset(tmp_path, n=19, bad=(4, 10, 16))
    args = ["register", "--pairs", str(csv_path), "-o", "out", "-q", "--transform", "affine", "--batch-size", "2"]
    proc = _cli(*args, cwd=tmp_path)
    deadline = time.time() + 300
    while len(list((tmp_path / "out").glob("*/report.json"))) < 4 and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/report.json")}
    assert 4 <= len(finished) < 17
    again = _cli(*args, cwd=tmp_path)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 2 and "not empty" in err  # a rerun must say --resume or --overwrite
    again = _cli(*args, "--resume", cwd=tmp_path)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 1, err
    assert f"kept {len(finished)} finished earlier" in out and "3 row(s) failed" in out
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert len(list((tmp_path / "out").glob("*/report.json"))) == 17
    with open(tmp_path / "out" / "failures.csv") as fh:
        assert [int(r["row"]) for r in csv.DictReader(fh)] == [4, 10, 16]
    with open(tmp_path / "out" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 17 and np.mean([float(r["ncc_after"]) for r in rows]) > 0.99


def test_cli_pairs_default_batch_size_through_a_smoothed_field_stage(tmp_path):
    """The README's batch example: several pairs on one grid at the default --batch-size, default pipeline
    (its SVF stage smooths a batch of fields with one sigma), each pair written and recovered; every
    register option reaches the pairs (here --tol and --window)."""
    from stnreg.cli import build_parser, main

    csv_path, _ = _dataset(tmp_path)
    assert build_parser().parse_args(["register", "--pairs", "x", "-o", "y"]).batch_size > 1
    out = tmp_path / "out"
    assert main(["register", "--pairs", str(csv_path), "-o", str(out), "-q", "--tol", "0.002", "--window", "7"]) == 0
    with open(out / "summary.csv") as fh:
        summary = list(csv.DictReader(fh))
    assert [int(r["row"]) for r in summary] == [1, 2, 3, 4]
    assert all(float(r["ncc_after"]) > 0.98 for r in summary)
    import json

    settings = json.loads((out / "0002_m1" / "report.json").read_text())["settings"]
    assert settings["window"] == 7 and all(s["tol"] == 0.002 for s in settings["stages"])
