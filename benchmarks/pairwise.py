"""Pairwise registration benchmark: stnreg against ANTsPy and SimpleITK on real pairs, in the same run.

Cases (from ``--data``, default ``../shared/data``):

* ``slices2d``: ANTs' classic 2D example r64 -> r16 (no labels: NCC after registration).
* ``prostate``: inter-subject MR pairs (``prostate/unpaired``), gland Dice and HD95.
* ``mrus``: MR -> transrectal ultrasound pairs on different grids (``prostate/paired/test``),
  mutual information; gland Dice and the distance between landmark centroids in mm.
* ``brain``: the VoxelMorph test scan warped by known smooth diffeomorphisms; Dice over its 30
  structures and the error of the recovered displacement in mm.

Every method's result becomes a displacement field on the fixed grid (ANTs and SimpleITK
transforms through ``sitk.TransformToDisplacementField``), and one code path measures Dice, HD95,
% folded voxels (``det J <= 0``, central differences) and landmark errors for all of them. Labels
move with stnreg's label interpolation for every method. Runtime is wall time of the
registration call; peak memory is the growth of the process's peak RSS during that call. All
methods run on the same number of threads (``--threads``, default 1).

    python benchmarks/pairwise.py [--cases slices2d,prostate,mrus,brain] [--pairs 4] [--quick] [--threads 1]

Writes ``benchmarks/results/pairwise.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib

import numpy as np
import SimpleITK as sitk
import torch

import stnreg
from stnreg.image import Image
from stnreg.metrics import centroid_distance, dice, hd95, jacobian_stats
from stnreg.sampler import gaussian_blur
from stnreg.transforms import Displacement, StationaryVelocity

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(os.environ.get("STNREG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measured(fn: Callable[[], object]) -> tuple[object, float, float]:
    """Run ``fn``; return (result, seconds, peak RSS growth in MiB)."""
    base = _status_kib("VmRSS")
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    return out, seconds, max(0.0, (_status_kib("VmHWM") - base) / 1024)


# ----------------------------------------------------------------------------- methods
# Each method maps (moving path, fixed path, case options) to a displacement field (d, *fixed) in mm.


def _field_from_sitk(transform: sitk.Transform, fixed: sitk.Image) -> torch.Tensor:
    f = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection()
    )
    return torch.from_numpy(np.moveaxis(sitk.GetArrayFromImage(f), -1, 0).copy()).float()


def stnreg_method(transform: str, **kw) -> Callable:
    def run(moving: str, fixed: str, opts: dict) -> torch.Tensor:
        loss = opts.get("loss", "lncc")
        r = stnreg.register(moving, fixed, transform=transform, loss=loss, progress=False, device="cpu", **kw)
        return r.displacement()

    return run


def ants_method(kind: str) -> Callable:
    def run(moving: str, fixed: str, opts: dict) -> torch.Tensor:
        import ants

        f, m = ants.image_read(fixed), ants.image_read(moving)
        # antspyx defaults (Mattes MI for the affine and the SyN stages), as most published comparisons use.
        out = ants.registration(f, m, type_of_transform=kind)
        composite = sitk.CompositeTransform(f.dimension)
        # ANTs lists transforms in the reverse of ITK's CompositeTransform order (checked in
        # tests/test_register.py against ants.apply_transforms): add them last first.
        for path in reversed(out["fwdtransforms"]):
            if path.endswith(".mat"):
                composite.AddTransform(sitk.ReadTransform(path))
            else:
                composite.AddTransform(
                    sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(path), sitk.sitkVectorFloat64))
                )
        return _field_from_sitk(composite, sitk.ReadImage(fixed))

    return run


def sitk_method(bspline: bool) -> Callable:
    def run(moving: str, fixed: str, opts: dict) -> torch.Tensor:
        f = sitk.Cast(sitk.ReadImage(fixed), sitk.sitkFloat32)
        m = sitk.Cast(sitk.ReadImage(moving), sitk.sitkFloat32)
        if f.GetNumberOfComponentsPerPixel() > 1:
            f, m = (sitk.VectorIndexSelectionCast(x, 0) for x in (f, m))
        init = sitk.CenteredTransformInitializer(
            f, m, sitk.AffineTransform(f.GetDimension()), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.2, seed=1)  # seed 0 is sitkWallClock: a new sample every run
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2, 1, 0])
        reg.SetInitialTransform(init, inPlace=False)
        affine = reg.Execute(f, m)
        total: sitk.Transform = affine
        if bspline:
            mesh = [max(1, int(s * sp / 20.0)) for s, sp in zip(f.GetSize(), f.GetSpacing(), strict=True)]
            bsp = sitk.BSplineTransformInitializer(f, mesh)
            reg2 = sitk.ImageRegistrationMethod()
            if opts.get("loss") == "mi":
                reg2.SetMetricAsMattesMutualInformation(32)
            else:
                reg2.SetMetricAsANTSNeighborhoodCorrelation(2)
            reg2.SetMetricSamplingStrategy(reg2.RANDOM)
            reg2.SetMetricSamplingPercentage(0.2, seed=1)
            reg2.SetInterpolator(sitk.sitkLinear)
            reg2.SetOptimizerAsLBFGSB(1e-5, 100)
            reg2.SetShrinkFactorsPerLevel([2, 1])
            reg2.SetSmoothingSigmasPerLevel([1, 0])
            reg2.SetMovingInitialTransform(affine)
            reg2.SetInitialTransform(bsp, inPlace=True)
            reg2.Execute(f, m)
            composite = sitk.CompositeTransform(f.GetDimension())
            composite.AddTransform(affine)
            composite.AddTransform(bsp)
            total = composite
        return _field_from_sitk(total, f)

    return run


def methods(quick: bool) -> dict[str, Callable]:
    out = {
        "stnreg affine": stnreg_method("rigid+affine"),
        "stnreg affine+svf": stnreg_method("rigid+affine+svf"),
        "stnreg affine+bspline": stnreg_method("rigid+affine+bspline"),
        "SimpleITK affine": sitk_method(False),
        "SimpleITK affine+bspline": sitk_method(True),
    }
    try:
        import ants  # noqa: F401

        out["ANTs Affine"] = ants_method("Affine")
        out["ANTs SyN"] = ants_method("SyN")
    except ImportError:
        print("antspyx is not installed: ANTs rows skipped (pip install antspyx)", file=sys.stderr)
    if quick:
        out = {k: v for k, v in out.items() if k != "SimpleITK affine+bspline"}
    return out


# ----------------------------------------------------------------------------- cases


def _first(img: Image, channel: int = 0) -> Image:
    return Image(img.data[channel : channel + 1], img.grid, img.name)


def case_slices(data: Path, tmp: Path, n: int) -> list[dict]:
    d = data / "slices2d"
    return [{"case": "slices2d r64->r16", "moving": str(d / "r64slice.jpg"), "fixed": str(d / "r16slice.jpg")}]


def _label_of(image: Path) -> str:
    stem = image.name.split(".")[0]
    return str(next((image.parent.parent / "labels").glob(stem + ".nii*")))


def case_prostate(data: Path, tmp: Path, n: int) -> list[dict]:
    root = data / "prostate" / "unpaired"
    imgs = sorted((root / "test" / "images").glob("*.nii*")) + sorted((root / "train" / "images").glob("*.nii*"))
    out = []
    for i in range(min(n, len(imgs) - 1)):
        m, f = imgs[i], imgs[i + 1]
        out.append(
            {
                "case": f"prostate {m.name.split('.')[0][-2:]}->{f.name.split('.')[0][-2:]}",
                "moving": str(m),
                "fixed": str(f),
                "moving_labels": _label_of(m),
                "fixed_labels": _label_of(f),
            }
        )
    return out


def case_mrus(data: Path, tmp: Path, n: int) -> list[dict]:
    root = data / "prostate" / "paired" / "test"
    out = []
    for f in sorted((root / "fixed_images").glob("*.nii*"))[:n]:
        out.append(
            {
                "case": f"MR->US {f.name.split('.')[0][-2:]}",
                "moving": str(root / "moving_images" / f.name),
                "fixed": str(f),
                "moving_labels": str(root / "moving_labels" / f.name),
                "fixed_labels": str(root / "fixed_labels" / f.name),
                "loss": "mi",
                "landmarks": True,
            }
        )
    return out


def case_brain(data: Path, tmp: Path, n: int) -> list[dict]:
    """The test scan warped by known smooth diffeomorphisms (peak velocity ~6 mm)."""
    scan = np.load(data / "brain3d" / "test_scan.npz")
    structures = [int(v) for v in np.load(data / "brain3d" / "labels.npz")["labels"]]
    vol = torch.from_numpy(scan["vol"].astype(np.float32))[None]
    seg = torch.from_numpy(scan["seg"].astype(np.int64))[None]
    grid = stnreg.Grid(tuple(vol.shape[1:]))
    fixed_p, fixed_l = tmp / "brain_fixed.nii.gz", tmp / "brain_fixed_seg.nii.gz"
    stnreg.write_image(fixed_p, Image(vol, grid))
    stnreg.write_image(fixed_l, Image(seg.int(), grid))
    out = []
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        coarse = grid.with_shape(tuple(s // 4 for s in grid.shape))
        v = gaussian_blur(torch.randn(1, 3, *coarse.shape, generator=g), torch.full((1, 3), 3.0))
        v = v * (6.0 / v.abs().max())
        truth = StationaryVelocity(coarse.shape, params=v, domain=coarse.world_to_normalized())
        # moving = fixed ∘ truth^-1, so registration should find truth.
        inv = truth.inverse()
        mov = stnreg.apply(inv, Image(vol, grid), grid)
        mov_l = stnreg.apply(inv, Image(seg, grid), grid, "label")
        mp, ml = tmp / f"brain_moving{k}.nii.gz", tmp / f"brain_moving{k}_seg.nii.gz"
        stnreg.write_image(mp, mov)
        stnreg.write_image(ml, Image(mov_l.data.int(), grid))
        with torch.no_grad():
            true_disp = torch.movedim(truth.mapped_lattice(grid)[0] - grid.points("world"), -1, 0)
        out.append(
            {
                "case": f"brain synthetic {k}",
                "moving": str(mp),
                "fixed": str(fixed_p),
                "moving_labels": str(ml),
                "fixed_labels": str(fixed_l),
                "labels": structures,
                "true_disp": true_disp,
            }
        )
    return out


CASES = {"slices2d": case_slices, "prostate": case_prostate, "mrus": case_mrus, "brain": case_brain}


# ----------------------------------------------------------------------------- scoring


def score(case: dict, disp: torch.Tensor) -> dict[str, float]:
    fixed = stnreg.read_image(case["fixed"])
    grid = fixed.grid
    t = Displacement(grid.shape, params=disp.unsqueeze(0), domain=grid.world_to_normalized())
    row: dict[str, float] = {}
    row.update({f"jac_{k}": v for k, v in jacobian_stats(disp, grid).items() if k in ("folding_percent", "sdlogj")})
    moving = stnreg.read_image(case["moving"])
    warped = stnreg.apply(t, moving, fixed)
    f = fixed.data.float().mean(0)
    w = warped.data.float().mean(0)
    valid = stnreg.apply(t, Image(torch.ones(1, *moving.grid.shape), moving.grid), fixed).data[0] > 0.999
    row["ncc"] = float(torch.corrcoef(torch.stack([f[valid], w[valid]]))[0, 1]) if valid.any() else float("nan")
    if "moving_labels" in case:
        ml = stnreg.read_image(case["moving_labels"], label=True)
        fl = stnreg.read_image(case["fixed_labels"], label=True)
        wl = stnreg.apply(t, _first(ml), fixed, "label").data[0]
        labels = case.get("labels") or [1]
        d = dice(wl, fl.data[0], labels)
        h = hd95(wl, fl.data[0], grid, labels)
        row["dice"] = float(np.nanmean(list(d.values())))
        row["hd95"] = float(np.nanmean(list(h.values())))
        if case.get("landmarks"):
            dists = []
            for ch in (1, 2):
                wlc = stnreg.apply(t, _first(ml, ch), fixed, "label").data[0]
                dists.append(centroid_distance(wlc, fl.data[ch], grid, [1])[1])
            row["landmark_mm"] = float(np.nanmean(dists))
    if "true_disp" in case:
        row["disp_err_mm"] = float((disp - case["true_disp"]).norm(dim=0).mean())
    return row


def before_row(case: dict) -> dict[str, float]:
    fixed = stnreg.read_image(case["fixed"])
    return score(case, torch.zeros(fixed.ndim, *fixed.grid.shape))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cases", default="slices2d,prostate,mrus,brain")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per case (brain: synthetic warps)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of method names")
    ap.add_argument("--quick", action="store_true", help="skip the slow SimpleITK B-spline baseline")
    ap.add_argument("--out", default="pairwise")
    ap.add_argument("--threads", type=int, default=1, help="threads for every method (torch/numba, ITK)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # ANTs is imported below (methods()) and reads this when it loads; SimpleITK is told directly.
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    # ANTs samples its MI at random, from the clock unless told: one pair's Affine Dice ranged from
    # 0.00 to 0.73 between runs. A fixed seed makes the baseline repeatable.
    os.environ.setdefault("ANTS_RANDOM_SEED", "1")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    table = methods(args.quick)
    if args.methods:
        keep = [m.strip() for m in args.methods.split(",")]
        table = {k: v for k, v in table.items() if k in keep}
    # One-time costs (kernel loading or, with a cold numba cache, compiling; allocator warm-up) are
    # nobody's registration time: a small 2D and 3D run through the paths the cases take.
    for shape in ((32, 32), (12, 14, 16)):
        warm = Image(torch.rand(1, *shape), stnreg.Grid(shape))
        for transform, loss in (("rigid+affine+svf", "lncc"), ("affine+bspline", "mi")):
            stnreg.register(warm, warm, transform, loss=loss, progress=False, device="cpu")
    rows = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmpd:
        for name in args.cases.split(","):
            for case in CASES[name](args.data, Path(tmpd), 1 if name == "slices2d" else args.pairs):
                before = before_row(case)
                rows.append({"case": case["case"], "method": "(before)", "seconds": 0.0, "peak_mib": 0.0, **before})
                print(f"{case['case']:24} {'(before)':26} {before}", flush=True)
                for mname, fn in table.items():
                    try:
                        disp, secs, mem = measured(lambda fn=fn, case=case: fn(case["moving"], case["fixed"], case))
                        r = score(case, disp)
                    except Exception as err:  # a baseline failing is a result to report, not a crash
                        print(f"{case['case']:24} {mname:26} FAILED: {err}", flush=True)
                        rows.append({"case": case["case"], "method": mname, "error": str(err)[:80]})
                        continue
                    rows.append({"case": case["case"], "method": mname, "seconds": secs, "peak_mib": mem, **r})
                    print(f"{case['case']:24} {mname:26} {secs:7.2f}s {mem:7.0f}MiB {r}", flush=True)
                    # Keep what was measured even if a later case is interrupted.
                    (RESULTS / f"{args.out}.partial.json").write_text(json.dumps(rows, indent=1, default=float))
    cols = [
        "dice",
        "hd95",
        "landmark_mm",
        "disp_err_mm",
        "ncc",
        "jac_folding_percent",
        "jac_sdlogj",
        "seconds",
        "peak_mib",
    ]
    head = (
        f"# Pairwise registration benchmark (CPU, {args.threads} thread(s), torch {torch.__version__})\n\n"
        "Same run, same scoring for every method (see the docstring of `benchmarks/pairwise.py`). "
        "Dice/HD95 (mm) on the gland (prostate, MR->US) or the 30 structures (brain); landmark_mm: "
        "distance of landmark centroids; disp_err_mm: mean error of the recovered displacement "
        "(brain synthetic warps); ncc over the overlap; folding: % voxels with det J <= 0.\n\n"
        "| case | method | " + " | ".join(cols) + " |\n|---|---|" + "---:|" * len(cols) + "\n"
    )

    def fmt(v: object) -> str:
        return (
            ""
            if v is None or (isinstance(v, float) and math.isnan(v))
            else (f"{v:.3f}" if isinstance(v, float) else str(v))
        )

    body = "".join(f"| {r['case']} | {r['method']} | " + " | ".join(fmt(r.get(c)) for c in cols) + " |\n" for r in rows)
    summary = summarize(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text(head + body + "\n" + summary)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(rows, indent=1, default=float))
    (RESULTS / f"{args.out}.partial.json").unlink(missing_ok=True)
    print(head + body + "\n" + summary)


def summarize(rows: list[dict]) -> str:
    """Mean per case family and method: the numbers the targets are stated in."""
    out = [
        "## Means per case family\n",
        "| family | method | dice | hd95 | folding % | seconds |",
        "|---|---|---:|---:|---:|---:|",
    ]
    fams: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if "error" in r:
            continue
        fams.setdefault((r["case"].split(" ")[0], r["method"]), []).append(r)
    for (fam, meth), rs in fams.items():

        def mean(key: str, rs: list[dict] = rs) -> str:
            vals = [r[key] for r in rs if key in r and not math.isnan(r[key])]
            return f"{np.mean(vals):.3f}" if vals else ""

        out.append(
            f"| {fam} | {meth} | {mean('dice')} | {mean('hd95')} | {mean('jac_folding_percent')} | {mean('seconds')} |"
        )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
