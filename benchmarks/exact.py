"""Exact-recovery benchmark: known transforms of real images, recovered by stnreg, ANTs, SimpleITK and elastix.

Each case takes a real image (``--data``, default ``../shared/data``) on a grid with rotated
direction cosines and anisotropic spacing: the moving image. The fixed image is the moving image
resampled with SimpleITK through a known transform ``S`` (cubic B-spline interpolation, zero
outside), on the moving image's grid: ``fixed(x) = moving(S(x))``, so the exact answer of a
registration (a map from fixed world points to moving world points) is ``S``. Integer pixel shifts
resample exactly. Cases (``--cases``, comma-separated names):

* ``2d-shift-13x17``: 2D brain slice (``slices2d/r16slice.jpg``, spacing 0.9 x 1.1 mm, direction
  rotated 30 degrees), shifted by exactly 13 x 17 pixels; translation and rigid methods.
* ``2d-subpixel``: the same slice shifted by (3.37, -2.81) pixels; translation.
* ``2d-rotation``: 7 degrees about a point off the image centre plus a (2.6, -4.3) pixel shift; rigid.
* ``3d-subpixel-prostate``: a prostate MR (``prostate/unpaired/train/images/case000000``, pairs of
  slices averaged: 0.4 x 0.4 x 0.8 mm, direction rotated 25 degrees about an oblique axis) shifted
  by (2.37, -1.62, 1.41) voxels; translation.
* ``3d-rigid-brain``: the VoxelMorph test scan block-averaged to 3 x 2 x 2 mm (74 x 96 x 80
  voxels, LIA axes turned 20 degrees about an oblique axis; see ``baselines.TEST_SCAN_DIRECTION``),
  rotated by (4, -3, 6) degrees about an off-centre point and shifted; rigid.
* ``3d-affine-brain`` and ``3d-affine-prostate``: a few percent of scaling and shear, a small
  rotation and a shift; affine.

Error: the distance between the recovered map ``T(x)`` and the true ``S(x)`` over the fixed
image's foreground voxels (intensity above 10% of its 99th percentile), mean and max, in mm and
in voxels (the error vector expressed in the fixed grid's index units).

Methods, per transform family: stnreg (``stnreg.register(paths, transform=family, loss="ncc")`` and
with its default loss, then ``result.save(qc=False)``: transforms, warped image, report), ANTs
(``ants.registration(type_of_transform="Translation" / "Rigid" / "Affine")``, antspyx defaults
otherwise), SimpleITK (regular-step gradient descent on Mattes MI, physical-shift scales, moments
initialization, 3 levels) and elastix (itk-elastix's default translation / rigid / affine parameter
map, initialized at the centres of gravity). Every method runs each case once per seed (``--seeds``,
default 3: seeds 1, 2, 3) in its own worker process (``benchmarks/baselines.py``: one thread,
untimed warm-up, wall clock from reading the input files to the written transform files); errors and
seconds are reported as the mean over seeds with [min, max], and seconds also as a ratio to ANTs'
mean on the same case.

    python benchmarks/exact.py [--cases 2d-shift-13x17,3d-rigid-brain] [--seeds 3] [--quick]

Writes ``benchmarks/results/exact.md`` and ``.json`` (``--out`` changes the name).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from baselines import Workers, job_name, sitk_displacement, source_state, test_scan_images
from tqdm import tqdm

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(os.environ.get("STNREG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
QUICK_CASES = ("2d-shift-13x17", "2d-rotation", "3d-subpixel-prostate")


def rotation(axis: tuple[float, ...], degrees: float) -> np.ndarray:
    """A 3x3 rotation about ``axis`` (Rodrigues), or a 2x2 one when ``axis`` is empty."""
    a = math.radians(degrees)
    if not axis:
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(a) * kx + (1 - math.cos(a)) * kx @ kx


def _slice2d(data: Path) -> sitk.Image:
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "slices2d" / "r16slice.jpg"))).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.9, 1.1))
    img.SetDirection(rotation((), 30.0).ravel().tolist())
    img.SetOrigin((-61.0, -140.0))
    return img


def _prostate(data: Path) -> sitk.Image:
    src = sitk.ReadImage(str(data / "prostate" / "unpaired" / "train" / "images" / "case000000.nii.gz"))
    arr = sitk.GetArrayFromImage(src).astype(np.float32)  # (z, y, x)
    arr = arr[: arr.shape[0] // 2 * 2].reshape(arr.shape[0] // 2, 2, *arr.shape[1:]).mean(1)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((src.GetSpacing()[0], src.GetSpacing()[1], 2 * src.GetSpacing()[2]))
    direction = rotation((1.0, 2.0, 0.5), 25.0) @ np.asarray(src.GetDirection()).reshape(3, 3)
    img.SetDirection(direction.ravel().tolist())
    img.SetOrigin(src.GetOrigin())
    return img


def _brain(data: Path) -> sitk.Image:
    return test_scan_images(data, factors=(2, 2, 3), rotation=rotation((0.3, -1.0, 0.6), 20.0))[0]


def _index_vector(img: sitk.Image, voxels: tuple[float, ...]) -> list[float]:
    """The world (mm) vector of a step of ``voxels`` along the image's index axes."""
    d = np.asarray(img.GetDirection()).reshape(img.GetDimension(), img.GetDimension())
    return (d @ (np.asarray(img.GetSpacing()) * np.asarray(voxels))).tolist()


def _off_centre(img: sitk.Image, fraction: tuple[float, ...]) -> tuple[float, ...]:
    """The world point at ``fraction`` of the image's extent along each index axis."""
    return img.TransformContinuousIndexToPhysicalPoint(
        [f * (n - 1) for f, n in zip(fraction, img.GetSize(), strict=True)]
    )


def _affine(img: sitk.Image, matrix: np.ndarray, centre: tuple[float, ...], shift_vox: tuple[float, ...]):
    return sitk.AffineTransform(matrix.ravel().tolist(), _index_vector(img, shift_vox), centre)


def _shear_scale(scale: tuple[float, float, float], shear: float) -> np.ndarray:
    m = np.diag(scale)
    m[0, 1], m[1, 2] = shear, -shear / 2
    return m


# name -> (families, base image, transform builder (base image -> S))
CASES: dict[str, tuple[tuple[str, ...], Callable[[Path], sitk.Image], Callable[[sitk.Image], sitk.Transform]]] = {
    "2d-shift-13x17": (
        ("translation", "rigid"),
        _slice2d,
        lambda img: sitk.TranslationTransform(2, _index_vector(img, (13, 17))),
    ),
    "2d-subpixel": (
        ("translation",),
        _slice2d,
        lambda img: sitk.TranslationTransform(2, _index_vector(img, (3.37, -2.81))),
    ),
    "2d-rotation": (
        ("rigid",),
        _slice2d,
        lambda img: sitk.Euler2DTransform(
            _off_centre(img, (0.35, 0.65)), math.radians(7.0), _index_vector(img, (2.6, -4.3))
        ),
    ),
    "3d-subpixel-prostate": (
        ("translation",),
        _prostate,
        lambda img: sitk.TranslationTransform(3, _index_vector(img, (2.37, -1.62, 1.41))),
    ),
    "3d-rigid-brain": (
        ("rigid",),
        _brain,
        lambda img: sitk.Euler3DTransform(
            _off_centre(img, (0.4, 0.6, 0.45)),
            math.radians(4.0),
            math.radians(-3.0),
            math.radians(6.0),
            _index_vector(img, (1.3, -2.2, 0.8)),
        ),
    ),
    "3d-affine-brain": (
        ("affine",),
        _brain,
        lambda img: _affine(
            img,
            rotation((1.0, 0.2, -0.4), 3.0) @ _shear_scale((1.04, 0.97, 1.02), 0.03),
            _off_centre(img, (0.55, 0.45, 0.4)),
            (0.9, 1.7, -1.2),
        ),
    ),
    "3d-affine-prostate": (
        ("affine",),
        _prostate,
        lambda img: _affine(
            img,
            rotation((-0.5, 1.0, 0.3), 4.0) @ _shear_scale((0.96, 1.03, 1.05), -0.04),
            _off_centre(img, (0.45, 0.55, 0.5)),
            (-2.1, 1.4, 0.6),
        ),
    ),
}


def make_case(name: str, data: Path, folder: Path) -> dict[str, Any]:
    """Write the case's moving and fixed images (.mha keeps 2D directions exactly); return its truth and mask."""
    families, base, build = CASES[name]
    moving = base(data)
    truth = build(moving)
    fixed = sitk.Resample(moving, moving, truth, sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    paths = {k: str(folder / f"{name}-{k}.mha") for k in ("moving", "fixed")}
    sitk.WriteImage(moving, paths["moving"])
    sitk.WriteImage(fixed, paths["fixed"])
    arr = sitk.GetArrayFromImage(fixed)
    return {
        "case": name,
        "families": families,
        **paths,
        "size": list(fixed.GetSize()),
        "spacing": list(fixed.GetSpacing()),
        "true_disp": sitk_displacement(truth, fixed),
        "mask": arr > 0.1 * np.percentile(arr, 99),
        # index units per world mm: diag(1/spacing) D^T (D orthonormal)
        "to_index": np.diag(1 / np.asarray(fixed.GetSpacing()))
        @ np.asarray(fixed.GetDirection()).reshape(fixed.GetDimension(), -1).T,
    }


def errors(case: dict[str, Any], disp: np.ndarray) -> dict[str, float]:
    """Mean and max distance (mm and voxels) between the recovered and the true map over the foreground."""
    diff = (disp.astype(np.float64) - case["true_disp"])[:, case["mask"]]  # (d, n)
    mm = np.linalg.norm(diff, axis=0)
    vox = np.linalg.norm(case["to_index"] @ diff, axis=0)
    return {"err_mm": float(mm.mean()), "max_mm": float(mm.max()), "err_vox": float(vox.mean())}


def methods(family: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, library, settings) of every method for one transform family."""
    return [
        (f"stnreg {family} ncc", "stnreg", {"transform": family, "loss": "ncc", "qc": False}),
        (f"stnreg {family} default loss", "stnreg", {"transform": family, "qc": False}),
        (f"ANTs {family.capitalize()}", "ants", {"type": family.capitalize()}),
        (f"SimpleITK RSGD {family}", "sitk", {"transform": family}),
        (f"elastix {family}", "elastix", {"maps": [family]}),
    ]


def _span(values: list[float], digits: int) -> str:
    if not values:
        return ""
    if len(values) == 1 or max(values) - min(values) < 0.5 * 10**-digits:
        return f"{np.mean(values):.{digits}f}"
    return f"{np.mean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (case, family, method): values over seeds, and seconds relative to ANTs."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["family"], r["method"]), []).append(r)
    out = []
    for (case, family, method), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        entry: dict[str, Any] = {"case": case, "family": family, "method": method, "runs": len(rs), "ok": len(ok)}
        for key in ("err_mm", "max_mm", "err_vox", "seconds"):
            entry[key] = [r[key] for r in ok]
        entry["failures"] = sorted({r["error"] for r in rs if "error" in r})
        out.append(entry)
    for e in out:
        ants = next(
            (
                a
                for a in out
                if a["case"] == e["case"] and a["family"] == e["family"] and a["method"].startswith("ANTs")
            ),
            None,
        )
        e["ratio_to_ants"] = (
            float(np.mean(e["seconds"]) / np.mean(ants["seconds"]))
            if ants and ants["seconds"] and e["seconds"]
            else None
        )
    return out


def markdown(summary: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "| case | method | error mm, mean [min, max] over seeds | max error mm | error voxels | seconds"
        " | seconds / ANTs |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for e in summary:
        if not e["ok"]:
            lines.append(f"| {e['case']} | {e['method']} | failed: {'; '.join(e['failures'])[:120]} | | | | |")
            continue
        ratio = "" if e["ratio_to_ants"] is None else f"{e['ratio_to_ants']:.2f}"
        failed = f" ({e['runs'] - e['ok']} of {e['runs']} failed)" if e["ok"] < e["runs"] else ""
        lines.append(
            f"| {e['case']} | {e['method']} | {_span(e['err_mm'], 3)}{failed} | {_span(e['max_mm'], 3)} | "
            f"{_span(e['err_vox'], 3)} | {_span(e['seconds'], 2)} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cases", default=None, help=f"comma-separated subset of {', '.join(CASES)} (default: all)")
    ap.add_argument("--seeds", type=int, default=3, help="runs per method and case, seeds 1..N")
    ap.add_argument(
        "--quick", action="store_true", help=f"smoke run: one seed; cases {', '.join(QUICK_CASES)} unless --cases"
    )
    ap.add_argument("--out", default=None, help="results name (default exact, or exact-quick with --quick)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds before a run counts as failed")
    args = ap.parse_args()
    default = QUICK_CASES if args.quick else CASES
    names = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else list(default)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    seeds = [1] if args.quick else list(range(1, args.seeds + 1))
    out_name = args.out or ("exact-quick" if args.quick else "exact")
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmpd, Workers(Path(tmpd)) as workers:
        tmp = Path(tmpd)
        cases = [make_case(n, args.data, tmp) for n in names]
        plan = [(c, f, m) for c in cases for f in c["families"] for m in methods(f)]
        bar = tqdm(total=len(plan) * len(seeds) + len(cases), desc="exact", unit="run")
        for case in cases:
            ident = errors(case, np.zeros_like(case["true_disp"]))
            rows.append(
                {"case": case["case"], "family": "-", "method": "(identity)", "seed": 0, "seconds": 0.0, **ident}
            )
            bar.update(1)
        for case, family, (label, library, settings) in plan:
            for seed in seeds:
                job_id = job_name(case["case"], label, seed)
                job = {
                    "id": job_id,
                    "moving": case["moving"],
                    "fixed": case["fixed"],
                    "seed": seed,
                    "settings": settings,
                    "out": str(tmp / "out" / job_id),
                    "disp": str(tmp / f"{job_id}.npy"),
                }
                res = workers.run(library, job, args.timeout)
                row = {"case": case["case"], "family": family, "method": label, "library": library, "seed": seed}
                row.update({k: v for k, v in res.items() if k != "id"})
                if "error" not in res:
                    row.update(errors(case, np.load(job["disp"])))
                    Path(job["disp"]).unlink()
                rows.append(row)
                bar.set_postfix_str(f"{case['case']} {label}: {row.get('err_mm', row.get('error'))}")
                bar.update(1)
                (RESULTS / f"{out_name}.partial.json").write_text(json.dumps(rows, indent=1))
        bar.close()
    summary = summarize(rows)
    header = (
        "# Exact recovery of known transforms (CPU, one thread per method)\n\n"
        f"`python benchmarks/exact.py{' --quick' if args.quick else ''}`; seeds {seeds}; "
        f"{time.time() - started:.0f} s in all; stnreg at {source_state()}. Error: distance between "
        "the recovered and the true map over the fixed image's foreground (mean over voxels, then "
        "mean [min, max] over seeds); "
        "max error: the largest over voxels; seconds: wall clock from reading the files to the "
        "written transform, mean [min, max] over seeds, and the ratio of the means to ANTs on the "
        "same case. See `benchmarks/README.md`.\n\n"
    )
    text = markdown(summary, header)
    (RESULTS / f"{out_name}.md").write_text(text)
    (RESULTS / f"{out_name}.json").write_text(json.dumps({"runs": rows, "summary": summary}, indent=1))
    (RESULTS / f"{out_name}.partial.json").unlink(missing_ok=True)
    print(text)


if __name__ == "__main__":
    main()
