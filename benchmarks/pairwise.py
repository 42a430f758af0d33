"""Pairwise registration benchmark: stnreg against ANTs, SimpleITK and elastix on real pairs, in the same run.

Cases (``--cases``, from ``--data``, default ``../shared/data``):

* ``prostate``: inter-subject MR pairs (``prostate/unpaired``), gland Dice (label channel 0) and
  HD95. The 16 cases are split by case id into a TUNING set and a REPORT set of 8 each
  (``--set``); pairs chain within a set, i -> i+1 (7 pairs). The tuning set holds the five cases
  (25, 26, 00, 01, 03) whose four chained pairs the earlier version of this benchmark used, and so
  stnreg's defaults were chosen on, plus the next three in that order; no default may be chosen on
  the report set.
* ``mni``: the VoxelMorph test scan (moving; orientation in ``baselines.TEST_SCAN_DIRECTION``)
  to nilearn's bundled MNI152 2009a template at 1 mm (fixed): inter-subject, subject to atlas.
  Tissue Dice for white and grey matter: see :data:`WM_LABELS` and :data:`GM_LABELS`.
* ``mrus``: MR -> transrectal ultrasound pairs on different grids (``prostate/paired/test``),
  mutual information; gland Dice and the distance between landmark centroids in mm.
* ``slices2d``: ANTs' classic 2D example r64 -> r16 (no labels: NCC after registration).
* ``synthetic``: intra-subject (synthetic SVF warp; favours stnreg by construction, its truth is
  a smooth SVF on the same lattice as stnreg's default SVF stage): the test scan warped by known
  smooth diffeomorphisms; Dice over its 30 structures and the error of the recovered displacement.

Methods (``--methods`` selects by name): stnreg (rigid+affine, +svf, +bspline; deterministic on
CPU, so run ``--stnreg-runs`` times, default 1), ANTs (antspyx ``Affine``, its default ``SyN`` and
the stronger ``--ants-strong``, default ``antsRegistrationSyNQuick[s]``), SimpleITK (affine, and
affine + cubic B-spline) and elastix (itk-elastix's default rigid + affine and rigid + affine +
B-spline parameter maps). Methods with randomness run with seeds 1..``--seeds`` (default 3;
``--strong-seeds`` for the stronger ANTs setting) and report the mean and [min, max].

Each library runs in its own worker process (``benchmarks/baselines.py``): one thread (``--threads``), an untimed
warm-up, wall clock from reading the input files to the written outputs, peak RSS of the run.
Every method's result becomes a displacement field on the fixed grid, and one code path measures
Dice, HD95, % folded voxels (``det J <= 0``, central differences) and landmark errors for all of
them; labels move with stnreg's label interpolation for every method.

    python benchmarks/pairwise.py --cases prostate --set report
    python benchmarks/pairwise.py --cases mni --strong-seeds 1
    python benchmarks/pairwise.py --cases prostate --set tuning --quick

Writes ``benchmarks/results/pairwise-<cases>[-<set>].md`` and ``.json`` (``--out`` changes the name).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from baselines import Workers, job_name, source_state, test_scan_images
from tqdm import tqdm

import stnreg
from stnreg.image import Image
from stnreg.learn.task import MODEL_DIR, SHIPPED
from stnreg.metrics import centroid_distance, dice, hd95, jacobian_stats
from stnreg.sampler import gaussian_blur
from stnreg.transforms import Displacement, StationaryVelocity

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(os.environ.get("STNREG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# Prostate case ids (prostate/unpaired/{test,train}/images/case0000NN). See the module docstring.
PROSTATE_SETS = {
    "tuning": ["25", "26", "00", "01", "03", "08", "09", "11"],
    "report": ["12", "14", "17", "18", "19", "22", "23", "24"],
}

# FreeSurfer labels merged into the tissue classes of nilearn's MNI152 maps (each thresholded at
# 0.5). nilearn ships grey and white matter maps only, no CSF; its "grey matter" map is everything
# in the brain mask that is not white matter: 0.98 at a lateral ventricle, 0.93 in the cerebellar
# cortex and hippocampus, 0.95 in the caudate, and the two maps at 0.5 never overlap. So the grey
# class here is the non-white brain too: cortex, cerebellar cortex, deep grey nuclei, ventricles
# and CSF. Structures the template splits between the classes are left out of both: brainstem (16:
# 0.58-0.67 grey in the pons and midbrain), ventral diencephalon (28, 60: 0.66 white) and pallidum
# (13, 52: 0.78 white); vessels and choroid plexus (30, 62, 31, 63, 72, 77, 80, 85) and the corpus
# callosum segments (251-255, inside the white matter of FreeSurfer's aseg) are left out too.
WM_LABELS = (2, 41, 7, 46)
GM_LABELS = (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 17, 53, 18, 54, 26, 58, 4, 43, 5, 44, 14, 15, 24)
TISSUE_NAMES = {1: "WM", 2: "GM"}


def method_table(args: argparse.Namespace) -> dict[str, tuple[str, dict[str, Any], int]]:
    """Method name -> (library, settings, runs per pair)."""
    seeds, strong = args.seeds, args.strong_seeds if args.strong_seeds is not None else args.seeds
    table = {
        "stnreg affine": ("stnreg", {"transform": "rigid+affine"}, args.stnreg_runs),
        "stnreg affine+svf": ("stnreg", {"transform": "rigid+affine+svf"}, args.stnreg_runs),
        "stnreg affine+bspline": ("stnreg", {"transform": "rigid+affine+bspline"}, args.stnreg_runs),
        "stnreg synth network": ("stnreg", {"model": "synth", "transform": "network"}, args.stnreg_runs),
        "stnreg synth network+refine": (
            "stnreg",
            {"model": "synth", "refine": 50, "transform": "network+refine"},
            args.stnreg_runs,
        ),
        "ANTs Affine": ("ants", {"type": "Affine"}, seeds),
        "ANTs SyN": ("ants", {"type": "SyN"}, seeds),
        f"ANTs {args.ants_strong}": ("ants", {"type": args.ants_strong}, strong),
        "SimpleITK affine": ("sitk", {"transform": "affine"}, seeds),
        "SimpleITK affine+bspline": ("sitk", {"transform": "affine+bspline"}, seeds),
        "elastix rigid+affine": ("elastix", {"maps": ["rigid", "affine"]}, seeds),
        "elastix rigid+affine+bspline": ("elastix", {"maps": ["rigid", "affine", "bspline"]}, seeds),
    }
    if not (MODEL_DIR / SHIPPED["synth"]).is_file():  # a checkout without the shipped network
        table = {k: v for k, v in table.items() if "synth" not in k}
    return table


def settings_for(library: str, settings: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    """The case's metric where a method needs to be told (multi-modal pairs)."""
    if case.get("loss") == "mi":
        if library == "stnreg":
            return {**settings, "loss": "mi"}
        if library == "sitk":
            return {**settings, "metric": "mi"}
    return settings


# ----------------------------------------------------------------------------- cases


def _first(img: Image, channel: int = 0) -> Image:
    return Image(img.data[channel : channel + 1], img.grid, img.name)


def case_slices(data: Path, tmp: Path, args: argparse.Namespace) -> list[dict]:
    d = data / "slices2d"
    return [{"case": "slices2d r64->r16", "moving": str(d / "r64slice.jpg"), "fixed": str(d / "r16slice.jpg")}]


def _prostate_image(root: Path, case_id: str) -> Path:
    return next(root.glob(f"*/images/case0000{case_id}.nii*"))


def case_prostate(data: Path, tmp: Path, args: argparse.Namespace) -> list[dict]:
    root = data / "prostate" / "unpaired"
    ids = PROSTATE_SETS[args.set]
    out = []
    for m_id, f_id in list(itertools.pairwise(ids))[: args.pairs]:
        m, f = _prostate_image(root, m_id), _prostate_image(root, f_id)
        out.append(
            {
                "case": f"prostate {m_id}->{f_id}",
                "moving": str(m),
                "fixed": str(f),
                "moving_labels": str(next((m.parent.parent / "labels").glob(f"case0000{m_id}.nii*"))),
                "fixed_labels": str(next((f.parent.parent / "labels").glob(f"case0000{f_id}.nii*"))),
            }
        )
    return out


def case_mrus(data: Path, tmp: Path, args: argparse.Namespace) -> list[dict]:
    root = data / "prostate" / "paired" / "test"
    out = []
    for f in sorted((root / "fixed_images").glob("*.nii*"))[: args.pairs]:
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


def case_mni(data: Path, tmp: Path, args: argparse.Namespace) -> list[dict]:
    """Test scan -> MNI152 2009a (nilearn, 1 mm); tissue labels 1 = WM, 2 = GM on both sides."""
    import nibabel as nib
    from nilearn import datasets

    vol, seg = test_scan_images(data)
    fs = sitk.GetArrayFromImage(seg)
    tissue = np.zeros(fs.shape, np.int16)
    tissue[np.isin(fs, WM_LABELS)] = 1
    tissue[np.isin(fs, GM_LABELS)] = 2
    tissue_img = sitk.GetImageFromArray(tissue)
    tissue_img.CopyInformation(seg)
    paths = {k: tmp / f"mni_{k}.nii.gz" for k in ("moving", "moving_labels", "fixed", "fixed_labels")}
    sitk.WriteImage(vol, str(paths["moving"]))
    sitk.WriteImage(tissue_img, str(paths["moving_labels"]))
    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata()
    labels = np.where(wm > 0.5, 1, np.where(gm > 0.5, 2, 0)).astype(np.int16)
    nib.save(nib.Nifti1Image(t1.get_fdata().astype(np.float32), t1.affine), paths["fixed"])
    nib.save(nib.Nifti1Image(labels, t1.affine), paths["fixed_labels"])
    return [{"case": "test_scan->MNI152", **{k: str(v) for k, v in paths.items()}, "labels": [1, 2], "tissue": True}]


def case_synthetic(data: Path, tmp: Path, args: argparse.Namespace) -> list[dict]:
    """The test scan warped by known smooth diffeomorphisms (peak velocity ~6 mm): intra-subject."""
    scan = np.load(data / "brain3d" / "test_scan.npz")
    structures = [int(v) for v in np.load(data / "brain3d" / "labels.npz")["labels"]]
    vol = torch.from_numpy(scan["vol"].astype(np.float32))[None]
    seg = torch.from_numpy(scan["seg"].astype(np.int64))[None]
    grid = stnreg.Grid(tuple(vol.shape[1:]))
    fixed_p, fixed_l = tmp / "brain_fixed.nii.gz", tmp / "brain_fixed_seg.nii.gz"
    stnreg.write_image(fixed_p, Image(vol, grid))
    stnreg.write_image(fixed_l, Image(seg.int(), grid))
    out = []
    for k in range(args.pairs):
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
                "case": f"synthetic SVF warp {k}",
                "moving": str(mp),
                "fixed": str(fixed_p),
                "moving_labels": str(ml),
                "fixed_labels": str(fixed_l),
                "labels": structures,
                "true_disp": true_disp,
            }
        )
    return out


CASES = {
    "prostate": case_prostate,
    "mni": case_mni,
    "mrus": case_mrus,
    "slices2d": case_slices,
    "synthetic": case_synthetic,
}


# ----------------------------------------------------------------------------- scoring


def score(case: dict, disp: torch.Tensor) -> dict[str, float]:
    """Dice, HD95, landmark and displacement errors, NCC and Jacobian statistics of one displacement."""
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
        if case.get("tissue"):
            row.update({f"dice_{TISSUE_NAMES[k]}": v for k, v in d.items()})
        if case.get("landmarks"):
            dists = []
            for ch in (1, 2):
                wlc = stnreg.apply(t, _first(ml, ch), fixed, "label").data[0]
                dists.append(centroid_distance(wlc, fl.data[ch], grid, [1])[1])
            row["landmark_mm"] = float(np.nanmean(dists))
    if "true_disp" in case:
        row["disp_err_mm"] = float((disp - case["true_disp"]).norm(dim=0).mean())
    return row


# ----------------------------------------------------------------------------- tables

COLUMNS = {
    "dice": ("Dice", 3),
    "dice_WM": ("Dice WM", 3),
    "dice_GM": ("Dice GM", 3),
    "hd95": ("HD95 mm", 2),
    "landmark_mm": ("landmark mm", 2),
    "disp_err_mm": ("disp. error mm", 3),
    "ncc": ("NCC", 3),
    "jac_folding_percent": ("folding %", 3),
    "seconds": ("seconds", 2),
    "ratio": ("s / ANTs SyN", 2),
    "peak_mib": ("peak MiB", 0),
}


def _span(values: list[float], digits: int) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return ""
    lo, hi, mean = min(vals), max(vals), float(np.mean(vals))
    if len(vals) == 1 or hi - lo < 0.5 * 10**-digits:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (case, method): every column's values over seeds; ratio of mean seconds to ANTs SyN's."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["method"]), []).append(r)
    out = []
    for (case, method), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        e: dict[str, Any] = {"case": case, "method": method, "runs": len(rs), "ok": len(ok)}
        e.update({k: [r[k] for r in ok if k in r] for k in COLUMNS if k != "ratio"})
        e["failures"] = sorted({r["error"] for r in rs if "error" in r})
        out.append(e)
    for e in out:
        ref = next((a for a in out if a["case"] == e["case"] and a["method"] == "ANTs SyN"), None)
        ok = ref and ref["seconds"] and e["seconds"] and e["method"] != "(before)"
        e["ratio"] = [float(np.mean(e["seconds"]) / np.mean(ref["seconds"]))] if ok else []
    return out


def case_table(summary: list[dict[str, Any]]) -> str:
    cols = [c for c in COLUMNS if any(e[c] for e in summary)]
    lines = [
        "| case | method | " + " | ".join(COLUMNS[c][0] for c in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for e in summary:
        if not e["ok"]:
            lines.append(f"| {e['case']} | {e['method']} | failed: {'; '.join(e['failures'])[:150]} |")
            continue
        cells = [_span(e[c], COLUMNS[c][1]) for c in cols]
        note = f" ({e['runs'] - e['ok']} of {e['runs']} runs failed)" if e["ok"] < e["runs"] else ""
        lines.append(f"| {e['case']} | {e['method']}{note} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def family_table(summary: list[dict[str, Any]]) -> str:
    """Mean over the pairs of a case family of each pair's mean over seeds; [min, max] over pairs."""
    fams: dict[tuple[str, str], list[dict]] = {}
    for e in summary:
        if e["ok"]:
            fams.setdefault((e["case"].split(" ")[0], e["method"]), []).append(e)
    cols = [c for c in COLUMNS if any(e[c] for es in fams.values() for e in es)]
    lines = [
        "| family | method | pairs | " + " | ".join(COLUMNS[c][0] for c in cols) + " |",
        "|---|---|---:|" + "---:|" * len(cols),
    ]
    for (fam, method), es in fams.items():
        cells = [_span([float(np.mean(e[c])) for e in es if e[c]], COLUMNS[c][1]) for c in cols]
        lines.append(f"| {fam} | {method} | {len(es)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cases", default="prostate", help=f"comma-separated subset of {', '.join(CASES)}")
    ap.add_argument("--set", choices=sorted(PROSTATE_SETS), default="report", help="prostate case set")
    ap.add_argument("--pairs", type=int, default=7, help="at most this many pairs per case family")
    ap.add_argument("--methods", default=None, help="comma-separated subset of method names")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 1..N for methods with randomness")
    ap.add_argument("--ants-strong", default="antsRegistrationSyNQuick[s]", help="the stronger ANTs setting")
    ap.add_argument("--strong-seeds", type=int, default=None, help="seeds for --ants-strong (default --seeds)")
    ap.add_argument("--stnreg-runs", type=int, default=1, help="runs of stnreg (deterministic on CPU)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 pairs, 1 seed, no B-spline baselines")
    ap.add_argument("--threads", type=int, default=1, help="threads per method (every library alike)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before a run counts as failed")
    ap.add_argument("--out", default=None, help="results name (default pairwise-<cases>[-<set>])")
    args = ap.parse_args()
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    if unknown := [n for n in names if n not in CASES]:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.quick:
        args.pairs, args.seeds, args.strong_seeds = min(args.pairs, 2), 1, 1
    table = method_table(args)
    if args.methods:
        keep = [m.strip() for m in args.methods.split(",")]
        if unknown := [m for m in keep if m not in table]:
            ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(table)}")
        table = {k: v for k, v in table.items() if k in keep}
    elif args.quick:
        table = {k: v for k, v in table.items() if "bspline" not in k}
    out_name = args.out or "pairwise-" + "_".join(names) + (f"-{args.set}" if "prostate" in names else "")
    out_name += "-quick" if args.quick and not args.out else ""
    torch.set_num_threads(1)  # scoring only; every method runs in its worker with --threads threads
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmpd, Workers(Path(tmpd), args.threads) as workers:
        tmp = Path(tmpd)
        cases = [c for name in names for c in CASES[name](args.data, tmp, args)]
        bar = tqdm(total=sum(n for _, _, n in table.values()) * len(cases), desc="pairwise", unit="run")
        for case in cases:
            fixed = stnreg.read_image(case["fixed"])
            before = score(case, torch.zeros(fixed.ndim, *fixed.grid.shape))
            rows.append({"case": case["case"], "method": "(before)", "seed": 0, **before})
            for method, (library, settings, runs) in table.items():
                for seed in range(1, runs + 1):
                    job_id = job_name(case["case"], method, seed)
                    job = {
                        "id": job_id,
                        "moving": case["moving"],
                        "fixed": case["fixed"],
                        "seed": seed,
                        "settings": settings_for(library, settings, case),
                        "out": str(tmp / "out" / job_id),
                        "disp": str(tmp / f"{job_id}.npy"),
                    }
                    res = workers.run(library, job, args.timeout)
                    row = {"case": case["case"], "method": method, "seed": seed}
                    row.update({k: v for k, v in res.items() if k != "id"})
                    if "error" not in res:
                        row.update(score(case, torch.from_numpy(np.load(job["disp"]))))
                        Path(job["disp"]).unlink()
                    rows.append(row)
                    shown = {k: round(row[k], 3) for k in ("dice", "seconds") if isinstance(row.get(k), float)}
                    bar.set_postfix_str(f"{case['case']} {method}: {shown or row.get('error')}")
                    bar.update(1)
                    (RESULTS / f"{out_name}.partial.json").write_text(json.dumps(rows, indent=1, default=float))
        bar.close()
    summary = summarize(rows)
    command = " ".join(["python benchmarks/pairwise.py", *sys.argv[1:]])
    head = (
        f"# Pairwise registration benchmark: {', '.join(names)}"
        f"{f' ({args.set} set)' if 'prostate' in names else ''}\n\n"
        f"`{command}`; {time.time() - started:.0f} s in all; stnreg at {source_state()}; CPU, "
        f"{args.threads} thread(s) per method, each library in its own worker process. Values: mean over "
        "seeds [min, max]; ANTs and "
        f"SimpleITK and elastix with seeds 1..{args.seeds} (the stronger ANTs setting "
        f"{args.strong_seeds or args.seeds}), stnreg {args.stnreg_runs} run(s) (deterministic). "
        "Seconds: wall clock from reading the files to the written outputs; s / ANTs SyN: ratio of "
        "mean seconds to ANTs SyN's on the same pair; peak MiB: the worker's peak RSS during the run "
        "(the library's own footprint included). Dice/HD95 (mm): gland (prostate), WM and GM "
        "(test_scan->MNI152, Dice = their mean), 30 structures (synthetic). See `benchmarks/README.md`.\n\n"
    )
    text = head + "## Per pair\n\n" + case_table(summary) + "\n## Per case family\n\n" + family_table(summary)
    (RESULTS / f"{out_name}.md").write_text(text)
    (RESULTS / f"{out_name}.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows, "summary": summary}, indent=1)
    )
    (RESULTS / f"{out_name}.partial.json").unlink(missing_ok=True)
    print(text)


if __name__ == "__main__":
    main()
