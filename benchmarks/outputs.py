"""What a registration leaves behind, timed: each output of ``RegistrationResult.save`` and its share
of the ``stnreg register`` run, and label warping of the AAL atlas against ANTs' ``genericLabel``.

Setup (one thread: torch, numba, ITK and ANTs): the VoxelMorph test scan (``brain3d/test_scan.npz``,
160x192x224 at 1 mm; oriented as ``benchmarks/pairwise.py`` does and centred at world 0) is
registered onto the MNI152 T1 (``brain3d/mni.nii.gz``, 182x218x182) with the defaults of
``stnreg register`` (rigid+affine+svf, LNCC). That run's time is the denominator of the shares.

Outputs, on that result (``--repeats`` times each; min and mean): the deformable part's field
(``result.deformable_displacement()``, shared by the file and the metrics), the metrics, the warped
image, ``affine.tfm``, ``deformable.nii.gz``, the QC figure, ``report.json``, and ``save_result`` as a
whole (metrics included). ``total_displacement.nii.gz`` is timed too, though ``save`` no longer
writes it by default. The same parts of the code before this change (``report``, ``io``,
``metrics``, ``viz`` and ``warp`` as of ``--before``, loaded from git into this process) run
``--before-repeats`` times. Importing matplotlib, paid once per process by the first figure, is
timed apart in a fresh interpreter.

Label warping: the AAL atlas (``brain3d/mnia.nii.gz``, 116 labels) through the saved transform onto
the fixed grid, images already loaded: stnreg reads the folder (``read_transform``) and applies it
with ``interpolation="label"``; ANTs runs ``ants.apply_transforms(..., interpolator="genericLabel")``
on the same files (it reads them too). Three repeats each: mean and range; the old per-label path
once. The table gives the share of voxels on which the two label maps agree.

    python benchmarks/outputs.py [--data ../shared/data] [--repeats 3] [--before-repeats 1]

Writes ``benchmarks/results/outputs.md`` and ``.json``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("ANTS_RANDOM_SEED", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

import stnreg  # noqa: E402
import stnreg.io  # noqa: E402
import stnreg.report  # noqa: E402
import stnreg.viz  # noqa: E402 - matplotlib loaded before any timing (its import is timed apart)
from stnreg import Grid  # noqa: E402
from stnreg.image import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = Path(os.environ.get("STNREG_DATA", ROOT.parent / "shared" / "data"))
# The last commit with the previous outputs code (report, io, metrics, viz, warp).
BEFORE = "8529d9a"
# The test scan's axes in world space, as benchmarks/pairwise.py orients it: array axes (z, y, x)
# of the VoxelMorph volume are superior-inferior, anterior-posterior and left-right.
TEST_SCAN_DIRECTION = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
OWN = ("io", "metrics", "viz", "warp", "report")


def _timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], object]:
    """Wall-clock seconds of ``repeats`` calls (garbage collected before each) and the last result."""
    times, out = [], None
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def _summary(times: list[float]) -> dict[str, float]:
    return {"min": min(times), "mean": statistics.fmean(times), "max": max(times), "n": len(times)}


def load_before(rev: str) -> dict[str, ModuleType]:
    """``stnreg/{io,metrics,viz,warp,report}.py`` as of ``rev``, as modules ``stnreg._before_*`` that
    import each other (and the current versions of every other stnreg module)."""
    mods = {}
    for name in OWN:
        src = subprocess.run(
            ["git", "show", f"{rev}:stnreg/{name}.py"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        for other in OWN:
            src = re.sub(rf"from \.{other} import", f"from stnreg._before_{other} import", src)
        spec = importlib.util.spec_from_loader(f"stnreg._before_{name}", loader=None)
        mod = importlib.util.module_from_spec(spec)
        mod.__package__ = "stnreg"
        sys.modules[spec.name] = mod
        exec(compile(src, f"{rev}:stnreg/{name}.py", "exec"), mod.__dict__)
        mods[name] = mod
    return mods


def load_pair(data: Path) -> tuple[Image, Image]:
    """The test scan (moving, oriented and centred at world 0) and the MNI152 T1 (fixed)."""
    vol = np.load(data / "brain3d" / "test_scan.npz")["vol"].astype(np.float32)
    shape = vol.shape
    half = (np.array(list(reversed(shape))) - 1) / 2
    origin = -TEST_SCAN_DIRECTION @ half
    grid = Grid(shape, (1.0, 1.0, 1.0), origin.tolist(), TEST_SCAN_DIRECTION.tolist())
    moving = Image(torch.from_numpy(vol)[None], grid, "test_scan")
    return moving, stnreg.io.read_image(data / "brain3d" / "mni.nii.gz")


def import_matplotlib_seconds(repeats: int) -> list[float]:
    """Seconds to import matplotlib with its Agg backend and pyplot, in fresh interpreters."""
    code = (
        "import time; t = time.perf_counter(); import matplotlib; matplotlib.use('Agg'); "
        "import matplotlib.pyplot; print(time.perf_counter() - t)"
    )
    return [
        float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
        for _ in range(repeats)
    ]


def time_parts(
    result, mods: dict[str, ModuleType] | None, out: Path, repeats: int
) -> tuple[dict[str, list[float]], int]:
    """Seconds per output part, and the size of ``deformable.nii.gz`` in bytes: the current code
    (``mods=None``) or the code before (``mods``)."""
    report = mods["report"] if mods else stnreg.report
    io = mods["io"] if mods else stnreg.io
    grid = result.fixed.grid
    parts: dict[str, list[float]] = {}
    parts["deformable field"], deform = _timed(result.deformable_displacement, repeats)
    parts["total field"], total = _timed(result.displacement, repeats)
    if mods:
        parts["metrics"], metrics = _timed(lambda: report.evaluate(result, *result.label_maps), repeats)
    else:
        parts["metrics"], metrics = _timed(
            lambda: report.evaluate(result, *result.label_maps, deformable_displacement=deform), repeats
        )
    result._metrics = metrics
    out.mkdir(parents=True, exist_ok=True)
    parts["warped image"], _ = _timed(lambda: io.write_image(out / "warped.nii.gz", result.warped), repeats)
    parts["affine.tfm"], _ = _timed(lambda: io.write_transform(out / "affine.tfm", result.matrix), repeats)
    parts["deformable.nii.gz"], _ = _timed(lambda: io.write_displacement(out / "d.nii.gz", deform, grid), repeats)
    parts["total_displacement.nii.gz"], _ = _timed(
        lambda: io.write_displacement(out / "t.nii.gz", total, grid), repeats
    )
    if mods:
        parts["qc.png"], _ = _timed(lambda: report.qc_figure(result, out / "qc.png"), repeats)
    else:
        parts["qc.png"], _ = _timed(lambda: report.qc_figure(result, out / "qc.png", deform), repeats)
    text = json.dumps({"metrics": metrics, "settings": result.settings}, indent=1, default=str)
    parts["report.json"], _ = _timed(lambda: (out / "r.json").write_text(text), repeats)

    def whole() -> None:
        shutil.rmtree(out / "save", ignore_errors=True)
        result._metrics = None
        if mods:
            # The old metrics property: report.evaluate of the code before, then its save_result.
            result._metrics = report.evaluate(result, *result.label_maps)
        report.save_result(result, out / "save")

    parts["save (metrics included)"], _ = _timed(whole, repeats)
    return parts, (out / "d.nii.gz").stat().st_size


def time_labels(out: Path, data: Path, mods: dict[str, ModuleType], repeats: int) -> dict[str, object]:
    """The AAL atlas through the saved transform onto the fixed grid: stnreg (now and before) and ANTs."""
    import ants

    atlas_path, fixed_path = data / "brain3d" / "mnia.nii.gz", data / "brain3d" / "mni.nii.gz"
    atlas = stnreg.io.read_image(atlas_path, label=True)
    reference = stnreg.io.read_image(fixed_path)
    chain = [str(out / f) for f in json.loads((out / "report.json").read_text())["ants_transformlist"]]
    fixed_ants, atlas_ants = ants.image_read(str(fixed_path)), ants.image_read(str(atlas_path))

    def ours():
        return stnreg.apply(stnreg.io.read_transform(out), atlas, reference, "label")

    def before():
        return mods["warp"].apply(mods["io"].read_transform(out), atlas, reference, "label")

    def theirs():
        return ants.apply_transforms(fixed_ants, atlas_ants, transformlist=chain, interpolator="genericLabel")

    ours(), theirs()  # untimed warm-up: numba's cache, ITK's factories
    t_ours, mine = _timed(ours, repeats)
    t_ants, warped_ants = _timed(theirs, repeats)
    t_before, old = _timed(before, 1)
    ants_labels = torch.from_numpy(warped_ants.numpy().transpose(2, 1, 0).astype(np.int64))
    return {
        "stnreg": t_ours,
        "ants": t_ants,
        "stnreg_before": t_before,
        "labels": int(atlas.data.unique().numel() - 1),
        "same_as_before": bool(torch.equal(mine.data, old.data)),
        "agreement_with_ants": float((mine.data[0] == ants_labels).double().mean()),
    }


def write(results: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1))
    run = results["register_s"]
    after, before = results["after"], results["before"]
    save_after = after["save (metrics included)"]["min"]
    save_before = before["save (metrics included)"]["min"]
    env = results["env"]
    lines = [
        f"# Outputs of a registration and label warping ({env['machine']}, torch {env['torch']}, 1 thread)",
        "",
        f"`stnreg register` defaults (rigid+affine+svf, LNCC) of the 1 mm test scan onto MNI152: "
        f"registration {run:.1f} s. Seconds per output part, min (mean) of {after['save (metrics included)']['n']} "
        f"runs now and {before['save (metrics included)']['n']} before (the code of `{results['before_rev']}`); the "
        f"share is of the whole run, registration plus `save` ({run + save_after:.1f} s now, "
        f"{run + save_before:.1f} s before). `deformable field` and `total field` are "
        "`result.deformable_displacement()` and `result.displacement()`: `save` now evaluates the first "
        "once for the file and the metrics, and the second not at all (it wrote `total_displacement.nii.gz`, "
        "now `save(..., total_displacement=True)`). The two cores were shared with other jobs: the same "
        "work can differ by a third between rows (the two field writes, the two field evaluations).",
        "",
        "| part | before s | share | now s | share | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    optional = {"total field", "total_displacement.nii.gz"}
    for part, now in after.items():
        old = before[part]
        label = f"{part} (now only on request)" if part in optional else part
        lines.append(
            f"| {label} | {old['min']:.2f} ({old['mean']:.2f}) | {100 * old['min'] / (run + save_before):.1f}% "
            f"| {now['min']:.2f} ({now['mean']:.2f}) | {100 * now['min'] / (run + save_after):.1f}% "
            f"| {old['min'] / now['min']:.1f}x |"
        )
    mpl = results["matplotlib_import"]
    size = results["deformable_bytes"]
    lines += [
        "",
        f"`deformable.nii.gz`: {size['before'] / 1e6:.1f} MB before (ITK's gzip), {size['after'] / 1e6:.1f} MB now "
        "(zlib level 1, run-length strategy).",
        "",
        f"Importing matplotlib (first figure of a process, in `save` above only when not yet imported): "
        f"{mpl['min']:.2f} s (mean {mpl['mean']:.2f}) in a fresh interpreter.",
        "",
    ]
    lab = results["labels"]
    s, a, b = (_summary(lab[k]) for k in ("stnreg", "ants", "stnreg_before"))
    lines += [
        f"## AAL atlas ({lab['labels']} labels) through the saved transform onto the fixed grid",
        "",
        "Images already loaded; both tools read the transform files (stnreg: `read_transform(folder)` "
        "then `apply(..., 'label')`; ANTs: `apply_transforms(..., interpolator='genericLabel')`). Mean "
        f"[min, max] of {s['n']} runs.",
        "",
        "| method | seconds | ratio to ANTs |",
        "|---|---:|---:|",
        f"| stnreg | {s['mean']:.2f} [{s['min']:.2f}, {s['max']:.2f}] | {s['mean'] / a['mean']:.2f} |",
        f"| ANTs genericLabel | {a['mean']:.2f} [{a['min']:.2f}, {a['max']:.2f}] | 1.00 |",
        f"| stnreg before (one linear sample per label; 1 run) | {b['mean']:.2f} | {b['mean'] / a['mean']:.2f} |",
        "",
        f"Same labels as before: {lab['same_as_before']}. Voxels where stnreg and ANTs agree: "
        f"{100 * lab['agreement_with_ants']:.3f}%.",
        "",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before-repeats", type=int, default=1)
    ap.add_argument("--before", default=BEFORE, help="git revision of the code to compare with")
    ap.add_argument("--out", default="outputs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    mods = load_before(args.before)
    moving, fixed = load_pair(args.data)
    t = time.perf_counter()
    result = stnreg.register(moving, fixed, progress=False, device="cpu")
    register_s = time.perf_counter() - t
    print(f"register {register_s:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stnreg.report.save_result(result, tmp / "warm")  # numba's kernels loaded, ITK's writers made
        parts, size_after = time_parts(result, None, tmp / "now", args.repeats)
        after = {k: _summary(v) for k, v in parts.items()}
        print(json.dumps(after, indent=1), flush=True)
        parts, size_before = time_parts(result, mods, tmp / "before", args.before_repeats)
        before = {k: _summary(v) for k, v in parts.items()}
        print(json.dumps(before, indent=1), flush=True)
        result._metrics = None
        result.save(tmp / "saved")
        labels = time_labels(tmp / "saved", args.data, mods, args.repeats)
    results = {
        "env": {"machine": platform.machine(), "torch": torch.__version__, "threads": 1},
        "before_rev": args.before,
        "register_s": register_s,
        "after": after,
        "before": before,
        "deformable_bytes": {"before": size_before, "after": size_after},
        "matplotlib_import": _summary(import_matplotlib_seconds(args.repeats)),
        "labels": labels,
    }
    write(results, args.out)


if __name__ == "__main__":
    main()
