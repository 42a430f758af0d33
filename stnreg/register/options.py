"""The registration options shared by the Python API, ``stnreg register`` and the batch runner.

One dataclass holds every option with its default and its help; :func:`stnreg.register.register`
takes the same defaults (a test checks), the command line builds one flag per field from it, and
``--pairs`` hands the same object to every pair, so no flag can be dropped on the way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ..errors import InputError
from .stages import DEFAULTS, MATRIX

__all__ = ["LOSSES", "RegisterOptions", "resolve_device", "stage_defaults_text"]

LOSSES = ("mse", "ncc", "lncc", "mi")


def _opt(default: Any, help: str, **cli: Any) -> Any:
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class RegisterOptions:
    """Options of one registration (per-pair inputs, such as labels and masks, are not options)."""

    transform: str = _opt(
        "rigid+affine+svf",
        "'+'-joined stages. Matrix families (translation, rigid, similarity, affine, projective) run L-BFGS to "
        "convergence on a global similarity; deformable families (last, at most one): svf, displacement, bspline, "
        "tps (Adam on a regularized parametric field), syn (symmetric greedy diffeomorphic updates with "
        "Gaussian-smoothed steps, as ANTs SyN). Per-stage pyramids and iteration caps: see below",
    )
    loss: str = _opt("lncc", "similarity of the deformable stage", choices=LOSSES)
    linear_loss: str | None = _opt(
        None,
        "similarity of the matrix stages (default: ncc for --loss lncc, else --loss). lncc aligns local structure "
        "better between subjects, ncc recovers exact transforms more precisely and runs faster",
        choices=LOSSES,
    )
    window: float = _opt(9, "LNCC window (voxels, or mm with --window-mm)", type=float)
    window_mm: bool = _opt(False, "the LNCC window is in mm", flag=True)
    bins: int = _opt(32, "histogram bins of --loss mi", type=int)
    dice_weight: float = _opt(0.0, "weight of a Dice loss on the labels (first label channel)", type=float)
    init: str = _opt(
        "com", "initial alignment: centres of mass, principal axes too, or none", choices=("com", "moments", "none")
    )
    tol: float | None = _opt(
        None,
        "convergence of every stage (default: each stage's own): matrix stages stop once an update moves no "
        "point by more than TOL voxels (default 0.001); svf/bspline/tps/syn levels once the best loss gained "
        "less than TOL (relative; default 0.001, syn 0.005) over 10 iterations; 0 runs every level to its cap",
        type=float,
    )
    seed: int = _opt(0, "seed of the random sampling of --loss mi", type=int)
    device: str | None = _opt(None, "cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise InputError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.linear_loss is not None and self.linear_loss not in LOSSES:
            raise InputError(f"linear_loss must be one of {', '.join(LOSSES)}, got {self.linear_loss!r}")
        if self.tol is not None and self.tol < 0:
            raise InputError(f"tol must be >= 0, got {self.tol}")
        if self.window <= 0:
            raise InputError(f"window must be > 0, got {self.window}")

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`stnreg.register.register` / ``register_many``."""
        return asdict(self)

    @classmethod
    def from_namespace(cls, ns: Any) -> RegisterOptions:
        """From an ``argparse.Namespace`` that has one attribute per field (see :func:`stnreg.cli`)."""
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` (``None``: CUDA where available); names what is missing otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r}: not a device name (cpu, cuda, cuda:1 ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!s}: CUDA is not available here (no GPU, or a CPU-only torch build)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!s}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise InputError(f"device {device!s}: stnreg runs on cpu or cuda")
    return dev


def stage_defaults_text() -> str:
    """One line per family: its default pyramid, iteration caps, solver and tolerance (for ``--help``)."""
    lines = []
    for family, d in DEFAULTS.items():
        shrink = ", ".join("full" if f == 1 else f"1/{f}" for f in d["shrink"])
        its = "/".join(str(i) for i in d["iterations"])
        kind = "matrix" if family in MATRIX else "deformable"
        lines.append(
            f"  {family:<12} {kind:<10} levels {shrink}, at most {its} iterations, {d['solver']}, tol {d['tol']}"
        )
    return "\n".join(lines)
