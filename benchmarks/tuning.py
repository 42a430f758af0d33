"""Engine variants on the prostate TUNING pairs: the measurements behind stnreg's defaults.

Defaults are chosen here and reported elsewhere: the pairs are the ``tuning`` set of
``benchmarks/pairwise.py`` (chained inter-subject MR pairs, gland Dice), never its ``report`` set.
Each variant is ``stnreg.register`` with one pipeline (one thread, registration call only, after an
untimed warm-up that compiles the kernels); Dice is the gland's (label channel 0) after the
registration, and the table gives the mean over pairs with [min, max].

    python benchmarks/tuning.py [--data DIR] [--variants "NAME;NAME..."]

Writes ``benchmarks/results/tuning.md`` and ``.json`` (``--out`` changes the name).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import stnreg
from stnreg.register import Stage

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(os.environ.get("STNREG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TUNING = ["25", "26", "00", "01", "03", "08", "09", "11"]  # = pairwise.PROSTATE_SETS["tuning"]


def _lncc_matrix() -> list[Stage]:
    return [Stage("rigid", loss="lncc"), Stage("affine", loss="lncc")]


VARIANTS: dict[str, Any] = {
    "rigid+affine (NCC, default)": lambda: "rigid+affine",
    "rigid+affine (LNCC)": _lncc_matrix,
    "rigid+affine (MI)": lambda: [Stage("rigid", loss="mi"), Stage("affine", loss="mi")],
    "rigid+affine+svf (NCC matrix, default)": lambda: "rigid+affine+svf",
    "rigid+affine+svf (LNCC matrix)": lambda: [*_lncc_matrix(), Stage("svf")],
    "rigid (NCC) + affine (LNCC)": lambda: ["rigid", Stage("affine", loss="lncc")],
    "rigid (NCC) + affine (LNCC) + svf": lambda: ["rigid", Stage("affine", loss="lncc"), "svf"],
    "rigid+affine+syn (NCC matrix)": lambda: "rigid+affine+syn",
    "rigid+affine+syn (LNCC matrix)": lambda: [*_lncc_matrix(), Stage("syn")],
    "rigid+affine+syn lr 0.5 (LNCC matrix)": lambda: [*_lncc_matrix(), Stage("syn", lr=0.5)],
    "rigid+affine+syn smooth 2/1 (LNCC matrix)": lambda: [*_lncc_matrix(), Stage("syn", smooth=2.0, smooth_total=1.0)],
}


def _case(root: Path, case_id: str, kind: str) -> str:
    return str(next(root.glob(f"*/{kind}/case0000{case_id}.nii*")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--variants", default=";".join(VARIANTS), help="variant names separated by ;")
    ap.add_argument("--out", default="tuning", help="results file name (without suffix)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = args.data / "prostate" / "unpaired"
    pairs = list(itertools.pairwise(TUNING))
    files = [
        (_case(root, a, "images"), _case(root, b, "images"), _case(root, a, "labels"), _case(root, b, "labels"))
        for a, b in pairs
    ]
    stnreg.register(files[0][0], files[0][1], "rigid+affine+svf", progress=False, device="cpu")  # warm-up
    names = [v.strip() for v in args.variants.split(";") if v.strip()]
    rows = []
    t_all = time.perf_counter()
    with tqdm(total=len(names) * len(files), desc="tuning") as bar:
        for name in names:
            for (a, b), (m, f, lm, lf) in zip(pairs, files, strict=True):
                t0 = time.perf_counter()
                r = stnreg.register(m, f, VARIANTS[name](), "lncc", labels=(lm, lf), progress=False, device="cpu")
                seconds = time.perf_counter() - t0
                folding = r.metrics.get("jacobian", {}).get("folding_percent", 0.0)
                rows.append(
                    {"variant": name, "pair": f"{a}->{b}", "dice": r.metrics["dice_after"], "folding": folding,
                     "seconds": seconds, "dice_before": r.metrics["dice_before"]}
                )  # fmt: skip
                bar.update()
    lines = [
        "# Engine variants on the prostate tuning pairs (CPU, one thread)",
        "",
        f"`python benchmarks/tuning.py{' --variants ...' if len(names) < len(VARIANTS) else ''}`; "
        f"{time.perf_counter() - t_all:.0f} s in all; torch {torch.__version__}. "
        f"Pairs {', '.join(f'{a}->{b}' for a, b in pairs)} (the tuning set of `benchmarks/pairwise.py`); gland "
        "Dice after registration, mean [min, max] over pairs; seconds: the `stnreg.register` call. These pairs "
        "choose the defaults; `benchmarks/pairwise.py --set report` reports them on other pairs.",
        "",
        "| variant | Dice | folding % (max) | seconds |",
        "|---|---:|---:|---:|",
    ]
    before = [r["dice_before"] for r in rows if r["variant"] == names[0]]
    lines.append(f"| (before) | {np.mean(before):.3f} [{min(before):.3f}, {max(before):.3f}] |  |  |")
    for name in names:
        d = [r["dice"] for r in rows if r["variant"] == name]
        s = [r["seconds"] for r in rows if r["variant"] == name]
        fo = max(r["folding"] for r in rows if r["variant"] == name)
        lines.append(f"| {name} | {np.mean(d):.3f} [{min(d):.3f}, {max(d):.3f}] | {fo:.3f} | {np.mean(s):.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text(text)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
