"""Per-call overhead: the host work of a warp and of a registration iteration, against plain torch.

On images so small that the arithmetic costs next to nothing, a call's time is its host work: Python,
argument checks and the small matrix algebra around the kernel. On a GPU each tensor op there is also
a kernel launch, and each read of a tensor's value on the host (a finiteness check, ``.item()``)
waits for the device to drain, so this work, not the kernels, bounds a registration iteration at
small and mid sizes there. Each case is timed next to what a user would write in plain torch, in the
same run (the ratio), and its ops are counted: aten ops per call, and host reads per call
(``aten::_local_scalar_dense``, each a device synchronization on a GPU).

Cases (forward + backward, the gradient to the transform's parameters):

- ``warp 3D`` / ``warp 2D``: ``stnreg.warp(image, Affine(d).with_params(θ))`` against
  ``grid_sample(image, affine_grid(θ))`` on an 8³ / 16² image;
- ``world warp 3D``: the same with a centred transform between two world :class:`~stnreg.Grid`\\ s,
  as registration warps (its torch twin applies the precomputed normalized-space θ);
- ``registration iteration``: one iteration of an affine stage of ``stnreg.register`` (NCC, 16³,
  early stopping off; (time at 60 iterations - time at 20) / 40) against a plain loop of Adam on θ,
  ``affine_grid`` + ``grid_sample``, global NCC, backward and reading the loss.

    python benchmarks/overhead.py [--device cpu|cuda] [--repeats 7]

Writes ``benchmarks/results/overhead[-cuda].md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import stnreg

RESULTS = Path(__file__).resolve().parent / "results"


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops run under it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def per_call(fn: Callable[[], object], device: str, repeats: int, calls: int = 200) -> float:
    """Median over ``repeats`` samples of the mean time of ``calls`` back-to-back calls, in seconds."""
    for _ in range(20):
        fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t) / calls)
    return statistics.median(samples)


def count_ops(fn: Callable[[], object]) -> tuple[int, int]:
    """(aten ops, host reads) of one call."""
    fn()
    counter = _OpCounter()
    with counter:
        fn()
    return sum(counter.ops.values()), counter.ops["_local_scalar_dense"]


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


def registration_iteration(device: str, repeats: int) -> dict[str, float]:
    """Seconds per iteration of an affine stage, stnreg and plain torch (16³ pair, NCC)."""
    g = torch.Generator().manual_seed(1)
    base = F.interpolate(torch.rand(1, 1, 5, 5, 5, generator=g), size=(16, 16, 16), mode="trilinear")
    fixed = base[0, 0].numpy()
    moving = torch.roll(base, 1, -1)[0, 0].numpy()

    def ours(iterations: int) -> None:
        stage = stnreg.Stage("affine", shrink=(1,), iterations=(iterations,))
        stnreg.register(moving, fixed, [stage], "ncc", tol=0.0, progress=False, device=device)

    mov = torch.as_tensor(moving)[None, None].to(device)
    fix = torch.as_tensor(fixed)[None, None].to(device)

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

    out = {}
    for name, run in (("torch", plain), ("stnreg", ours)):
        run(5)
        counts = []
        for iterations in (20, 60):
            counter = _OpCounter()
            with counter:
                run(iterations)
            counts.append(counter.ops)
        out[f"{name} ops"] = (sum(counts[1].values()) - sum(counts[0].values())) / 40
        out[f"{name} reads"] = (counts[1]["_local_scalar_dense"] - counts[0]["_local_scalar_dense"]) / 40
        spans = []
        for _ in range(repeats):
            t = []
            for iterations in (20, 60):
                _sync(device)
                start = time.perf_counter()
                run(iterations)
                _sync(device)
                t.append(time.perf_counter() - start)
            spans.append((t[1] - t[0]) / 40)
        out[name] = statistics.median(spans)
    return out


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
            ops, reads = count_ops(fn)
            rows.append({"case": case, "method": name, "us": 1e6 * t, "ratio": t / base, "ops": ops, "reads": reads})
            print(rows[-1], flush=True)
    per_it = registration_iteration(device, args.repeats)
    for name in ("torch", "stnreg"):
        t = per_it[name]
        rows.append(
            {
                "case": "registration iteration",
                "method": name,
                "us": 1e6 * t,
                "ratio": t / per_it["torch"],
                "ops": per_it[f"{name} ops"],
                "reads": per_it[f"{name} reads"],
            }
        )
        print(rows[-1], flush=True)
    lines = [
        f"# Per-call overhead ({device}: {card}, torch {torch.__version__}, 1 thread, median of {args.repeats})",
        "",
        "Tiny images, so that a call's time is its host work. Ratios are against the plain-torch row of each case.",
        "Ops and host reads per call are counted under a dispatch mode (each host read synchronizes a GPU).",
        "",
        "| case | method | µs per call | ratio | aten ops | host reads |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = (r["case"], r["method"], f"{r['us']:.0f}", f"{r['ratio']:.2f}", f"{r['ops']:g}", f"{r['reads']:g}")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "overhead" if device == "cpu" else f"overhead-{device}"
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"device": card, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
