"""Shared method runners for the benchmarks: stnreg, ANTs (antspyx), SimpleITK and elastix (itk-elastix).

Every library runs in its own worker process (``python benchmarks/baselines.py LIBRARY``, one job
per stdin line), started once per benchmark run, so that one library's allocator caches and
threads never touch another's timings or memory, and the parent can interleave libraries case by
case (the machine's load drifts; ratios are taken within a case). A worker registers a small
synthetic pair once per (dimension, settings), untimed (library loading, JIT compilation and
first-call costs are nobody's registration time), then for each job:

* resets the process's peak-RSS mark (``/proc/self/clear_refs``);
* times, by wall clock, everything from reading the two input files to the written outputs (each
  method writes its transform files, and whatever else its ordinary save writes, to the job's
  folder): ``seconds``; ``register_s`` is the same clock stopped right after the registration call;
* records the peak RSS of the job (``peak_mib``: the process's high-water mark, libraries included)
  and the RSS before it (``base_mib``);
* then, untimed, writes the total displacement ``T(x) - x`` on the fixed grid, ``(d, *fixed_shape)``
  in mm with (x, y, z) components, to ``job["disp"]`` (``.npy``) for the parent to score.

Seeds: ANTs gets ``--random-seed`` (antspyx 0.6 has no ``random_seed`` argument; its module
attribute ``ants.config._random_seed`` adds the flag), SimpleITK ``SetMetricSamplingPercentage(p,
seed)`` (seed 0 would mean the wall clock), elastix the ``RandomSeed`` parameter, stnreg
``torch.manual_seed`` (it is deterministic on CPU; the seed changes nothing).

Every library gets the same number of threads (:func:`thread_env`; one by default, as the machine
is shared and small; ``Workers(threads=2)`` measures what a second thread buys).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)


def thread_env(threads: int) -> dict[str, str]:
    """The environment that limits every library of a worker to ``threads`` threads."""
    return dict.fromkeys(THREAD_VARIABLES, str(threads))


def worker_threads() -> int:
    """The thread count this worker was started with."""
    return int(os.environ.get("OMP_NUM_THREADS", "1"))


# A runner registers one job and returns (seconds to the end of the registration call, a function
# that computes the displacement afterwards, untimed). Its clock starts before it reads the files.
Runner = Callable[[dict[str, Any]], tuple[float, Callable[[], np.ndarray]]]


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def source_state() -> str:
    """The checkout's commit, and whether stnreg's sources differ from it (stnreg's numbers belong to that state)."""
    root = Path(__file__).resolve().parents[1]

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "stnreg")
    return f"commit {commit}" + (" with uncommitted changes under stnreg/" if dirty else "")


def job_name(*parts: object) -> str:
    """A file-name-safe job id: ANTs parses its output prefix on a command line where brackets, commas
    and spaces have meaning (``antsRegistrationSyNQuick[s]`` in a path fails with error code 1)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", ".".join(str(p) for p in parts))


def sitk_displacement(transform: sitk.Transform, fixed: sitk.Image) -> np.ndarray:
    """``transform(x) - x`` on the fixed grid, ``(d, *array_shape)`` float32 in mm."""
    field = sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        fixed.GetSize(),
        fixed.GetOrigin(),
        fixed.GetSpacing(),
        fixed.GetDirection(),
    )
    return np.moveaxis(sitk.GetArrayFromImage(field), -1, 0).astype(np.float32)


# The VoxelMorph test scan (brain3d/test_scan.npz) has no header. Its array axes run to the
# subject's Left, Inferior and Anterior (FreeSurfer's conformed "LIA" orientation, which VoxelMorph's
# preprocessing kept when it cropped to 160x192x224): FreeSurfer's Left-Cerebral-White-Matter
# (label 2) has its centroid at axis-0 index 108 and the right one (41) at 51; the brainstem (16) lies
# at a larger axis-1 index than the cortex; the cerebellum at small axis-2 indices. Mid-slices viewed
# in all three axes agree. In ITK's LPS world, with numpy's array order reversed into ITK's index
# order (x = axis 2 = A, y = axis 1 = I, z = axis 0 = L), the direction columns are -P, -S, +L.
TEST_SCAN_DIRECTION = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def centred_image(arr: np.ndarray, spacing: tuple[float, ...], direction: np.ndarray) -> sitk.Image:
    """``arr`` (numpy array order) as a SimpleITK image whose centre lies at world 0."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetDirection(direction.ravel().tolist())
    half = (np.array(img.GetSize()) - 1) / 2 * np.array(spacing)
    img.SetOrigin((-(direction @ half)).tolist())
    return img


def test_scan_images(data: Path, factors: tuple[int, int, int] = (1, 1, 1), rotation: np.ndarray | None = None):
    """The test scan (float32 ``vol``) and its FreeSurfer ``seg`` (int16) as LPS images centred at world 0.

    ``factors`` block-average ``vol`` per array axis (``seg`` takes each block's first voxel);
    ``rotation`` (3x3, world) is applied to the direction, for an oblique grid.
    """
    scan = np.load(data / "brain3d" / "test_scan.npz")
    vol, seg = scan["vol"].astype(np.float32), scan["seg"].astype(np.int16)
    crop = tuple(slice(0, n - n % f) for n, f in zip(vol.shape, factors, strict=True))
    vol, seg = vol[crop], seg[crop]
    blocks = [x for n, f in zip(vol.shape, factors, strict=True) for x in (n // f, f)]
    vol = vol.reshape(blocks).mean(axis=(1, 3, 5))
    seg = np.ascontiguousarray(seg[:: factors[0], :: factors[1], :: factors[2]])
    direction = (rotation if rotation is not None else np.eye(3)) @ TEST_SCAN_DIRECTION
    spacing = tuple(float(f) for f in reversed(factors))
    return centred_image(vol, spacing, direction), centred_image(seg, spacing, direction)


# ----------------------------------------------------------------------------- runners


def run_stnreg(job: dict[str, Any]) -> tuple[float, Callable[[], np.ndarray]]:
    """``stnreg.register(paths, transform=settings["transform"], loss=...)`` then ``result.save(out)``.

    ``settings["model"]`` (a checkpoint or a shipped model's name) registers with that network instead,
    then ``settings["refine"]`` iterations of refinement;
    ``settings["loss"]`` absent means stnreg's default loss (the argument is not passed);
    ``settings["qc"]`` false skips the QC figure (the exact-recovery runs, timed to the written
    transform as the other libraries are).
    """
    import torch

    import stnreg

    s = job["settings"]
    torch.manual_seed(job["seed"])
    extra = {"loss": s["loss"]} if s.get("loss") else {}
    t0 = time.perf_counter()
    if s.get("model"):
        from stnreg.learn import register_with_model

        result = register_with_model(
            s["model"], job["moving"], job["fixed"], s.get("refine", 0), device="cpu", progress=False, **extra
        )
    else:
        result = stnreg.register(
            job["moving"], job["fixed"], transform=s["transform"], progress=False, device="cpu", **extra
        )
    reg_s = time.perf_counter() - t0
    result.save(job["out"], qc=s.get("qc", True))
    return reg_s, lambda: result.displacement().numpy()


def _ants_composite(paths: list[str], dim: int) -> sitk.Transform:
    composite = sitk.CompositeTransform(dim)
    # ANTs lists transforms in the reverse of ITK's CompositeTransform order (checked in
    # tests/test_register.py against ants.apply_transforms): add them last first.
    for path in reversed(paths):
        if path.endswith(".mat"):
            composite.AddTransform(sitk.ReadTransform(path))
        else:
            composite.AddTransform(
                sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(path), sitk.sitkVectorFloat64))
            )
    return composite


def run_ants(job: dict[str, Any]) -> tuple[float, Callable[[], np.ndarray]]:
    """``ants.registration(type_of_transform=settings["type"])`` with antspyx's defaults otherwise."""
    import ants

    # antspyx 0.6 takes the seed only through this module attribute (set_ants_deterministic would
    # also set it, but then refuses every non-"Repro" transform type); it becomes --random-seed.
    ants.config._random_seed = job["seed"]
    t0 = time.perf_counter()
    f, m = ants.image_read(job["fixed"]), ants.image_read(job["moving"])
    out = ants.registration(f, m, type_of_transform=job["settings"]["type"], outprefix=str(Path(job["out"]) / "ants_"))
    reg_s = time.perf_counter() - t0  # the transforms are already on disk: ANTs writes them as it finishes
    paths = list(out["fwdtransforms"])
    return reg_s, lambda: sitk_displacement(_ants_composite(paths, f.dimension), sitk.ReadImage(job["fixed"]))


SITK_MAX_SAMPLES = 200_000


def _sitk_read(path: str) -> sitk.Image:
    img = sitk.Cast(sitk.ReadImage(path), sitk.sitkFloat32)
    return sitk.VectorIndexSelectionCast(img, 0) if img.GetNumberOfComponentsPerPixel() > 1 else img


def _sitk_linear_stage(f: sitk.Image, m: sitk.Image, kind: str, seed: int, sampling: float) -> sitk.Transform:
    """Regular-step gradient descent on Mattes MI, physical-shift scales, moments initialization."""
    dim = f.GetDimension()
    euler = sitk.Euler2DTransform() if dim == 2 else sitk.Euler3DTransform()
    init = sitk.CenteredTransformInitializer(f, m, euler, sitk.CenteredTransformInitializerFilter.MOMENTS)
    if kind == "translation":
        # The initializer's Euler transform has no rotation; its last ``dim`` parameters are the shift.
        tx: sitk.Transform = sitk.TranslationTransform(dim, init.GetParameters()[-dim:])
    elif kind == "rigid":
        tx = init
    else:
        tx = sitk.CenteredTransformInitializer(
            f, m, sitk.AffineTransform(dim), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=300, relaxationFactor=0.5
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()  # voxels, as the shrink factors
    reg.SetInitialTransform(tx, inPlace=False)
    return reg.Execute(f, m)


def _sitk_bspline_stage(
    f: sitk.Image, m: sitk.Image, affine: sitk.Transform, seed: int, metric: str, sampling: float
) -> sitk.Transform:
    """A cubic B-spline (control points about 10 mm apart) after ``affine``: LBFGSB on random samples.

    The earlier version of this baseline (ANTS neighbourhood correlation on random samples, a
    20 mm mesh, two levels) returned the synthetic brain's unregistered scores after 278 s and
    moved the prostate pairs' Dice by 0.00-0.05. Here: correlation (mono-modal) or Mattes MI,
    three levels, SimpleITK's documented LBFGSB settings. Refining the mesh between levels
    (``SetInitialTransformAsBSpline`` with ``scaleFactors``) fails with LBFGSB (its scales keep the
    first level's size) and, with line-search gradient descent instead, folded one prostate pair to
    Dice 0.
    """
    dim = f.GetDimension()
    mesh = [max(1, round(s * sp / 10.0)) for s, sp in zip(f.GetSize(), f.GetSpacing(), strict=True)]
    bsp = sitk.BSplineTransformInitializer(f, mesh, order=3)
    reg = sitk.ImageRegistrationMethod()
    if metric == "mi":
        reg.SetMetricAsMattesMutualInformation(32)
    else:
        reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(
        gradientConvergenceTolerance=1e-5,
        numberOfIterations=100,
        maximumNumberOfCorrections=5,
        maximumNumberOfFunctionEvaluations=1000,
        costFunctionConvergenceFactor=1e7,
    )
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bsp, inPlace=True)
    reg.Execute(f, m)
    composite = sitk.CompositeTransform(dim)
    composite.AddTransform(affine)
    composite.AddTransform(bsp)
    # Execute returns the affine wrapped in a composite; a nested composite cannot be written to a file.
    composite.FlattenTransform()
    return composite


def run_sitk(job: dict[str, Any]) -> tuple[float, Callable[[], np.ndarray]]:
    """SimpleITK: ``settings["transform"]`` in translation, rigid, affine, affine+bspline."""
    s = job["settings"]
    t0 = time.perf_counter()
    f, m = _sitk_read(job["fixed"]), _sitk_read(job["moving"])
    kind = s["transform"]
    # Random samples: 20% (affine) and 10% (B-spline) of the voxels, at most SITK_MAX_SAMPLES at full
    # resolution; a 1 mm brain template would otherwise take 1.7M samples per iteration.
    cap = SITK_MAX_SAMPLES / math.prod(f.GetSize())
    total = _sitk_linear_stage(f, m, kind.split("+")[0], job["seed"], min(0.2, cap))
    if kind.endswith("+bspline"):
        total = _sitk_bspline_stage(f, m, total, job["seed"], s.get("metric", "corr"), min(0.1, cap))
    reg_s = time.perf_counter() - t0
    sitk.WriteTransform(total, str(Path(job["out"]) / "sitk.tfm"))
    return reg_s, lambda: sitk_displacement(total, f)


def run_elastix(job: dict[str, Any]) -> tuple[float, Callable[[], np.ndarray]]:
    """itk-elastix with its default parameter maps ``settings["maps"]`` chained, e.g. rigid, affine, bspline.

    One change from the defaults: the first map initializes at the centres of gravity
    (``AutomaticTransformInitialization``), as ANTs, SimpleITK and stnreg all do; elastix's default
    rigid and affine maps start at the identity, which fails on pairs whose origins differ.
    """
    import itk

    po = itk.ParameterObject.New()
    for i, name in enumerate(job["settings"]["maps"]):
        pm = po.GetDefaultParameterMap(name)
        pm["RandomSeed"] = [str(job["seed"])]
        if i == 0:
            pm["AutomaticTransformInitialization"] = ["true"]
            pm["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
        po.AddParameterMap(pm)
    t0 = time.perf_counter()
    f, m = itk.imread(job["fixed"], itk.F), itk.imread(job["moving"], itk.F)
    _, params = itk.elastix_registration_method(
        f,
        m,
        parameter_object=po,
        output_directory=str(job["out"]),
        log_to_console=False,
        number_of_threads=worker_threads(),
    )
    reg_s = time.perf_counter() - t0  # elastix writes TransformParameters.*.txt and its result image itself

    def field() -> np.ndarray:
        d = itk.transformix_deformation_field(m, params)
        return np.moveaxis(itk.array_from_image(d), -1, 0).astype(np.float32)

    return reg_s, field


RUNNERS: dict[str, Runner] = {"stnreg": run_stnreg, "ants": run_ants, "sitk": run_sitk, "elastix": run_elastix}


# ----------------------------------------------------------------------------- worker processes

RESULT_TAG = "@@stnreg-bench-result "


def _warm_pair(folder: Path, ndim: int) -> tuple[str, str]:
    """A small smooth pair of the given dimension (a shifted blob pattern) as .mha files: (moving, fixed)."""
    shape = (48, 48) if ndim == 2 else (32, 36, 40)
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    paths = []
    for k, shift in enumerate((0.0, 0.08)):
        arr = sum(np.cos(3 * (a - shift * (i + 1))) for i, a in enumerate(axes)) * np.exp(-sum(a**2 for a in axes))
        path = folder / f"warm{ndim}_{k}.mha"
        sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.float32)), str(path))
        paths.append(str(path))
    return paths[1], paths[0]


def _run_one(runner: Runner, job: dict[str, Any], warm_dir: Path, warmed: set[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"id": job["id"]}
    try:
        info = sitk.ImageFileReader()
        info.SetFileName(job["fixed"])
        info.ReadImageInformation()
        ndim = info.GetDimension()
        key = json.dumps([ndim, job["settings"]])
        if key not in warmed:
            moving, fixed = _warm_pair(warm_dir, ndim)
            runner({**job, "moving": moving, "fixed": fixed, "out": tempfile.mkdtemp(dir=warm_dir)})
            warmed.add(key)
        Path(job["out"]).mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _status_mib("VmRSS")
        t0 = time.perf_counter()
        reg_s, field = runner(job)
        seconds = time.perf_counter() - t0
        row.update(seconds=seconds, register_s=reg_s, peak_mib=_status_mib("VmHWM"), base_mib=base)
        np.save(job["disp"], field())
    except Exception as err:  # a method failing on a case is a result to report
        lines = str(err).strip().splitlines() or [""]
        row["error"] = f"{type(err).__name__}: {lines[-1]}"[:200]
        traceback.print_exc()
    return row


def worker_main(library: str) -> None:
    """Serve jobs of one library: a JSON job per stdin line, a tagged JSON row per job on stdout."""
    runner = RUNNERS[library]
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(worker_threads())
    if library == "stnreg":
        import torch

        torch.set_num_threads(worker_threads())
    warmed: set[str] = set()
    with tempfile.TemporaryDirectory() as warm_dir:
        for line in sys.stdin:
            row = _run_one(runner, json.loads(line), Path(warm_dir), warmed)
            print(RESULT_TAG + json.dumps(row), flush=True)


class Worker:
    """A child process serving one library's jobs (see the module docstring), restarted after a timeout."""

    def __init__(self, library: str, log: Path, threads: int = 1) -> None:
        self.library, self.log, self.threads = library, log, threads
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()

    def _start(self) -> subprocess.Popen:
        fh = open(self.log, "a")  # noqa: SIM115 (the child holds it for its lifetime)
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), self.library],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=fh,
            text=True,
            env={**os.environ, **thread_env(self.threads)},
            # transformix writes deformationField.nii into the working directory, whatever it is told
            cwd=self.log.parent,
        )
        self.lines = queue.Queue()

        def pump(stream: Any = proc.stdout, q: queue.Queue = self.lines) -> None:
            # Libraries may print to stdout too: only tagged lines are results.
            for ln in stream:
                if ln.startswith(RESULT_TAG):
                    q.put(ln[len(RESULT_TAG) :])
            q.put(None)

        threading.Thread(target=pump, daemon=True).start()
        return proc

    def run(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One job's row; an ``error`` row if the child dies or takes more than ``timeout`` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            return {"id": job["id"], "error": f"timed out after {timeout:.0f} s"}
        if line is None:
            self.proc = None
            return {"id": job["id"], "error": f"worker died (see {self.log})"}
        return json.loads(line)

    def close(self, kill: bool = True) -> None:
        """Stop the child (the next :meth:`run` starts a new one); ``kill=False`` lets it finish cleanly."""
        if self.proc is None:
            return
        if not kill and self.proc.stdin is not None:
            self.proc.stdin.close()  # the worker's loop ends and its temporary folder goes
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc = None


class Workers:
    """One :class:`Worker` per library, started on first use; a context manager that stops them all."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        self.folder, self.threads = folder, threads
        self.pool: dict[str, Worker] = {}

    def run(self, library: str, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        if library not in self.pool:
            self.pool[library] = Worker(library, self.folder / f"worker-{library}.log", self.threads)
        return self.pool[library].run(job, timeout)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        for w in self.pool.values():
            w.close(kill=False)


if __name__ == "__main__":
    worker_main(sys.argv[1])
