"""Command line: ``stnreg demo`` (more subcommands join as the pipeline grows). Parsing and printing only."""

from __future__ import annotations

import argparse
import sys

import torch

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    r = run_demo(args.output, size=args.size, steps=args.steps)
    fmt = lambda m: "\n".join("    " + "  ".join(f"{v:+.4f}" for v in row) for row in m.tolist())  # noqa: E731
    print("stnreg demo: recover a known similarity warp of scikit-image's 'camera' with an affine transform")
    print(f"  true matrix (normalized coordinates):\n{fmt(r.true_matrix)}")
    print(f"  found matrix:\n{fmt(r.found_matrix)}")
    print(f"  max matrix entry error {r.matrix_error:.4f}; max corner error {r.point_error_px:.2f} px")
    print(f"  MSE before {r.loss_before:.5f} -> after {r.loss_after:.5f} in {r.seconds:.2f} s")
    if r.figure is not None:
        print(f"  figure: {r.figure}")
    ok = r.point_error_px < 1.0
    print("  RECOVERED" if ok else "  NOT RECOVERED")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stnreg", description="Differentiable image registration (STN)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="recover a known warp of a built-in image (no download)")
    demo.add_argument("-o", "--output", default="stnreg-demo", help="folder for the figure")
    demo.add_argument("--size", type=int, default=128)
    demo.add_argument("--steps", type=int, default=300)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
