"""GPU check: every family and sampler mode on CUDA agrees with the CPU reference.

One short script for a scarce GPU: run it, ``pytest tests/test_fast_cuda.py`` (the Triton kernels
against grid_sample on the card), then ``benchmarks/sampler.py --device cuda`` and
``benchmarks/overhead.py --device cuda`` (a call's host work, where a GPU waits on Python). 3D matrix warps
and the fused affine similarity run stnreg's Triton kernels on CUDA and its numba kernels on the
CPU, so the rows below compare the two fast paths as well.
Prints one line per check and exits non-zero on any disagreement; writes
``benchmarks/results/gpu_check.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import stnreg
from stnreg import BSpline, Displacement, StationaryVelocity, ThinPlateSpline, uniform_control_points

RESULTS = Path(__file__).resolve().parent / "results"


def family(name: str, ndim: int, shape: tuple[int, ...]) -> stnreg.ParametricTransform:
    if name == "tps":
        return ThinPlateSpline(uniform_control_points((3,) * ndim, 0.8))
    if name == "bspline":
        return BSpline((6,) * ndim)
    if name == "displacement":
        return Displacement(shape)
    if name == "svf":
        return StationaryVelocity(shape)
    return stnreg.FAMILIES[name](ndim)


def _fused_losses(lines: list[str], g: torch.Generator) -> int:
    """3D affine + MSE/NCC in one pass (``fused_affine_loss``): CUDA against CPU, value and θ gradient."""
    from stnreg.fast import fused_affine_loss

    failures = 0
    moving, fixed = torch.rand(2, 1, 30, 34, 38, generator=g), torch.rand(2, 1, 28, 32, 36, generator=g)
    theta = torch.eye(3, 4) + 0.05 * torch.randn(2, 3, 4, generator=g)
    for loss in ("mse", "ncc"):
        results = []
        for dev in ("cpu", "cuda"):
            th = theta.detach().to(dev).requires_grad_()
            value = fused_affine_loss(moving.to(dev), fixed.to(dev), th, loss, "border")
            value.backward()
            results.append((value.detach().cpu(), th.grad.cpu()))
        diff = float((results[0][0] - results[1][0]).abs())
        grad = _relative(results[1][1], results[0][1])
        label = f"3D fused affine {loss}, value / θ-gradient (relative)"
        failures += _pair_row(lines, label, (diff, 1e-5), (grad, 1e-4))
    return failures


def _relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest entry."""
    return float((ours - ref).abs().max() / ref.abs().max())


def _pair_row(lines: list[str], label: str, *checks: tuple[float, float]) -> int:
    """Append a row of ``(difference, tolerance)`` checks; 1 if any difference is over its tolerance."""
    ok = all(diff < tol for diff, tol in checks)
    values = " / ".join(f"{diff:.2e}" for diff, _ in checks)
    lines.append(f"| {label} | {values}{'' if ok else ' FAIL'} |")
    return int(not ok)


def _image_gradient(lines: list[str], g: torch.Generator) -> int:
    """3D affine warp with the image's gradient too (the Triton scatter on CUDA): CUDA against CPU."""
    from stnreg.fast import fused_affine_warp

    failures = 0
    image = torch.rand(2, 2, 30, 34, 38, generator=g)
    theta = torch.eye(3, 4) + 0.05 * torch.randn(2, 3, 4, generator=g)
    go = torch.randn(2, 2, 28, 32, 36, generator=g)
    for padding in ("zeros", "border"):
        grads = []
        for dev in ("cpu", "cuda"):
            img = image.to(dev).requires_grad_()
            th = theta.to(dev).requires_grad_()
            out = fused_affine_warp(img, th, (28, 32, 36), padding)
            grads.append([t.cpu() for t in torch.autograd.grad(out, (img, th), go.to(dev))])
        checks = ((_relative(grads[1][0], grads[0][0]), 1e-5), (_relative(grads[1][1], grads[0][1]), 1e-4))
        failures += _pair_row(lines, f"3D affine {padding}, image / θ gradient (relative)", *checks)
    return failures


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    card = torch.cuda.get_device_name()
    lines = [f"# GPU check on {card} (torch {torch.__version__})", ""]
    lines += ["| check | max abs diff CPU vs CUDA |", "|---|---:|"]
    failures = 0
    g = torch.Generator().manual_seed(0)
    for ndim, shape in ((2, (40, 48)), (3, (20, 24, 28))):
        image = torch.rand(2, 2, *shape, generator=g)
        for name in stnreg.FAMILIES:
            t = family(name, ndim, shape)
            p = t.identity_params(2) + 0.03 * torch.randn(2, *t.param_shape, generator=g)
            ref = stnreg.warp(image, t.with_params(p), padding="border")
            p_cuda = p.cuda().requires_grad_()
            out = stnreg.warp(image.cuda(), t.cuda().with_params(p_cuda), padding="border")
            out.sum().backward()
            diff = float((out.detach().cpu() - ref).abs().max())
            ok = diff < 1e-4 and bool(torch.isfinite(p_cuda.grad).all())
            failures += not ok
            lines.append(f"| {ndim}D {name} warp + grad | {diff:.2e}{'' if ok else ' FAIL'} |")
        labels = torch.randint(0, 5, (1, 1, *shape), generator=g)
        coords = stnreg.lattice(shape).unsqueeze(0) * 0.9
        for mode in ("nearest", "label"):
            ref = stnreg.sample(labels, coords, mode)
            out = stnreg.sample(labels.cuda(), coords.cuda(), mode).cpu()
            mism = int((out != ref).sum())
            failures += mism > 0
            lines.append(f"| {ndim}D {mode} labels, mismatched voxels | {mism}{'' if mism == 0 else ' FAIL'} |")
        small = stnreg.lattice(tuple(s // 3 for s in shape)).unsqueeze(0)
        ref = stnreg.sample(image, small, antialias=True)
        diff = float((stnreg.sample(image.cuda(), small.cuda(), antialias=True).cpu() - ref).abs().max())
        failures += diff > 1e-4
        lines.append(f"| {ndim}D anti-aliased shrink | {diff:.2e}{'' if diff < 1e-4 else ' FAIL'} |")
    failures += _image_gradient(lines, g)
    failures += _fused_losses(lines, g)
    text = "\n".join(lines) + f"\n\n{'all passed' if failures == 0 else f'{failures} FAILED'}\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu_check.md").write_text(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
