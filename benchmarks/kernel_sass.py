"""Machine code of the 3D affine warp's Triton kernels for an H100/H200, read on any machine.

GPU time is scarce here, and a GPU kernel that is issue- or cache-bound shows it in its machine
code. This script builds every launch variant of :mod:`stnreg.fast.affine_cuda` for sm_90 with
``stnreg.fast.cuda_compile`` (no GPU needed: Triton ships ``ptxas``) and reports per kernel, for
the benchmark volume 160x192x224 with one channel:

- registers per thread;
- the gathers' layout: image columns per thread in one load instruction's warp (Triton gives a
  thread adjacent columns when it can store the output in vectors), and the distinct 128-byte cache
  lines that one warp-wide corner gather touches with the benchmark's θ (simulated from the layout
  over random tiles inside the image; each line is an L1 wavefront);
- SASS instructions per output voxel: instructions inside a loop (a backward branch) count once per
  slice of the program's ``Z_PER``, the rest once per program; branches count as taken;
- loads (``LDG``) per voxel;
- an issue bound for an H200: ``instructions x voxels / 32`` warp instructions at 132 multiprocessors
  x 4 schedulers x 1.98 GHz. It is a floor, not a time: the forward kernel before the layout change
  measured 54.4 µs on an H200 against a bound of 31 µs from its 150 instructions per voxel
  (``sampler-cuda.md``).

With ``--baseline REV`` the same table is built from another revision's ``affine_cuda.py`` (from git)
in the same run, and each cell reads ``before → now``.

    python benchmarks/kernel_sass.py [--baseline REV] [--arch 90]

Writes ``benchmarks/results/kernel-sass.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch
import triton

# Run as a script, benchmarks/ is on the path: the benchmark's θ and results folder are the sampler's.
from sampler import RESULTS, _theta

from stnreg.fast import affine_cuda, cuda_compile

# An H200 SXM: multiprocessors, warp schedulers each, boost clock.
SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.98e9
LINE_BYTES = 128


def _module_at(revision: str) -> ModuleType:
    """``stnreg/fast/affine_cuda.py`` as it was at ``revision``, imported on its own."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{revision}:stnreg/fast/affine_cuda.py"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "affine_cuda_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("affine_cuda_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache
def lines_per_gather(layout: tuple[tuple[int, ...], tuple[int, ...]], samples: int = 2000) -> float:
    """Mean distinct cache lines of one warp-wide corner gather, for tiles laid out as ``layout``
    (``sizePerThread``, ``threadsPerWarp`` over (rows, columns)) under the benchmark's θ."""
    (_, per_thread), (rows, cols) = layout
    d, h, w = cuda_compile.SHAPE
    theta = _theta(1, 3, "cpu")[0].double()
    size = torch.tensor([w, h, d], dtype=torch.float64)
    # A warp's lanes in one instruction: rows apart by one, columns per_thread apart (element 0).
    lane_y = torch.arange(rows).repeat_interleave(cols).double()
    lane_x = (torch.arange(cols) * per_thread).repeat(rows).double()
    rng = random.Random(0)
    total, counted = 0, 0
    while counted < samples:
        x0, y0, z = rng.randrange(w - cols * per_thread), rng.randrange(h - rows), rng.randrange(d)
        uz = torch.full_like(lane_x, (2 * z + 1) / d - 1)
        u = torch.stack([(2 * (x0 + lane_x) + 1) / w - 1, (2 * (y0 + lane_y) + 1) / h - 1, uz])
        pixel = ((theta[:, :3] @ u + theta[:, 3:] + 1) * size[:, None] - 1) / 2
        corner = pixel.floor().long()
        if (corner < 0).any() or (corner >= size[:, None].long() - 1).any():
            continue
        counted += 1
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    flat = ((corner[2] + dz) * h + corner[1] + dy) * w + corner[0] + dx
                    total += len(set((flat * 4 // LINE_BYTES).tolist()))
    return total / (8 * samples)


def analyse(machine: cuda_compile.Machine) -> dict[str, float]:
    """The row of one compiled kernel (see the module docstring)."""
    variant = machine.variant
    issued = cuda_compile.issued(machine)
    loads = cuda_compile.issued(machine, lambda op: "LDG" in op)
    per_program = variant.voxels  # output voxels per thread per program
    per_voxel = issued / per_program
    voxels = torch.Size(cuda_compile.SHAPE).numel()
    return {
        "registers": machine.registers,
        "columns per thread": machine.gather_layout[0][-1],
        "lines per gather": lines_per_gather(machine.gather_layout),
        "instructions per voxel": per_voxel,
        "loads per voxel": loads / per_program,
        "issue bound µs": 1e6 * voxels * per_voxel / 32 / (SMS * SCHEDULERS * CLOCK_HZ),
    }


def table(module: ModuleType, arch: int) -> dict[str, dict[str, float]]:
    rows = {}
    for variant in cuda_compile.variants(module):
        rows[variant.name] = analyse(cuda_compile.compile_variant(variant, arch))
        print(variant.name, {k: round(v, 1) for k, v in rows[variant.name].items()}, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", help="git revision whose affine_cuda.py to compare against")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100/H200)")
    args = parser.parse_args()
    now = table(affine_cuda, args.arch)
    before = table(_module_at(args.baseline), args.arch) if args.baseline else None
    columns = list(next(iter(now.values())))
    formats = {"registers": "{:.0f}", "columns per thread": "{:.0f}", "lines per gather": "{:.1f}"}
    lines = [
        f"# Triton kernels of the 3D affine warp, machine code for sm_{args.arch}",
        "",
        f"Benchmark volume {'x'.join(map(str, cuda_compile.SHAPE))}, one channel; built on {sys.platform} with "
        f"triton {triton.__version__}, no GPU. "
        + (f"Cells read `{args.baseline} → now`." if before else "")
        + " Issue bound: an H200 model, a floor on the time, not a measurement (see kernel_sass.py).",
        "",
        "| kernel | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, row in now.items():
        cells = []
        for column in columns:
            fmt = formats.get(column, "{:.1f}")
            cell = fmt.format(row[column])
            if before and name in before:
                cell = f"{fmt.format(before[name][column])} → {cell}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kernel-sass.md").write_text(text)
    meta = {"arch": args.arch, "baseline": args.baseline, "shape": cuda_compile.SHAPE}
    (RESULTS / "kernel-sass.json").write_text(json.dumps({"meta": meta, "now": now, "before": before}, indent=1))


if __name__ == "__main__":
    main()
