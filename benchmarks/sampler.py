"""Sampler benchmark: stnreg against grid_sample, Kornia and MONAI, in the same run.

For affine and dense warps at (128,1,60,60), (1,1,256,256) and (1,1,160,192,224), times the
forward pass and forward+backward, the peak extra memory of one forward+backward, and the achieved
bytes per second (image read + coordinates read + output written; no coordinates for stnreg's
fused 3D affine warp, which makes them on the fly) against a plain copy of the same number of
bytes. Warp kinds: ``affine`` and ``dense`` (gradients to the image and to the warp's parameters
or coordinates), and ``affine-reg`` / ``dense-reg``, the registration case, where only
the warp's parameters or coordinates need a gradient; ``bspline-reg`` and ``tps-reg`` (3D, the
latter alone with ``--only tps`` at two mid sizes) are the spline cases of registration, the
gradient going to the coefficients or control point targets. Ratios are against ``grid_sample``
measured in the same run; for dense warps it is given ready sampling coordinates, while
``stnreg.warp`` starts from the displacement, so ``grid + u, grid_sample`` times that job done with
torch (a stored identity grid plus the displacement, as a network's warp layer runs it). In 3D,
stnreg runs its numba kernels on the CPU and its Triton kernels on CUDA (``stnreg.fast``);
``STNREG_FAST=0`` would time the reference path instead.

    python benchmarks/sampler.py [--threads 1] [--repeats 5] [--device cpu|cuda] [--quick]
                                 [--only warps|bspline|tps|fused|kernels|lncc|mi]

Writes ``benchmarks/results/sampler[-<device>][-<table>][-<n>threads].md`` and ``.json``, with the fused affine
similarity table (CPU and CUDA), the LNCC and the mutual information tables (CPU). For a lent GPU,
``benchmarks/gpu_check.py`` checks the CUDA path, then the kernel tests and these tables run.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import stnreg

RESULTS = Path(__file__).resolve().parent / "results"
# Tables that take no part of the warp table (--only): their shapes are their own.
STANDALONE = ("fused", "kernels", "lncc", "mi")
SHAPES = [(128, 1, 60, 60), (1, 1, 256, 256), (1, 1, 160, 192, 224)]
QUICK_SHAPES = [(32, 1, 60, 60), (1, 1, 128, 128), (1, 1, 48, 56, 64)]


def _theta(n: int, d: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    theta = torch.eye(d, d + 1).expand(n, -1, -1) + 0.05 * torch.randn(n, d, d + 1, generator=g)
    return theta.to(device)


def _ddf(shape: tuple[int, ...], device: str) -> torch.Tensor:
    """A smooth displacement (N, d, *spatial) in normalized units, a few voxels large."""
    n, _, *sp = shape
    d = len(sp)
    g = torch.Generator().manual_seed(1)
    coarse = torch.randn(n, d, *[4] * d, generator=g) * 0.03
    mode = "bilinear" if d == 2 else "trilinear"
    return F.interpolate(coarse, size=tuple(sp), mode=mode, align_corners=False).to(device)


def methods(kind: str, shape: tuple[int, ...], device: str) -> dict[str, Callable[[], tuple]]:
    """Each entry builds fresh inputs and returns (fn, inputs needing grad, bytes moved by one forward)."""
    n, c, *sp = shape
    d = len(sp)
    image_bytes = n * c * torch.Size(sp).numel() * 4
    grid_bytes = n * torch.Size(sp).numel() * d * 4
    moved = 2 * image_bytes + grid_bytes

    image_grad = not kind.endswith("-reg")
    kind = kind.removesuffix("-reg")

    def image():
        return torch.rand(shape, device=device, requires_grad=image_grad)

    out: dict[str, Callable[[], tuple]] = {}
    fused_moved = moved
    if kind == "affine":

        def gs():
            x, th = image(), _theta(n, d, device).requires_grad_()

            def fn():
                return F.grid_sample(x, F.affine_grid(th, list(shape), align_corners=False), align_corners=False)

            return fn, (x, th)

        def ours():
            x, th = image(), _theta(n, d, device).requires_grad_()
            family = stnreg.Affine(d).to(device)
            return (lambda: stnreg.warp(x, family.with_params(th))), (x, th)

        fused_moved = 2 * image_bytes if d == 3 else moved  # the fused 3D warp reads no coordinates

        def kornia_():
            import kornia.geometry.transform as kt

            x = image()
            # Kornia takes the matrix in pixel coordinates (corner-aligned); its cost does not depend on values.
            m = _theta(n, d, device).requires_grad_()
            if d == 2:
                return (lambda: kt.warp_affine(x, m, tuple(sp), align_corners=False)), (x, m)
            return (lambda: kt.warp_affine3d(x, m, tuple(sp), align_corners=False)), (x, m)

        out = {"grid_sample": gs, "stnreg.warp(Affine)": ours, "kornia.warp_affine": kornia_}
    elif kind == "bspline":
        # Control points about every 8 voxels, as BSpline.for_grid(grid, 8) places them.
        ctrl = tuple(s // 8 + 3 for s in sp)
        spline = stnreg.BSpline(ctrl).to(device)

        def coef():
            g = torch.Generator().manual_seed(2)
            return (0.02 * torch.randn(n, d, *ctrl, generator=g)).to(device).requires_grad_()

        def gs():
            x, c = image(), coef()

            def fn():
                return F.grid_sample(x, spline.with_params(c).sampling_grid(tuple(sp)), align_corners=False)

            return fn, (x, c)

        def dense():
            x, c = image(), coef()
            return (lambda: stnreg.sample(x, spline.with_params(c).sampling_grid(tuple(sp)))), (x, c)

        def ours():
            x, c = image(), coef()
            return (lambda: stnreg.warp(x, spline.with_params(c))), (x, c)

        out = {"grid_sample": gs, "field + stnreg.sample": dense, "stnreg.warp(BSpline)": ours}
        fused_moved = 2 * image_bytes
    elif kind == "tps":
        # 125 control points (5 per axis), what register()'s TPS stage places on a prostate volume.
        cp = stnreg.uniform_control_points((5, 5, 5)) * 0.95
        family = stnreg.ThinPlateSpline(cp).to(device)

        def targets():
            g = torch.Generator().manual_seed(2)
            return (cp + 0.02 * torch.randn(n, 125, 3, generator=g)).to(device).requires_grad_()

        def gs():
            x, t = image(), targets()

            def fn():
                return F.grid_sample(x, family.with_params(t).sampling_grid(tuple(sp)), align_corners=False)

            return fn, (x, t)

        def ours():
            x, t = image(), targets()
            return (lambda: stnreg.warp(x, family.with_params(t))), (x, t)

        out = {"grid_sample": gs, "stnreg.warp(ThinPlateSpline)": ours}
        fused_moved = 2 * image_bytes
    else:

        def coords():
            return stnreg.lattice(tuple(sp), device=device).unsqueeze(0) + torch.movedim(_ddf(shape, device), 1, -1)

        def gs():
            x, g = image(), coords().requires_grad_()
            return (lambda: F.grid_sample(x, g, align_corners=False)), (x, g)

        def gs_flow():
            # What a network's warp layer runs (VoxelMorph's SpatialTransformer, for one): a stored
            # identity grid plus the displacement, then grid_sample.
            x, u = image(), _ddf(shape, device).requires_grad_()
            grid = stnreg.lattice(tuple(sp), device=device).unsqueeze(0)
            return (lambda: F.grid_sample(x, grid + torch.movedim(u, 1, -1), align_corners=False)), (x, u)

        def sampler():
            x, g = image(), coords().requires_grad_()
            return (lambda: stnreg.sample(x, g)), (x, g)

        def ours():
            x, u = image(), _ddf(shape, device).requires_grad_()
            family = stnreg.Displacement(tuple(sp)).to(device)
            return (lambda: stnreg.warp(x, family.with_params(u))), (x, u)

        def monai_():
            from monai.networks.blocks import Warp

            warp = Warp(mode="bilinear", padding_mode="zeros")
            x = image()
            u = stnreg.xyz_to_array_order(stnreg.displacement_normalized_to_index(_ddf(shape, device)))
            u = u.detach().requires_grad_()
            return (lambda: warp(x, u)), (x, u)

        out = {
            "grid_sample": gs,
            "grid + u, grid_sample": gs_flow,
            "stnreg.sample": sampler,
            "stnreg.warp(Displacement)": ours,
            "monai.Warp": monai_,
        }
    fused = ("stnreg.warp(Affine)", "stnreg.warp(BSpline)", "stnreg.warp(ThinPlateSpline)")
    return {k: (v, fused_moved if k in fused else moved) for k, v in out.items()}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], None], device: str, calls: int = 1) -> float:
    """Seconds per call, timing ``calls`` back-to-back calls (sub-millisecond calls need many)."""
    _sync(device)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / calls


def _calls_for(fn: Callable[[], None], device: str, target_s: float = 0.02) -> int:
    return max(1, min(200, int(target_s / max(_time(fn, device), 1e-6))))


def measure(table: dict[str, tuple], device: str, repeats: int) -> dict[str, dict[str, float]]:
    """Median times per method, the methods interleaved round by round so that drift hits all alike."""
    runs = {}
    for name, (build, _) in table.items():
        fn, inputs = build()

        def fwd(fn=fn):
            with torch.no_grad():
                fn()

        def fwd_bwd(fn=fn, inputs=inputs):
            for t in inputs:
                t.grad = None
            fn().sum().backward()

        fwd(), fwd_bwd()  # warm-up
        runs[name] = (fwd, fwd_bwd, _calls_for(fwd, device), _calls_for(fwd_bwd, device))
    times = {name: {"fwd_s": [], "fwd_bwd_s": []} for name in table}
    for _ in range(repeats):
        for name, (fwd, fwd_bwd, n_fwd, n_bwd) in runs.items():
            times[name]["fwd_s"].append(_time(fwd, device, n_fwd))
            times[name]["fwd_bwd_s"].append(_time(fwd_bwd, device, n_bwd))
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def copy_time(nbytes: int, device: str, repeats: int) -> float:
    src = torch.empty(nbytes // 8, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    # A copy of nbytes/2 reads nbytes/2 and writes nbytes/2: nbytes moved in all.
    calls = _calls_for(lambda: dst.copy_(src), device)
    return statistics.median(_time(lambda: dst.copy_(src), device, calls) for _ in range(repeats))


def peak_memory(kind: str, shape: tuple[int, ...], name: str, device: str, threads: int) -> float:
    """Peak extra memory (MiB) of one forward+backward, measured in a fresh process."""
    if device == "cuda":
        build = methods(kind, shape, device)[name][0]
        fn, _ = build()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().sum().backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, __file__, "--probe", kind, ",".join(map(str, shape)), name, "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(kind: str, shape: tuple[int, ...], name: str) -> None:
    """Print the peak RSS growth (MiB) of one forward+backward in this fresh process (Linux)."""
    # A small call first loads lazily compiled kernels (numba, Kornia), which are not the warp's memory.
    small = QUICK_SHAPES[SHAPES.index(shape)] if shape in SHAPES else shape
    warm, _ = methods(kind, small, "cpu")[name][0]()
    warm().sum().backward()
    build = methods(kind, shape, "cpu")[name][0]
    fn, _ = build()
    base = _status_kib("VmRSS")
    # Writing 5 to clear_refs resets the peak-RSS mark, so import-time peaks do not hide the warp's.
    Path("/proc/self/clear_refs").write_text("5")
    fn().sum().backward()
    print((_status_kib("VmHWM") - base) / 1024)


def fused_similarity_table(repeats: int, quick: bool, device: str) -> str:
    """3D affine + MSE/NCC, gradient to the 12 parameters: reference autograd vs the fused kernel.

    Per output voxel the fused kernel makes one pass: 8 gathers, about 40 flops for the position,
    the trilinear value and its spatial gradient, 5 for the statistics, and 9 (MSE) or 27 (NCC,
    three weighted moments) for the 12-parameter accumulation, done per row so that each voxel adds
    ``w ∇v`` and ``w ∇v ux`` only. Such a kernel is bound by the dependent gathers and the scalar
    arithmetic (LLVM does not vectorize the gathers), not by memory bandwidth.
    """
    from stnreg.fast import fused_affine_loss, fused_available
    from stnreg.losses import mse_loss, ncc_loss

    shape = QUICK_SHAPES[2] if quick else SHAPES[2]
    g = torch.Generator().manual_seed(0)
    moving, fixed = torch.rand(shape, generator=g).to(device), torch.rand(shape, generator=g).to(device)
    if not fused_available(moving, "border"):
        return f"\n(fused kernels unavailable on {device}: numba or triton missing)\n"
    theta = (torch.eye(3, 4) + 0.03 * torch.randn(1, 3, 4, generator=g)).to(device).requires_grad_()
    voxels = torch.Size(shape[2:]).numel()
    old = torch.get_num_threads()
    lines = [
        f"\n## Fused 3D affine similarity, gradient to the 12 parameters ({'x'.join(map(str, shape))})\n",
        "| loss | threads | reference ms | fused ms | speed-up | fused Mvoxel/s | gathers/voxel | flops/voxel |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for loss, ref_fn in (("mse", mse_loss), ("ncc", ncc_loss)):
        for threads in (1, 2) if device == "cpu" else (old,):
            torch.set_num_threads(threads)

            def ref(ref_fn=ref_fn):
                theta.grad = None
                grid = F.affine_grid(theta, list(shape), align_corners=False)
                warped = F.grid_sample(moving, grid, padding_mode="border", align_corners=False)
                ref_fn(warped, fixed).backward()

            def fused(loss=loss):
                theta.grad = None
                fused_affine_loss(moving, fixed, theta, loss, "border").backward()

            ref(), fused()
            calls = _calls_for(ref, device)
            t_ref = statistics.median(_time(ref, device, calls) for _ in range(repeats))
            calls = _calls_for(fused, device)
            t_fused = statistics.median(_time(fused, device, calls) for _ in range(repeats))
            flops = 54 if loss == "mse" else 72
            lines.append(
                f"| {loss} | {threads} | {1e3 * t_ref:.1f} | {1e3 * t_fused:.1f} | {t_ref / t_fused:.1f}x | "
                f"{voxels / t_fused / 1e6:.1f} | 8 | {flops} |"
            )
            print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def _peak_bandwidth() -> float | None:
    """The card's nominal memory bandwidth in bytes/s (NVML: 2 x memory clock x bus width), if NVML answers."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
    except Exception:  # no pynvml or a driver that does not report: the copy column still stands
        return None
    return 2 * clock_mhz * 1e6 * bus_bits / 8


# Forward kernel settings the kernel table tries beside the default: (tile rows, tile columns, warps,
# slices per program, streaming stores of the output).
FORWARD_VARIANTS = (
    (8, 64, 4, 1, False),
    (2, 128, 2, 1, False),
    (2, 256, 4, 1, False),
    (8, 128, 8, 1, False),
    (4, 256, 8, 1, False),
    (1, 256, 2, 1, False),
    (4, 128, 4, 1, True),
    (4, 128, 4, 2, False),
    (4, 128, 4, 1, False),
    (4, 128, 4, 8, False),
    (1, 256, 2, 4, True),
    (8, 128, 4, 1, False),
    (8, 128, 4, 4, False),
)


def kernel_table(quick: bool) -> str:
    """CUDA: GPU time of the Triton kernels behind the 3D affine warp, against the card's bandwidth.

    ``triton.testing.do_bench`` (median, L2 flushed before each call) times the kernels alone, so
    that the Python work of a call (argument checks, the finiteness test of θ) does not hide what
    the GPU does; the public ``stnreg.warp`` row is the whole call. Bytes are those a kernel must
    move at least: image read once and output written (forward), image and output gradient read
    (θ gradient), image and fixed image read (fused loss), and twice that when the backward also
    scatters the image gradient. The last rows try other tile shapes, warp counts, slices per
    program and streaming stores of the forward kernel (``FORWARD_VARIANTS``; default:
    ``affine_cuda.TILE_H x TILE_W``, ``NUM_WARPS``, ``FWD_Z_PER`` slices, plain stores) and of the
    fused NCC kernel alone (default: ``RED_TILE_H x RED_TILE_W``, ``Z_PER_LARGE`` slices on this
    volume), to show whether the defaults are the card's best.
    """
    from triton.testing import do_bench

    from stnreg.fast import affine_cuda

    peak = _peak_bandwidth()
    sp = QUICK_SHAPES[2][2:] if quick else SHAPES[2][2:]
    voxels = torch.Size(sp).numel()
    lines = [
        f"\n## Triton kernels of the 3D affine warp, GPU time ({'x'.join(map(str, sp))} per item)\n",
        f"Nominal bandwidth (NVML): {peak / 1e9:.0f} GB/s.\n" if peak else "Nominal bandwidth: NVML unavailable.\n",
        "| batch | kernel | µs | Gvoxel/s | GB/s | % of copy | % of nominal |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]

    def row(n: int, name: str, fn: Callable[[], object], nbytes: int, copy_gbps: float | None) -> float:
        t = do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e-3
        gbps = nbytes / t / 1e9
        of_copy = 100 * gbps / (copy_gbps or gbps)
        nominal = f"{100 * gbps * 1e9 / peak:.0f}" if peak else ""
        lines.append(
            f"| {n} | {name} | {1e6 * t:.1f} | {n * voxels / t / 1e9:.2f} | {gbps:.0f} | {of_copy:.0f} | {nominal} |"
        )
        print(lines[-1], flush=True)
        return gbps

    def batch(n: int) -> None:
        g = torch.Generator().manual_seed(0)
        img = torch.rand(n, 1, *sp, generator=g).cuda()
        fixed = torch.rand(n, 1, *sp, generator=g).cuda()
        theta = _theta(n, 3, "cuda").contiguous()
        go = torch.randn(n, 1, *sp, generator=g).cuda()
        out = torch.empty_like(img)
        nbytes = 2 * img.numel() * 4
        copy_gbps = row(n, "copy (torch)", lambda: out.copy_(img), nbytes, None)
        row(n, "forward", lambda: affine_cuda.forward(img, theta, sp, False), nbytes, copy_gbps)
        row(n, "θ gradient", lambda: affine_cuda.backward(img, theta, go, False, True, False), nbytes, copy_gbps)
        # The scatter also reads and writes the image gradient (atomics in L2, so this is a floor).
        both = functools.partial(affine_cuda.backward, img, theta, go, False, True, True)
        row(n, "θ + image gradient", both, 2 * nbytes, copy_gbps)
        leaf = img.detach().requires_grad_()
        th_leaf = theta.detach().requires_grad_()

        def ref_backward():
            grid = F.affine_grid(th_leaf, [n, 1, *sp], align_corners=False)
            torch.autograd.grad(F.grid_sample(leaf, grid, align_corners=False), (leaf, th_leaf), go)

        # Its forward included: grid_sample's backward needs the grid, which autograd would keep.
        row(n, "affine_grid + grid_sample, fwd + bwd", ref_backward, 2 * nbytes, copy_gbps)
        for loss in ("mse", "ncc"):
            fused = functools.partial(affine_cuda.loss_sums, img, fixed, theta, False, loss == "ncc")
            row(n, f"fused {loss} + θ gradient", fused, nbytes, copy_gbps)

        def ref():
            grid = F.affine_grid(theta, [n, 1, *sp], align_corners=False)
            return F.grid_sample(img, grid, align_corners=False)

        # affine_grid writes the grid and grid_sample reads it back.
        row(n, "affine_grid + grid_sample", ref, nbytes + 2 * n * voxels * 3 * 4, copy_gbps)
        family = stnreg.Affine(3).cuda().with_params(theta)
        row(n, "stnreg.warp(Affine), whole call", lambda: stnreg.warp(img, family), nbytes, copy_gbps)
        for tile_h, tile_w, warps, z_per, stream in FORWARD_VARIANTS:

            def launch(tile_h=tile_h, tile_w=tile_w, warps=warps, z_per=z_per, stream=stream):
                grid = affine_cuda._launch(sp, n, tile_h, tile_w, z_per)
                options = affine_cuda.OPTIONS | {"num_warps": warps}
                args = (img, theta, out, 1, *sp, *sp, False, tile_h, tile_w, z_per, stream)
                affine_cuda._forward_kernel[grid](*args, **options)

            name = f"forward, tile {tile_h}x{tile_w}, {warps} warps"
            name += (f", {z_per} slices" if z_per > 1 else "") + (", streaming stores" if stream else "")
            row(n, name, launch, nbytes, copy_gbps)
        for tile_h, tile_w, z_per, warps in ((4, 64, 8, 4), (4, 128, 16, 4), (2, 128, 16, 2), (4, 64, 32, 4)):
            grid = affine_cuda._launch(sp, n, tile_h, tile_w, z_per)
            width = affine_cuda._STATS + 3 * affine_cuda._MOMENTS
            part = torch.zeros(n, grid[0] * grid[1], width, device=img.device)

            def loss(tile_h=tile_h, tile_w=tile_w, z_per=z_per, warps=warps, grid=grid, part=part):
                options = affine_cuda.OPTIONS | {"num_warps": warps}
                args = (img, fixed, theta, part, 1, *sp, *sp, False, True, tile_h, tile_w, z_per)
                affine_cuda._loss_kernel[grid](*args, **options)

            name = f"fused ncc kernel, tile {tile_h}x{tile_w}, {z_per} slices, {warps} warps"
            row(n, name, loss, nbytes, copy_gbps)

    batch(1)
    batch(4)
    return "\n".join(lines) + "\n"


def _lncc_time(a: torch.Tensor, b: torch.Tensor, fresh: bool, fast: bool, repeats: int) -> float:
    """Median seconds of ``lncc_loss(a, b).backward()``; ``fresh``: a new fixed tensor per call."""
    import os

    from stnreg.losses import lncc_loss

    os.environ["STNREG_FAST"] = "1" if fast else "0"

    def run() -> None:
        a.grad = None
        lncc_loss(a, b.clone() if fresh else b, 9).backward()

    run()
    return statistics.median(_time(run, "cpu") for _ in range(repeats))


def _pairs_by_threads(shapes: list[tuple[int, ...]]):
    """For each shape, a random image pair ``(a, b)`` (``a`` requires grad), with 1 then 2 threads."""
    old = torch.get_num_threads()
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        a = torch.rand(shape, generator=g).requires_grad_()
        b = torch.rand(shape, generator=g)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            yield shape, threads, a, b
    torch.set_num_threads(old)


def lncc_table(repeats: int, quick: bool) -> str:
    """LNCC (window 9) forward + backward with the gradient to the warped image, 3D: the reference
    (box filters by cumulative sums, autograd) against the numba kernels, at the full brain size and
    at its half-resolution pyramid level. The fast path keeps the fixed image's window statistics
    while the same fixed tensor comes back, as in a registration; the ``new fixed`` column passes a
    fresh fixed tensor each call (no kept statistics)."""
    import os

    from stnreg.fast import fast_available

    if not fast_available(torch.zeros(1), "border"):
        return "\n(LNCC kernels unavailable: numba missing)\n"
    shapes = [QUICK_SHAPES[2]] if quick else [SHAPES[2], (1, 1, 80, 96, 112)]
    lines = [
        "\n## LNCC (window 9), forward + backward, gradient to the warped image\n",
        "| shape | threads | reference ms | fast ms | speed-up | fast, new fixed ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for shape, threads, a, b in _pairs_by_threads(shapes):
        times = {
            name: _lncc_time(a, b, fresh, fast, repeats)
            for name, fresh, fast in (("ref", False, False), ("fast", False, True), ("new", True, True))
        }
        os.environ.pop("STNREG_FAST", None)
        lines.append(
            f"| {'x'.join(map(str, shape))} | {threads} | {1e3 * times['ref']:.1f} | {1e3 * times['fast']:.1f} | "
            f"{times['ref'] / times['fast']:.1f}x | {1e3 * times['new']:.1f} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def mi_table(repeats: int, quick: bool) -> str:
    """Mutual information (32 bins), forward + backward with the gradient to the warped image, every
    voxel scored: stnreg's cubic B-spline Parzen histogram (16 scattered entries per voxel, analytic
    gradient) against MONAI's ``GlobalMutualInformationLoss`` with its Gaussian and B-spline windows
    (dense ``voxels x bins`` weights, autograd), at the MR->US ultrasound grid and a half-resolution
    brain."""
    from monai.losses import GlobalMutualInformationLoss

    from stnreg.losses import mi_loss

    shapes = [(1, 1, 22, 30, 20)] if quick else [(1, 1, 44, 59, 41), (1, 1, 80, 96, 112)]
    methods = {
        "stnreg": lambda a, b: mi_loss(a, b, 32, samples=None),
        "MONAI gaussian": GlobalMutualInformationLoss("gaussian", num_bins=32),
        "MONAI b-spline": GlobalMutualInformationLoss("b-spline", num_bins=32),
    }
    lines = [
        "\n## Mutual information (32 bins, every voxel), forward + backward, gradient to the warped image\n",
        "| shape | threads | " + " | ".join(f"{m} ms" for m in methods) + " | stnreg speed-up |",
        "|---|---:|" + "---:|" * (len(methods) + 1),
    ]
    for shape, threads, a, b in _pairs_by_threads(shapes):
        times = {}
        for name, fn in methods.items():

            def run(fn=fn, a=a, b=b) -> None:
                a.grad = None
                fn(a, b).backward()

            run()
            times[name] = statistics.median(_time(run, "cpu") for _ in range(repeats))
        fastest_other = min(t for n, t in times.items() if n != "stnreg")
        lines.append(
            f"| {'x'.join(map(str, shape))} | {threads} | "
            + " | ".join(f"{1e3 * t:.1f}" for t in times.values())
            + f" | {fastest_other / times['stnreg']:.1f}x |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    ap.add_argument(
        "--only",
        choices=["warps", "bspline", "tps", "fused", "kernels", "lncc", "mi"],
        help="run one table (written to sampler-<table>.md)",
    )
    ap.add_argument("--probe", nargs=3, metavar=("KIND", "SHAPE", "NAME"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        kind, shape, name = args.probe
        probe(kind, tuple(int(s) for s in shape.split(",")), name)
        return
    device = args.device
    card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    rows = []
    shapes = [] if args.only in STANDALONE else QUICK_SHAPES if args.quick else SHAPES
    if args.only == "tps":
        # The dense TPS basis (voxels x 125 floats, kept for the backward) rules out the full brain.
        shapes = [QUICK_SHAPES[2]] if args.quick else [(1, 1, 48, 56, 64), (1, 1, 80, 96, 112)]
    for shape in shapes:
        # Splines only as in registration: 3D, no image gradient (the on-the-fly kernels' case).
        kinds = ("affine", "dense", "affine-reg", "dense-reg") + (("bspline-reg",) if len(shape) == 5 else ())
        if args.only in ("bspline", "tps"):
            kinds = (f"{args.only}-reg",) if len(shape) == 5 else ()
        for kind in kinds:
            table = methods(kind, shape, device)
            copy_s = copy_time(next(iter(table.values()))[1], device, args.repeats)
            timed = measure(table, device, args.repeats)
            base = timed["grid_sample"]
            for name, (_, moved) in table.items():
                r = timed[name]
                mem = peak_memory(kind, shape, name, device, args.threads)
                rows.append(
                    {
                        "shape": "x".join(map(str, shape)),
                        "warp": kind,
                        "method": name,
                        "fwd_ms": 1e3 * r["fwd_s"],
                        "fwd_bwd_ms": 1e3 * r["fwd_bwd_s"],
                        "fwd_ratio": r["fwd_s"] / base["fwd_s"],
                        "fwd_bwd_ratio": r["fwd_bwd_s"] / base["fwd_bwd_s"],
                        "peak_mib": mem,
                        "fwd_gbps": moved / r["fwd_s"] / 1e9,
                        "copy_gbps": moved / copy_s / 1e9,
                    }
                )
                print(
                    f"{rows[-1]['shape']:>15} {kind:6} {name:27} fwd {rows[-1]['fwd_ms']:9.2f} ms "
                    f"({rows[-1]['fwd_ratio']:.2f}x)  fwd+bwd {rows[-1]['fwd_bwd_ms']:9.2f} ms "
                    f"({rows[-1]['fwd_bwd_ratio']:.2f}x)  peak {mem:8.1f} MiB",
                    flush=True,
                )
    header = (
        f"# Sampler benchmark ({device}: {card}, torch {torch.__version__}, {args.threads} thread(s), "
        f"median of {args.repeats} samples, each at least ~20 ms of back-to-back calls)\n\n"
        "Ratios are against `grid_sample` (with `affine_grid` for affine warps) in the same run; "
        "GB/s counts image read + coordinates read + output written in the forward pass, next to a "
        "plain copy of the same bytes.\n\n"
        "| shape | warp | method | fwd ms | ratio | fwd+bwd ms | ratio | peak MiB | fwd GB/s | copy GB/s |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = "" if args.only in STANDALONE else header
    body += "".join(
        f"| {r['shape']} | {r['warp']} | {r['method']} | {r['fwd_ms']:.2f} | {r['fwd_ratio']:.2f} | "
        f"{r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_ratio']:.2f} | {r['peak_mib']:.1f} | {r['fwd_gbps']:.2f} | "
        f"{r['copy_gbps']:.1f} |\n"
        for r in rows
    )
    if args.only in (None, "fused"):
        body += fused_similarity_table(args.repeats, args.quick, device)
    if device == "cuda" and args.only in (None, "kernels"):
        body += kernel_table(args.quick)
    if device == "cpu" and args.only in (None, "lncc"):
        body += lncc_table(args.repeats, args.quick)
    if device == "cpu" and args.only in (None, "mi"):
        body += mi_table(args.repeats, args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "sampler" if device == "cpu" else f"sampler-{device}"
    if args.only:
        stem += f"-{args.only}"
    if args.quick:
        stem += "-quick"
    if device == "cpu" and args.threads != 1:
        stem += f"-{args.threads}threads"
    title = f"# Sampler benchmark, {args.only} ({device}: {card}, torch {torch.__version__})\n" if args.only else ""
    (RESULTS / f"{stem}.md").write_text(title + body)
    meta = {"device": device, "card": card, "torch": torch.__version__, "threads": args.threads}
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(title + body)


if __name__ == "__main__":
    main()
