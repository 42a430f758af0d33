"""Choosing the shipped ``synth`` network and its defaults on the prostate TUNING pairs (never the report set).

Candidates: the checkpoints of the GPU runs (``--runs``, the folder ``benchmarks/synth_gpu.sh``
fills: ``svf``, ``affine_svf``, ``svf_cross``), the network alone; then the shipped model with and
without ``affine_init`` (rigid+affine before the network), each alone and with ``--refine`` steps.
Pairs and scoring are ``benchmarks/pairwise.py``'s (``--set tuning``: 7 chained pairs, gland Dice of
label channel 0, % folded voxels); seconds are :func:`stnreg.learn.register_with_model`'s
``timings["total_s"]`` on one thread (reading and resampling included, writing excluded).

    python benchmarks/synth_select.py --runs runs/gpu

Writes ``benchmarks/results/synth-select.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pairwise import case_prostate, score

import stnreg
from stnreg.learn import register_with_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = Path(os.environ.get("STNREG_DATA", ROOT.parent / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--runs", type=Path, default=None, help="checkpoints <name>.ckpt of benchmarks/synth_gpu.sh")
    ap.add_argument("--refine", type=int, default=50)
    ap.add_argument("--out", default="synth-select")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = case_prostate(args.data, Path("."), argparse.Namespace(set="tuning", pairs=7))
    methods: dict[str, dict] = {}
    if args.runs:
        for name in ("svf", "affine_svf", "svf_cross"):
            if (args.runs / f"{name}.ckpt").is_file():
                methods[f"GPU run {name}, network"] = {"model": str(args.runs / f"{name}.ckpt")}
    for init in (False, True):
        for refine in (0, args.refine):
            label = f"shipped synth{', affine_init' if init else ''}{f', refine {refine}' if refine else ''}"
            methods[label] = {"model": "synth", "affine_init": init, "refine": refine}
    rows = []
    for case in cases:
        fixed = stnreg.read_image(case["fixed"])
        before = score(case, torch.zeros(fixed.ndim, *fixed.grid.shape))
        rows.append({"case": case["case"], "method": "(before)", "dice": before["dice"], "seconds": 0.0})
        for name, m in methods.items():
            res = register_with_model(
                m["model"],
                case["moving"],
                case["fixed"],
                m.get("refine", 0),
                device="cpu",
                progress=False,
                affine_init=m.get("affine_init", False),
            )
            r = score(case, res.displacement())
            rows.append({"case": case["case"], "method": name, "seconds": res.timings["total_s"], **r})
            print(f"{case['case']:18} {name:40} Dice {r['dice']:.3f} {res.timings['total_s']:.2f} s", flush=True)
    lines = [
        "# Choosing the shipped synth network on the prostate tuning pairs",
        "",
        f"`python benchmarks/synth_select.py{' --runs ' + str(args.runs) if args.runs else ''}`; CPU, 1 thread, "
        f"torch {torch.__version__}; {len(cases)} pairs of `pairwise.py --set tuning`. Seconds: the "
        "registration call (reading and resampling included, writing excluded).",
        "",
        "| method | gland Dice (mean) | [min, max] | % folding (max) | seconds (mean) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ["(before)", *methods]:
        rs = [r for r in rows if r["method"] == name]
        d = [r["dice"] for r in rs]
        fold = max(r.get("jac_folding_percent", 0.0) for r in rs)
        secs = np.mean([r["seconds"] for r in rs])
        lines.append(f"| {name} | {np.mean(d):.3f} | [{min(d):.3f}, {max(d):.3f}] | {fold:.3f} | {secs:.2f} |")
    lines += ["", "## Per pair", "", "| case | method | gland Dice | seconds |", "|---|---|---:|---:|"]
    lines += [f"| {r['case']} | {r['method']} | {r['dice']:.3f} | {r['seconds']:.2f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text(text)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
