"""Command-line input errors: one line naming the file and the problem, exit status 2, nothing written."""

import inspect
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import smooth_image

import stnreg
from stnreg import Grid
from stnreg.cli import build_parser, main
from stnreg.image import Image
from stnreg.io import read_image, write_image
from stnreg.register import DEFAULTS, RegisterOptions, register, register_many


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    img = Image(smooth_image((24, 26, 22), seed=2, dtype=torch.float32)[0], Grid((24, 26, 22), (1.0, 1.1, 0.9)), "f")
    paths = {"fixed": write_image(d / "fixed.nii.gz", img)}
    paths["moving"] = write_image(d / "moving.nii.gz", stnreg.apply(stnreg.Translation(3), img, img))
    nib.save(nib.Nifti1Image(np.random.rand(12, 14, 13, 3, 2).astype(np.float32), np.eye(4)), str(d / "five.nii.gz"))
    paths["five"] = d / "five.nii.gz"
    labels = np.random.default_rng(0).integers(0, 3, (22, 26, 24, 3)).astype(np.int16)  # x, y, z, channel
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(d / "labels4d.nii.gz"))
    paths["labels4d"] = d / "labels4d.nii.gz"
    paths["text"] = d / "text.nii.gz"
    paths["text"].write_text("not an image")
    paths["dir"] = d
    return paths


def _run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err.strip()


def _errors(tmp_path, files):
    cuda = [] if torch.cuda.is_available() else [("register-cuda", "CUDA is not available")]
    return [
        ("5d", ["register", files["five"], files["fixed"], "-o", tmp_path / "o"], "five.nii.gz: a 5D image"),
        (
            "transform",
            ["apply", files["text"], files["moving"], "--reference", files["fixed"], "-o", tmp_path / "a.nii.gz"],
            "text.nii.gz: cannot read as a transform",
        ),
        ("out-file", ["register", files["moving"], files["fixed"], "-o", files["text"]], "is a file"),
        ("pairs-labels", ["register", "--pairs", files["text"], "-o", tmp_path / "o", "--labels", "a", "b"], "CSV"),
        ("resume-single", ["register", files["moving"], files["fixed"], "-o", tmp_path / "o", "--resume"], "--pairs"),
        ("pairs-missing", ["register", "--pairs", tmp_path / "none.csv", "-o", tmp_path / "o"], "no such pairs file"),
        *[
            (name, ["register", files["moving"], files["fixed"], "-o", tmp_path / "o", "--device", "cuda"], msg)
            for name, msg in cuda
        ],
        (
            "device-name",
            ["register", files["moving"], files["fixed"], "-o", tmp_path / "o", "--device", "tpu"],
            "not a device name",
        ),
        ("demo-file", ["demo", "-o", files["text"]], "is a file"),
    ]


def test_bad_input_table(tmp_path, files, capsys):
    for name, argv, message in _errors(tmp_path, files):
        code, err = _run(capsys, *argv)
        assert code == 2, name
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert not (tmp_path / "o").exists() and not (tmp_path / "a.nii.gz").exists(), name


def test_non_empty_output_folder_needs_overwrite_and_files_get_normal_permissions(tmp_path, files, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["register", files["moving"], files["fixed"], "-o", out, "--transform", "translation", "-q", "--no-qc"]
    code, err = _run(capsys, *argv)
    assert code == 2 and "not empty; give --overwrite" in err and sorted(os.listdir(out)) == ["notes.txt"]
    assert _run(capsys, *argv, "--overwrite")[0] == 0
    assert (out / "notes.txt").read_text() == "mine" and not (out / "qc.png").exists()
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("warped.nii.gz", "affine.tfm", "report.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    # apply refuses an existing output file unless told, and keeps a 4D label file's layout.
    target = tmp_path / "lab.nii.gz"
    target.write_text("keep")
    app = ["apply", out, files["labels4d"], "--reference", files["fixed"], "-o", target, "--interpolation", "label"]
    code, err = _run(capsys, *app)
    assert code == 2 and "exists; give --overwrite" in err and target.read_text() == "keep"
    assert _run(capsys, *app, "--overwrite")[0] == 0
    assert nib.load(str(target)).shape == (22, 26, 24, 3)
    assert read_image(target, label=True).data.shape == (3, 24, 26, 22)


def test_fit_with_missing_data_is_one_line(tmp_path):
    # A process of its own: Lightning attaches log handlers to the stderr it finds.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stnreg.cli",
            "fit",
            "--config",
            "configs/oasis2d_svf.yaml",
            "--data.init_args.train",
            str(tmp_path / "nowhere.npy"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            "false",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    # Lightning's own notices come first; the error is one line and no traceback.
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("stnreg fit: error:") and "nowhere.npy: not found" in last
    assert "Traceback" not in proc.stderr


def test_one_set_of_defaults_for_api_cli_and_batch():
    """register(), register_many() and every CLI flag take RegisterOptions' defaults, and --help shows them."""
    defaults = RegisterOptions()
    args = build_parser().parse_args(["register", "a", "b", "-o", "c"])
    assert RegisterOptions.from_namespace(args) == defaults
    for fn in (register, register_many):
        params = inspect.signature(fn).parameters
        for f in fields(RegisterOptions):
            if fn is register and f.name not in params:
                continue  # passed on to register_many through **kwargs
            assert params[f.name].default == getattr(defaults, f.name), (fn.__name__, f.name)
    sub = build_parser()._subparsers._group_actions[0].choices["register"]
    text = sub.format_help()
    for f in fields(RegisterOptions):
        assert "--" + f.name.replace("_", "-") in text
    for family in DEFAULTS:
        assert f"  {family} " in text
    flat = " ".join(text.split())
    assert "(default: rigid+affine+svf)" in flat and "(default: 9)" in flat
