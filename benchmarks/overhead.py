"""Per-call overhead: the host work of a warp and of a registration iteration, against plain torch.

On images so small that the arithmetic costs next to nothing, a call's time is its host work: Python,
argument checks and the small matrix algebra around the kernel. On a GPU each tensor op there is also
a kernel launch, and each read of a tensor's value on the host (a finiteness check, ``.item()``)
waits for the device to drain, so this work, not the kernels, bounds a registration iteration at
small and mid sizes there. Each case is timed next to what a user would write in plain torch, in the
same run (the ratio), and its ops are counted: aten ops per call, and host reads per call (ops that
hand a tensor's value to Python: ``.item()``, ``bool()``, ``torch.equal``, ``torch.allclose``). On
a GPU only reads of device tensors are counted, each a synchronization; on the CPU every read is
counted, as a stand-in.

Cases (forward + backward, the gradient to the transform's parameters):

- ``warp 3D`` / ``warp 2D``: ``stnreg.warp(image, Affine(d).with_params(θ))`` against
  ``grid_sample(image, affine_grid(θ))`` on an 8³ / 16² image;
- ``world warp 3D``: the same with a centred transform between two world :class:`~stnreg.Grid`\\ s,
  as registration warps (its torch twin applies the precomputed normalized-space θ);
- ``affine iteration``: one iteration of an affine stage of ``stnreg.register`` (NCC, 16³, early
  stopping off; (time at 60 iterations - time at 20) / 40) against a plain loop of Adam on θ,
  ``affine_grid`` + ``grid_sample``, global NCC, backward and reading the loss;
- ``svf iteration``: the same for a stationary velocity field stage with LNCC (scaling and squaring,
  the Gaussian preconditioner, the diffusion penalty), stnreg alone.

    python benchmarks/overhead.py [--device cpu|cuda] [--repeats 7]

Writes ``benchmarks/results/overhead[-cuda].md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

# Run as a script, benchmarks/ is on the path: the timer and results folder are the sampler benchmark's.
from sampler import RESULTS, _time
from torch.utils._python_dispatch import TorchDispatchMode

import stnreg

# Ops whose result Python reads on the host: on a GPU each waits for the device to drain.
HOST_READS = {"_local_scalar_dense", "equal", "allclose", "is_nonzero"}


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops run under it, and the host reads of tensors on ``device`` (all, on the CPU)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device
        self.ops = 0
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func.__name__.split(".")[0] in HOST_READS:
            devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
            self.reads += self.device == "cpu" or self.device in devices
        return func(*args, **(kwargs or {}))


def per_call(fn: Callable[[], object], device: str, repeats: int, calls: int = 200) -> float:
    """Median over ``repeats`` samples of the mean time of ``calls`` back-to-back calls, in seconds."""
    for _ in range(20):
        fn()
    return statistics.median(_time(fn, device, calls) for _ in range(repeats))


def count_ops(fn: Callable[[], object], device: str) -> tuple[int, int]:
    """(aten ops, host reads) of one call."""
    fn()
    counter = _OpCounter(device)
    with counter:
        fn()
    return counter.ops, counter.reads


def _ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean()
    b = b - b.mean()
    return 1 - (a * b).sum() / (a.square().sum() * b.square().sum()).clamp_min(1e-12).sqrt()


def warp_cases(device: str) -> dict[str, dict[str, Callable[[], object]]]:
    """Per case, the stnreg call and its torch twin, each forward + backward."""
    g = torch.Generator().manual_seed(0)
    cases: dict[str, dict[str, Callable[[], object]]] = {}
    for d, size in ((3, 8), (2, 16)):
        image = torch.rand(1, 1, *[size] * d, generator=g).to(device)
        theta = (torch.eye(d, d + 1) + 0.05 * torch.randn(1, d, d + 1, generator=g)).to(device).requires_grad_()
        family = stnreg.Affine(d).to(device)

        def ours(image=image, theta=theta, family=family):
            stnreg.warp(image, family.with_params(theta)).sum().backward()

        def torch_(image=image, theta=theta):
            grid = F.affine_grid(theta, list(image.shape), align_corners=False)
            F.grid_sample(image, grid, align_corners=False).sum().backward()

        cases[f"warp {d}D"] = {"torch": torch_, "stnreg": ours}
    grid = stnreg.Grid((8, 8, 8), spacing=(1.5, 1.5, 2.0), origin=(-6.0, -6.0, -8.0))
    image = torch.rand(1, 1, *grid.shape, generator=g).to(device)
    params = (torch.eye(3, 4) + 0.05 * torch.randn(1, 3, 4, generator=g)).to(device).requires_grad_()
    centred = stnreg.Affine(3, center=(1.0, -2.0, 3.0)).to(device)
    theta = centred.with_params(params).affine_theta(grid, grid).detach().requires_grad_()

    def world():
        stnreg.warp(image, centred.with_params(params), grid, grid).sum().backward()

    def world_torch():
        g_ = F.affine_grid(theta, list(image.shape), align_corners=False)
        F.grid_sample(image, g_, align_corners=False).sum().backward()

    cases["world warp 3D"] = {"torch": world_torch, "stnreg": world}
    return cases


def _pair() -> tuple[np.ndarray, np.ndarray]:
    """A smooth 16³ pair, the moving image shifted by a voxel."""
    g = torch.Generator().manual_seed(1)
    base = F.interpolate(torch.rand(1, 1, 5, 5, 5, generator=g), size=(16, 16, 16), mode="trilinear")
    return torch.roll(base, 1, -1)[0, 0].numpy(), base[0, 0].numpy()


def iteration_runners(device: str) -> dict[str, dict[str, Callable[[int], None]]]:
    """Per case, runners of ``n`` iterations: stnreg's stage, and its plain torch twin where one exists."""
    moving, fixed = _pair()
    mov = torch.as_tensor(moving)[None, None].to(device)
    fix = torch.as_tensor(fixed)[None, None].to(device)

    def stage(family: str, loss: str) -> Callable[[int], None]:
        def run(iterations: int) -> None:
            st = stnreg.Stage(family, shrink=(1,), iterations=(iterations,))
            stnreg.register(moving, fixed, [st], loss, tol=0.0, progress=False, device=device)

        return run

    def plain(iterations: int) -> None:
        theta = torch.eye(3, 4, device=device)[None].requires_grad_()
        opt = torch.optim.Adam([theta], lr=0.005)
        for _ in range(iterations):
            opt.zero_grad(set_to_none=True)
            grid = F.affine_grid(theta, list(mov.shape), align_corners=False)
            loss = _ncc(F.grid_sample(mov, grid, padding_mode="border", align_corners=False), fix)
            loss.backward()
            opt.step()
            float(loss.detach())

    return {
        "affine iteration (NCC)": {"torch": plain, "stnreg": stage("affine", "ncc")},
        "svf iteration (LNCC)": {"stnreg": stage("svf", "lncc")},
    }


def per_iteration(run: Callable[[int], None], device: str, repeats: int) -> tuple[float, float, float]:
    """(seconds, aten ops, host reads) per iteration: the difference of 60 and 20 iterations over 40."""
    run(5)
    counts = []
    for iterations in (20, 60):
        counter = _OpCounter(device)
        with counter:
            run(iterations)
        counts.append(counter)
    spans = []
    for _ in range(repeats):
        short, long = (_time(functools.partial(run, iterations), device) for iterations in (20, 60))
        spans.append((long - short) / 40)
    ops = (counts[1].ops - counts[0].ops) / 40
    return statistics.median(spans), ops, (counts[1].reads - counts[0].reads) / 40


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = args.device
    card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    rows = []
    for case, methods in warp_cases(device).items():
        base = None
        for name, fn in methods.items():
            t = per_call(fn, device, args.repeats)
            base = base or t
            ops, reads = count_ops(fn, device)
            rows.append({"case": case, "method": name, "us": 1e6 * t, "ratio": t / base, "ops": ops, "reads": reads})
            print(rows[-1], flush=True)
    for case, runners in iteration_runners(device).items():
        base = None
        for name, run in runners.items():
            t, ops, reads = per_iteration(run, device, args.repeats)
            base = base or (t if name == "torch" else None)
            ratio = t / base if base else None
            rows.append({"case": case, "method": name, "us": 1e6 * t, "ratio": ratio, "ops": ops, "reads": reads})
            print(rows[-1], flush=True)
    lines = [
        f"# Per-call overhead ({device}: {card}, torch {torch.__version__}, 1 thread, median of {args.repeats})",
        "",
        "Tiny images, so that a call's time is its host work. Ratios are against the plain-torch row of each case.",
        "Ops and host reads (`.item()`, `bool()`, `equal`, `allclose`) per call are counted under a dispatch mode;",
        "on a GPU only reads of device tensors count (each a synchronization), on the CPU all of them do.",
        "",
        "| case | method | µs per call | ratio | aten ops | host reads |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        cells = (r["case"], r["method"], f"{r['us']:.0f}", ratio, f"{r['ops']:g}", f"{r['reads']:g}")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "overhead" if device == "cpu" else f"overhead-{device}"
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"device": card, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
