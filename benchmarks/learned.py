"""Learned registration benchmark: a trained network (with and without refinement) against instance
optimization (stnreg) and ANTs SyN on held-out pairs, in the same run.

Cases (data from ``--data``, default ``../shared/data``):

* ``oasis2d``: ``oasis2d/oasis2d_100x128x128.npy``; trained with ``configs/oasis2d_svf.yaml`` on
  subjects 0-79, tested on the pairs ``(80+i -> 80+(i+1) mod 20)`` of the other 20. The slices have
  no labels: tissue classes are derived per image by a 3-class multi-Otsu threshold
  (``skimage.filters.threshold_multiotsu``) of the brain voxels (intensity > 2% of the maximum),
  labels 1 (CSF), 2 (grey matter), 3 (white matter); Dice and HD95 average the three. 1 mm pixels.
* ``prostate``: ``prostate/unpaired``; trained with ``configs/prostate_affine_svf.yaml`` on the 14
  training cases (all ordered pairs, gland Dice as a weak loss), tested on the ordered pairs of the
  held-out test cases; gland Dice and HD95 (mm).

Methods, scored by one code path (``benchmarks/pairwise.py``'s ``score``: Dice, HD95, % folding,
SDlogJ, NCC): ``network`` (one forward pass), ``network+refine`` (``--refine`` iterations of stnreg's
instance optimization, an SVF composed after the prediction), ``stnreg instance`` (:func:`stnreg.register`, the same
transform family, from scratch) and ``ANTs SyN`` (antspyx defaults; skipped when not installed).
Times are the registration call on one thread: stnreg's own ``timings["total_s"]`` (loading and
resampling included, metrics and writing excluded), ANTs' in its worker process
(``benchmarks/baselines.py``, seed 1: reading the files to its transforms, which ANTs writes as it
finishes). Not quite the same clock: ``pairwise.py`` times every method from reading to written
outputs. Training time and peak memory (RSS growth)
are measured around ``Trainer.fit`` on ``--train-threads`` threads.

* ``synth``: the shipped network trained on synthetic pairs only (``--model synth``; never trained
  here, never shown a real scan): the prostate REPORT set, MR -> ultrasound (refinement and
  instance optimization with mutual information) and test_scan -> MNI152, as in
  ``benchmarks/pairwise.py``.

    python benchmarks/learned.py [--cases oasis2d,prostate,synth] [--steps N] [--refine 50] [--checkpoint-dir DIR]

Writes ``benchmarks/results/learned.md`` and ``.json``; checkpoints go to ``--checkpoint-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import lightning as L
import nibabel as nib
import numpy as np
import torch
import yaml
from skimage.filters import threshold_multiotsu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import Workers, job_name
from pairwise import case_mni, case_mrus, case_prostate, score

import stnreg
from stnreg.learn import PairDataModule, RegistrationTask, load_task, register_with_model
from stnreg.learn.task import MODEL_DIR, SHIPPED

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = Path(os.environ.get("STNREG_DATA", ROOT.parent / "shared" / "data"))
CONFIGS = {"oasis2d": ROOT / "configs" / "oasis2d_svf.yaml", "prostate": ROOT / "configs" / "prostate_affine_svf.yaml"}
INSTANCE = {"oasis2d": "svf", "prostate": "rigid+affine+svf", "synth": "rigid+affine+svf"}


def _label_of(image: Path) -> str:
    """The label file of a prostate image (``.../images/X.nii.gz`` -> ``.../labels/X.nii*``)."""
    return str(next((image.parent.parent / "labels").glob(image.name.split(".")[0] + ".nii*")))


def before_row(case: dict) -> dict:
    """The scores of the unregistered pair (a zero displacement)."""
    fixed = stnreg.read_image(case["fixed"])
    return score(case, torch.zeros(fixed.ndim, *fixed.grid.shape))


def measured(fn):
    """``(fn(), seconds, peak RSS growth in MiB)``; the growth is 0 unless ``fn`` sets a new peak."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    out = fn()
    secs = time.perf_counter() - t
    return out, secs, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def ants_syn(workers: Workers, case: dict, tmp: Path) -> tuple[torch.Tensor | None, dict]:
    """ANTs SyN (antspyx defaults, seed 1) in its worker process (``benchmarks/baselines.py``): the
    displacement on the fixed grid and the worker's row (``seconds``: reading to written outputs)."""
    jid = job_name(case["case"], "SyN", 1)
    job = {
        "id": jid,
        "moving": case["moving"],
        "fixed": case["fixed"],
        "seed": 1,
        "settings": {"type": "SyN"},
        "out": str(tmp / "out" / jid),
        "disp": str(tmp / f"{jid}.npy"),
    }
    row = workers.run("ants", job, 3600.0)
    if "error" in row:
        return None, row
    return torch.from_numpy(np.load(job["disp"])), row


def tissue_labels(img: np.ndarray) -> np.ndarray:
    """CSF/GM/WM labels 1/2/3 by 3-class multi-Otsu of the brain voxels (> 2% of the maximum)."""
    brain = img > 0.02 * img.max()
    t = threshold_multiotsu(img[brain], classes=3)
    return (brain * (1 + np.digitize(img, t))).astype(np.uint8)


def oasis_cases(data: Path, tmp: Path, n: int) -> list[dict]:
    vol = np.load(data / "oasis2d" / "oasis2d_100x128x128.npy")
    out = []
    for i in range(min(n, 20)):
        a, b = 80 + i, 80 + (i + 1) % 20
        paths = {}
        for role, k in (("moving", a), ("fixed", b)):
            # (H, W) array -> NIfTI with x = columns, y = rows, as read_image expects.
            nib.save(nib.Nifti1Image(vol[k].T.astype(np.float32), np.eye(4)), tmp / f"oasis{k}.nii.gz")
            nib.save(nib.Nifti1Image(tissue_labels(vol[k]).T, np.eye(4)), tmp / f"oasis{k}_labels.nii.gz")
            paths[role] = str(tmp / f"oasis{k}.nii.gz")
            paths[f"{role}_labels"] = str(tmp / f"oasis{k}_labels.nii.gz")
        out.append({"case": f"oasis2d {a}->{b}", "labels": [1, 2, 3], **paths})
    return out


def prostate_cases(data: Path, tmp: Path, n: int) -> list[dict]:
    root = data / "prostate" / "unpaired" / "test"
    imgs = sorted((root / "images").glob("*.nii*"))
    out = []
    for m in imgs:
        for f in imgs:
            if m != f and len(out) < n:
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


def synth_cases(data: Path, tmp: Path, n: int) -> list[dict]:
    """Real pairs for the shipped ``synth`` network, which trained on synthetic pairs only: the
    prostate REPORT set (``pairwise.py``'s chained pairs), MR -> ultrasound and test_scan -> MNI152."""
    ns = argparse.Namespace(set="report", pairs=n)
    return case_prostate(data, tmp, ns) + case_mrus(data, tmp, ns) + case_mni(data, tmp, ns)


CASES = {"oasis2d": oasis_cases, "prostate": prostate_cases, "synth": synth_cases}


def train(case: str, data: Path, steps: int | None, threads: int, ckpt_dir: Path) -> tuple[Path, dict]:
    """Train from the case's config (``steps`` overrides ``max_steps``); return the checkpoint and costs."""
    cfg = yaml.safe_load(CONFIGS[case].read_text())
    os.environ.setdefault("STNREG_DATA", str(data))
    L.seed_everything(cfg.get("seed_everything", 0))
    task = RegistrationTask(**cfg["model"]["init_args"])
    dm = PairDataModule(**cfg["data"]["init_args"])
    tr_cfg = cfg["trainer"]
    max_steps = steps or tr_cfg["max_steps"]
    out = ckpt_dir / case
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        val_check_interval=min(tr_cfg["val_check_interval"], max_steps),
        check_val_every_n_epoch=None,
        logger=L.pytorch.loggers.CSVLogger(out, name="csv"),
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=out, save_last=True, save_top_k=0)],
        log_every_n_steps=tr_cfg.get("log_every_n_steps", 50),
        enable_progress_bar=True,
    )
    torch.set_num_threads(threads)
    _, secs, mem = measured(lambda: trainer.fit(task, dm))
    torch.set_num_threads(1)
    return out / "last.ckpt", {"steps": max_steps, "train_s": secs, "train_peak_mib": mem, "threads": threads}


def batched_forward(task: RegistrationTask, cases: list[dict]) -> dict:
    """Amortized inference: one no-grad forward pass over all test pairs at once, per pair (best of 3)."""
    from stnreg.learn import normalize_intensity
    from stnreg.learn.data import _resize

    shape = tuple(task.hparams.input_shape)

    def load(path: str) -> torch.Tensor:
        return normalize_intensity(
            _resize(stnreg.read_image(path).data.float().mean(0, keepdim=True)[None], shape, "linear")
        )

    m = torch.cat([load(c["moving"]) for c in cases])
    f = torch.cat([load(c["fixed"]) for c in cases])
    best = math.inf
    with torch.no_grad():
        for _ in range(3):
            t = time.perf_counter()
            task.net(m, f, warp_output=False)
            best = min(best, time.perf_counter() - t)
    return {"batched_pairs": len(cases), "batched_forward_s_per_pair": best / len(cases)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cases", default="oasis2d,prostate")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the config's max_steps)")
    ap.add_argument("--refine", type=int, default=50, help="refinement steps of network+refine")
    ap.add_argument("--pairs", type=int, default=20, help="test pairs per case at most")
    ap.add_argument("--train-threads", type=int, default=2)
    ap.add_argument("--checkpoint-dir", type=Path, default=ROOT / "runs" / "learned-benchmark")
    ap.add_argument("--reuse", action="store_true", help="use existing checkpoints instead of training")
    ap.add_argument("--out", default="learned")
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        import ants  # noqa: F401

        has_ants = True
    except ImportError:
        print("antspyx is not installed: ANTs SyN rows skipped (pip install antspyx)", file=sys.stderr)
        has_ants = False
    rows, training = [], {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmpd, Workers(Path(tmpd), 1) as workers:
        for case_name in args.cases.split(","):
            ckpt = args.checkpoint_dir / case_name / "last.ckpt"
            costs = args.checkpoint_dir / case_name / "training.json"
            if case_name == "synth":
                # Shipped, trained on a GPU by benchmarks/synth_gpu.sh (results/learned-synth.md).
                ckpt = "synth"
                shipped = torch.load(MODEL_DIR / SHIPPED["synth"], map_location="cpu", weights_only=False)
                training[case_name] = {"steps": shipped["global_step"], "trained": "GPU"}
            elif args.reuse and ckpt.exists():
                training[case_name] = json.loads(costs.read_text()) if costs.exists() else {}
            else:
                ckpt, training[case_name] = train(
                    case_name, args.data, args.steps, args.train_threads, args.checkpoint_dir
                )
                costs.write_text(json.dumps(training[case_name]))
            task = load_task(ckpt)
            cases = CASES[case_name](args.data, Path(tmpd), args.pairs)
            training.setdefault(case_name, {}).update(batched_forward(task, cases))
            for case in cases:
                labels = (case["moving_labels"], case["fixed_labels"])
                before = before_row(case)
                rows.append({"case": case["case"], "method": "(before)", "seconds": 0.0, **before})
                runs = {
                    "network": lambda c=case, lab=labels, task=task: register_with_model(
                        task, c["moving"], c["fixed"], 0, labels=lab, device="cpu", progress=False, loss=c.get("loss")
                    ),
                    f"network+refine{args.refine}": lambda c=case, lab=labels, task=task: register_with_model(
                        task,
                        c["moving"],
                        c["fixed"],
                        args.refine,
                        labels=lab,
                        device="cpu",
                        progress=False,
                        loss=c.get("loss"),
                    ),
                    "stnreg instance": lambda c=case, family=INSTANCE[case_name]: stnreg.register(
                        c["moving"], c["fixed"], family, c.get("loss", "lncc"), progress=False, device="cpu"
                    ),
                }
                for name, fn in runs.items():
                    res, _, mem = measured(fn)
                    r = score(case, res.displacement())
                    rows.append(
                        {"case": case["case"], "method": name, "seconds": res.timings["total_s"], "peak_mib": mem, **r}
                    )
                    print(f"{case['case']:20} {name:22} {res.timings['total_s']:7.3f}s {r}", flush=True)
                if has_ants:
                    disp, row = ants_syn(workers, case, Path(tmpd))
                    if disp is None:
                        print(f"{case['case']:20} ANTs SyN failed: {row['error']}", file=sys.stderr)
                    else:
                        r = score(case, disp)
                        secs, mem = row["seconds"], row["peak_mib"] - row["base_mib"]
                        rows.append({"case": case["case"], "method": "ANTs SyN", "seconds": secs, "peak_mib": mem, **r})
                        print(f"{case['case']:20} {'ANTs SyN':22} {secs:7.3f}s {r}", flush=True)
                (RESULTS / f"{args.out}.partial.json").write_text(json.dumps(rows, indent=1, default=float))
    report = render(rows, training, args)
    (RESULTS / f"{args.out}.md").write_text(report)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"rows": rows, "training": training}, indent=1, default=float))
    (RESULTS / f"{args.out}.partial.json").unlink(missing_ok=True)
    print(report)


def render(rows: list[dict], training: dict, args: argparse.Namespace) -> str:
    cols = ["dice", "hd95", "ncc", "jac_folding_percent", "jac_sdlogj", "seconds"]

    def fmt(v: object) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [
        f"# Learned registration benchmark (CPU, inference and baselines on 1 thread, torch {torch.__version__})",
        "",
        "Method and scoring: see the docstring of `benchmarks/learned.py`. oasis2d Dice is over tissue classes "
        "derived by 3-class multi-Otsu of each slice (CSF/GM/WM); prostate Dice is the gland. `seconds` is the "
        "whole call for one pair (reading, resampling, network, world conversion, warping); the batched forward "
        "column below is the network alone over all test pairs at once.",
        "",
        "## Training",
        "",
        "| case | steps | threads | time (s) | peak RSS growth (MiB) | batched forward per pair (ms, 1 thread) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case, t in training.items():
        missing = "(GPU: learned-synth.md)" if t.get("trained") == "GPU" else "(reused)"
        cost = [f"{t[k]:.0f}" if k in t else missing for k in ("steps", "threads", "train_s", "train_peak_mib")]
        lines.append(f"| {case} | " + " | ".join(cost) + f" | {1000 * t['batched_forward_s_per_pair']:.2f} |")
    lines += [
        "",
        "## Means per case family",
        "",
        "| family | method | " + " | ".join(cols) + " | speed-up vs SyN |",
        "|---|---|" + "---:|" * (len(cols) + 1),
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"].split(" ")[0], r["method"]), []).append(r)
    for (fam, meth), rs in groups.items():
        means = {c: float(np.nanmean([r.get(c, math.nan) for r in rs])) for c in cols}
        syn = groups.get((fam, "ANTs SyN"))
        speed = ""
        if syn and meth != "(before)" and means["seconds"] > 0:
            speed = f"{np.mean([r['seconds'] for r in syn]) / means['seconds']:.1f}x"
        lines.append(f"| {fam} | {meth} | " + " | ".join(fmt(means[c]) for c in cols) + f" | {speed} |")
    lines += ["", "## Per pair", "", "| case | method | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['case']} | {r['method']} | " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
