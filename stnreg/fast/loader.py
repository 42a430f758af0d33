"""Loading the kernel libraries: numba's CPU kernels and Triton's CUDA kernels, once per process.

Each loader returns ``None`` where its library cannot run (not installed, an unsupported platform)
after a one-line notice on stderr the first time, so callers fall back to the torch reference.
``STNREG_FAST=0`` is read by :func:`enabled` on every call, so tests and users can switch the fast
paths off at any time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

__all__ = ["drop_stale_kernel_caches", "enabled", "kernel", "kernels", "triton", "use_triton"]

_KERNELS: dict[str, Any] | bool | None = None
_TRITON: ModuleType | bool | None = None
_NOTICES: set[str] = set()
# The files numba compiles from: its cache files depend on these and on nothing else in the package.
KERNEL_SOURCES = ("trilinear.py", "*_cpu.py")


def enabled() -> bool:
    """Whether fast paths may run at all (``STNREG_FAST=0`` turns every one off)."""
    return os.environ.get("STNREG_FAST", "1") != "0"


def _notice(library: str, what: str, err: Exception) -> None:
    """Say once per library why its kernels are not used."""
    if library not in _NOTICES:
        _NOTICES.add(library)
        print(f"stnreg: {what} unavailable ({type(err).__name__}: {err}); using grid_sample", file=sys.stderr)


def drop_stale_kernel_caches() -> None:
    """Delete numba cache files in this package that are older than any kernel source.

    numba keys each cached kernel on its own module's file only, not on the helpers it inlines from
    :mod:`.trilinear`: after an edit there (or a ``git pull`` into an editable install that changed
    only that file), the old machine code would load silently. Only kernel sources count: an edit
    to the Python around them (this loader, the dispatch rules) changes no machine code. Where the
    package directory is read-only, numba caches elsewhere and every install rewrites all sources anyway.
    """
    here = Path(__file__).resolve().parent
    newest = max(f.stat().st_mtime for pattern in KERNEL_SOURCES for f in here.glob(pattern))
    for f in (*here.glob("__pycache__/*.nbi"), *here.glob("__pycache__/*.nbc")):
        try:
            if f.stat().st_mtime < newest:
                f.unlink()
        except OSError:  # read-only, or removed by a concurrent process
            pass


def kernels() -> dict[str, Any] | None:
    """The numba kernels by name (compiled on first use, cached on disk); ``None`` where they cannot run.

    Most entries are ``(threaded, serial)`` pairs (see :func:`kernel`); the scatters of image
    gradients are single functions, run on one thread so that their sums have one order.
    """
    global _KERNELS
    if _KERNELS is None:
        try:
            import numba

            if "NUMBA_THREADING_LAYER" not in os.environ:
                # A pool that sleeps between calls: OpenMP's spinning workers slowed everything else.
                numba.config.THREADING_LAYER = "workqueue"
            drop_stale_kernel_caches()
            from . import affine_cpu, bspline_cpu, cubic_cpu, field_cpu, lncc_cpu, tps_cpu

            _KERNELS = {
                **affine_cpu.KERNELS,
                **field_cpu.KERNELS,
                **bspline_cpu.KERNELS,
                **tps_cpu.KERNELS,
                **cubic_cpu.KERNELS,
                "field3d_grad_image": field_cpu.grad_image,
                "bspline3d_spread_z": bspline_cpu.spread_z,
                "affine2d_grad_image": affine_cpu.affine2d_grad_image,
                "affine3d_grad_image": affine_cpu.affine3d_grad_image,
                "lncc": (lncc_cpu.lncc_forward, lncc_cpu.lncc_grad, lncc_cpu.fixed_stats),
            }
        except Exception as err:  # numba missing, or an unsupported platform
            _KERNELS = False
            _notice("numba", "fast CPU warps", err)
    return _KERNELS or None


def kernel(name: str) -> Any:
    """The threaded kernel ``name`` for several torch threads, its serial twin for one."""
    import numba

    threaded, serial = kernels()[name]
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if threads == 1:
        return serial
    numba.set_num_threads(threads)
    return threaded


def triton() -> ModuleType | None:
    """The Triton kernel module (:mod:`stnreg.fast.affine_cuda`); ``None`` where Triton cannot run."""
    global _TRITON
    if _TRITON is None:
        try:
            from . import affine_cuda

            _TRITON = affine_cuda
        except Exception as err:  # triton missing (CPU-only torch wheels do not bring it)
            _TRITON = False
            _notice("triton", "fast GPU warps", err)
    return _TRITON or None


def use_triton(image: Tensor) -> bool:
    """Whether ``image`` goes to the Triton kernels: CUDA tensors (the tests route CPU ones to the interpreter)."""
    return image.device.type == "cuda"
