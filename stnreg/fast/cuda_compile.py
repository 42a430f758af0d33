"""Compile the Triton kernels of :mod:`stnreg.fast.affine_cuda` for a CUDA card on any machine.

Triton ships ``ptxas`` and ``cuobjdump``, so a machine without a GPU can build each kernel down to
the card's machine code (SASS) and read it. That checks what Triton's interpreter cannot (the
kernels compile, type rules of the compiler, register spills, the threads' data layout), and
counts the instructions that a card would issue per voxel (``benchmarks/kernel_sass.py``).

Each kernel is specialized as a launch on a volume of :data:`SHAPE` voxels (input and output) with
one channel would be: integer arguments divisible by 16 are marked so and an argument equal to 1
becomes a constant, as Triton's launcher does. The layouts and counts below depend on that.
"""

from __future__ import annotations

import collections
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

# (D, H, W) of the benchmark volume (benchmarks/sampler.py): 1 mm brain-sized.
SHAPE = (160, 192, 224)


@dataclass
class Variant:
    """One kernel as the public functions launch it: ``voxels`` output voxels per thread per program."""

    name: str
    fn: triton.JITFunction
    args: tuple
    constants: dict
    voxels: float


@dataclass
class Machine:
    """A compiled variant: its SASS instructions (address, text, in address order), registers per
    thread, bytes of local memory per thread (spills), the ``sizePerThread`` of each blocked layout,
    and the layout of most of its gathers (tensor loads, or the scatter's atomic adds):
    ``(sizePerThread, threadsPerWarp)``."""

    variant: Variant
    instructions: list[tuple[int, str]]
    registers: int
    local_bytes: int
    size_per_thread: list[tuple[int, ...]]
    gather_layout: tuple[tuple[int, ...], tuple[int, ...]]


def variants(module: ModuleType) -> list[Variant]:
    """The kernel launches of ``module`` (an ``affine_cuda``, this one or an older revision's),
    both paddings: forward, θ gradient, image gradient, both, fused MSE and NCC."""
    d, h, w = SHAPE
    img = torch.empty(1, 1, d, h, w)
    theta = torch.empty(1, 3, 4)
    part = torch.empty(64)
    tiles = module._TILES
    # Revisions before the slices per program depended on the volume had one set of constants.
    launch = getattr(module, "_reducing_launch", None)
    red = launch(SHAPE, 1)[0] if launch else module._RED_TILES

    def per_thread(t: dict) -> float:
        return t["TILE_H"] * t["TILE_W"] * t["Z_PER"] / (32 * t["num_warps"])

    out = []
    for border in (False, True):
        pad = "border" if border else "zeros"
        fwd = (img, theta, img, 1, d, h, w, d, h, w)
        out.append(
            Variant(f"forward, {pad}", module._forward_kernel, fwd, {"BORDER": border, **tiles}, per_thread(tiles))
        )
        bwd = (img, theta, img, part, img, 1, d, h, w, d, h, w)
        for what, th, im in (("θ gradient", True, False), ("image gradient", False, True), ("θ + image", True, True)):
            consts = {"BORDER": border, "THETA": th, "IMAGE": im, **red}
            out.append(Variant(f"{what}, {pad}", module._backward_kernel, bwd, consts, per_thread(red)))
        loss = (img, img, theta, part, 1, d, h, w, d, h, w)
        for name, ncc in (("mse", False), ("ncc", True)):
            consts = {"BORDER": border, "NCC": ncc, **red}
            out.append(Variant(f"fused {name}, {pad}", module._loss_kernel, loss, consts, per_thread(red)))
    return out


def compile_variant(variant: Variant, arch: int = 90) -> Machine:
    """Build ``variant`` for compute capability ``arch`` (90: H100/H200) and read its machine code."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = variant.fn
    # The launcher's own binder gives the specialization (types, divisibility, constants).
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*variant.args, **variant.constants)
    options, signature, constexprs, attrs = fn._pack_args(backend, variant.constants, bound, specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        tool = knobs.nvidia.cuobjdump.path
        sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    instructions = [(int(a, 16), op.strip()) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    ttgir = kernel.asm["ttgir"]
    layouts = {
        name: (_ints(size), _ints(threads))
        for name, size, threads in re.findall(
            r"^(#blocked\d*) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], threadsPerWarp = \[([\d, ]+)\]",
            ttgir,
            re.M,
        )
    }
    # The gathers: the loads, or the scatter's atomic adds, of a tensor of pointers.
    access = r"(?:tt\.load|tt\.atomic_rmw)[^:\n]*: (?:\(?)tensor<[^>]*!tt\.ptr<f32>, (#blocked\d*)>"
    loads = collections.Counter(re.findall(access, ttgir))
    return Machine(
        variant,
        instructions,
        int(re.search(r"REG:(\d+)", usage).group(1)),
        # Spills land in local memory or, with the ABI's stack, on the stack: either counts.
        int(re.search(r"LOCAL:(\d+)", usage).group(1)) + int(re.search(r"STACK:(\d+)", usage).group(1)),
        [size for size, _ in layouts.values()],
        layouts[loads.most_common(1)[0][0]],
    )


def issued(machine: Machine, match: Callable[[str], bool] = lambda op: not op.startswith("NOP")) -> int:
    """Instructions that one thread of one program issues, of those for which ``match`` holds: each
    inside a loop (a backward branch) counts once per slice of the program's ``Z_PER`` per enclosing
    loop, the rest once; branches count as taken. The channel loop is compiled away for one channel."""
    z_per = machine.variant.constants["Z_PER"]
    loops = []
    for address, op in machine.instructions:
        target = op.split()[-1]
        if "BRA" in op and target.startswith("0x") and int(target, 16) < address:
            loops.append((int(target, 16), address))
    return sum(
        z_per ** sum(lo <= address <= hi for lo, hi in loops) for address, op in machine.instructions if match(op)
    )


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))
