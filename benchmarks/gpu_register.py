"""GPU check of the registration pipeline: the same pair on CUDA and on the CPU, same settings.

    python benchmarks/gpu_register.py --data DIR   # DIR holds m, f, ml, fl (.nii.gz, .nii, .mha, ...)

m and f are the moving and fixed images, ml and fl their label maps, in any format
:func:`stnreg.read_image` reads.

Prints Dice, folding and time per device and pipeline; writes ``benchmarks/results/gpu_register.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import stnreg

RESULTS = Path(__file__).resolve().parent / "results"


def _find(folder: Path, stem: str) -> Path:
    """The one file in ``folder`` named ``stem`` with any extension."""
    found = [p for p in sorted(folder.iterdir()) if p.name.split(".")[0] == stem]
    if len(found) != 1:
        raise SystemExit(f"{folder}: need exactly one file named {stem}.<ext>, found {[p.name for p in found]}")
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    args = ap.parse_args()
    d = args.data
    moving, fixed = _find(d, "m"), _find(d, "f")
    lab = [stnreg.read_image(_find(d, n), label=True) for n in ("ml", "fl")]
    lab = tuple(stnreg.Image(x.data[:1], x.grid, x.name) for x in lab)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    lines = [f"# Registration on {card} vs CPU (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)", ""]
    lines += ["| pipeline | device | dice before | dice after | folding % | seconds |", "|---|---|---:|---:|---:|---:|"]
    for pipeline, loss in (("rigid+affine", "lncc"), ("rigid+affine+svf", "lncc"), ("rigid+affine+svf", "mi")):
        for dev in ("cuda", "cpu"):
            if dev == "cuda" and not torch.cuda.is_available():
                continue
            stnreg.register(moving, fixed, "affine", progress=False, device=dev)  # warm-up
            t = time.perf_counter()
            r = stnreg.register(moving, fixed, pipeline, loss, labels=lab, progress=False, device=dev)
            secs = time.perf_counter() - t
            fold = r.metrics.get("jacobian", {}).get("folding_percent", 0.0)
            row = f"| {pipeline} / {loss} | {dev} | {r.metrics['dice_before']:.3f} | {r.metrics['dice_after']:.3f} "
            lines.append(row + f"| {fold:.3f} | {secs:.2f} |")
            print(lines[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu_register.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
