"""Command line: ``stnreg register | apply | demo | fit | validate | test``.

Parsing and printing only; the logic is the Python API. ``fit``/``validate``/``test`` hand the rest of
the command line to Lightning's ``LightningCLI`` (``--config FILE``, every value overridable).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

__all__ = ["main"]


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _check_output_dir(out: str, inputs: list[str]) -> None:
    out_p = Path(out).resolve()
    for p in inputs:
        if p and Path(p).resolve() == out_p:
            raise CliError(f"{out}: the output folder is an input file")


def _register_one(args: argparse.Namespace, moving: str, fixed: str, labels: list[str] | None, out: str) -> dict:
    from .io import ImageReadError, read_image
    from .register import register

    inputs = [moving, fixed, *(labels or []), *([args.model] if args.model else [])]
    _check_output_dir(out, inputs)
    try:
        mov, fix = read_image(moving), read_image(fixed)
        lab = None
        if labels:
            lab = (read_image(labels[0], label=True), read_image(labels[1], label=True))
        if args.model:
            from .learn import register_with_model

            result = register_with_model(
                args.model, mov, fix, args.refine, labels=lab, device=args.device, progress=not args.quiet
            )
            result.save(out, protect=inputs)
            return result.metrics | {"timings": result.timings}
        mask = read_image(args.mask) if args.mask else None
        result = register(
            mov,
            fix,
            transform=args.transform,
            loss=args.loss,
            window=args.window,
            window_mm=args.window_mm,
            labels=lab,
            dice_weight=args.dice_weight,
            fixed_mask=mask,
            init=args.init,
            device=args.device,
            progress=not args.quiet,
            tol=args.tol,
            linear_loss=args.linear_loss,
        )
    except (ImageReadError, ValueError) as err:
        raise CliError(str(err)) from None
    result.save(out, protect=inputs)
    return result.metrics | {"timings": result.timings}


def _register(args: argparse.Namespace) -> int:
    if args.refine and not args.model:
        raise CliError("--refine needs --model CKPT")
    if args.model and (args.pairs or args.mask):
        raise CliError("--model registers one pair; --pairs and --mask are not supported with it")
    if args.pairs:
        from .batch import register_pairs

        rows = register_pairs(
            args.pairs,
            args.output,
            transform=args.transform,
            loss=args.loss,
            window=args.window,
            init=args.init,
            devices=args.devices,
            batch_size=args.batch_size,
            accelerator="gpu" if (args.device or "").startswith("cuda") else "cpu",
        )
        print(f"registered {len(rows)} pairs into {args.output} (summary: {Path(args.output) / 'summary.csv'})")
        return 0
    if not args.moving or not args.fixed:
        raise CliError("give MOVING and FIXED, or --pairs CSV")
    metrics = _register_one(args, args.moving, args.fixed, args.labels, args.output)
    summary = {k: v for k, v in metrics.items() if not isinstance(v, dict) or k in ("timings", "jacobian")}
    print(json.dumps(summary, indent=1, default=float))
    print(f"outputs in {args.output}")
    return 0


def _apply(args: argparse.Namespace) -> int:
    from .io import ImageReadError, read_image, read_transform, write_image
    from .warp import apply

    try:
        transform = read_transform(args.transform)
        image = read_image(args.image, label=args.interpolation != "linear")
        reference = read_image(args.reference)
        out = apply(transform, image, reference, args.interpolation)
    except (ImageReadError, ValueError) as err:
        raise CliError(str(err)) from None
    try:
        write_image(args.output, out, protect=[args.image, args.reference, args.transform])
    except FileExistsError as err:
        raise CliError(str(err)) from None
    print(f"wrote {args.output}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    r = run_demo(args.output, progress=not args.quiet)
    print("stnreg demo: register a built-in image pair with a known synthetic warp (scikit-image 'camera')")
    print(f"  pipeline {r['transform']} / {r['loss']}, {r['seconds']:.2f} s")
    print(f"  NCC before {r['ncc_before']:.3f} -> after {r['ncc_after']:.3f}")
    print(
        f"  displacement error vs the known warp (pixels mapped inside the image): mean {r['error_mean']:.2f} px, "
        f"median {r['error_median']:.2f} px (the warp moves pixels by {r['true_mean']:.2f} px on average, "
        f"up to {r['true_max']:.1f})"
    )
    print(f"  folded pixels {r['folding_percent']:.3f}%")
    print(f"  outputs (warped image, ITK transforms, report.json, qc.png) in {r['output']}")
    ok = r["error_median"] < 1.0 and r["error_mean"] < 0.25 * r["true_mean"]
    print("  RECOVERED" if ok else "  NOT RECOVERED")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stnreg", description="Differentiable image registration (STN)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = parser.add_subparsers(dest="command", required=True)

    reg = sub.add_parser("register", help="register MOVING to FIXED (or a list of pairs)")
    reg.add_argument("moving", nargs="?")
    reg.add_argument("fixed", nargs="?")
    reg.add_argument("-o", "--output", required=True, help="output folder")
    reg.add_argument(
        "--transform",
        default="rigid+affine+svf",
        help="'+'-joined stages (default: %(default)s). Matrix families (translation, rigid, similarity, affine, "
        "projective) run L-BFGS to convergence on a global NCC (MI with --loss mi); deformable families (last, "
        "at most one): svf, displacement, bspline, tps (Adam on a regularized parametric field), syn (symmetric "
        "greedy diffeomorphic updates with Gaussian-smoothed steps, as ANTs SyN)",
    )
    reg.add_argument(
        "--loss",
        default="lncc",
        choices=["mse", "ncc", "lncc", "mi"],
        help="similarity of the deformable stage (default: %(default)s); matrix stages use ncc for lncc",
    )
    reg.add_argument(
        "--linear-loss",
        choices=["mse", "ncc", "lncc", "mi"],
        help="similarity of the matrix stages (default: ncc for --loss lncc, else --loss). lncc aligns local "
        "structure better between subjects, ncc recovers exact transforms more precisely and runs faster",
    )
    reg.add_argument(
        "--window", type=float, default=9, help="LNCC window (voxels, or mm with --window-mm; default: %(default)s)"
    )
    reg.add_argument("--window-mm", action="store_true")
    reg.add_argument("--labels", nargs=2, metavar=("MOVING_LABELS", "FIXED_LABELS"))
    reg.add_argument("--dice-weight", type=float, default=0.0, help="weight of a Dice loss on --labels")
    reg.add_argument("--mask", help="fixed-space mask restricting the similarity")
    reg.add_argument("--init", default="com", choices=["com", "moments", "none"])
    reg.add_argument(
        "--tol",
        type=float,
        default=None,
        help="convergence of every stage (default: each stage's own): matrix stages stop once an update moves "
        "no point by more than TOL voxels (default 0.001); svf/bspline/tps/syn levels once the best loss "
        "gained less than TOL (relative; default 0.001, syn 0.005) over 10 iterations; 0 runs every level to its cap",
    )
    reg.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    reg.add_argument("--model", help="a trained registration checkpoint (stnreg fit): one forward pass")
    reg.add_argument("--refine", type=int, default=0, help="with --model: N steps of instance optimization after it")
    reg.add_argument("--pairs", help="CSV with columns moving,fixed[,moving_labels,fixed_labels]")
    reg.add_argument("--devices", type=int, default=1, help="processes/GPUs for --pairs (Lightning)")
    reg.add_argument("--batch-size", type=int, default=4, help="--pairs on equal grids optimized together")
    reg.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    reg.set_defaults(func=_register)

    app = sub.add_parser("apply", help="apply a registration result or ITK transform to an image")
    app.add_argument("transform", help="output folder of 'stnreg register', an ITK transform or displacement field")
    app.add_argument("image")
    app.add_argument("--reference", required=True, help="image whose grid the output takes (the fixed image)")
    app.add_argument("-o", "--output", required=True)
    app.add_argument("--interpolation", default="linear", choices=["linear", "nearest", "label"])
    app.set_defaults(func=_apply)

    demo = sub.add_parser("demo", help="register a built-in pair with a known warp (no download)")
    demo.add_argument("-o", "--output", default="stnreg-demo", help="output folder")
    demo.add_argument("-q", "--quiet", action="store_true")
    demo.set_defaults(func=_demo)

    for name in LIGHTNING_COMMANDS:
        sub.add_parser(
            name, help=f"Lightning {name} from a config: stnreg {name} --config configs/NAME.yaml [--key value]"
        )
    return parser


LIGHTNING_COMMANDS = ("fit", "validate", "test")


def _lightning(argv: list[str]) -> int:
    """Run LightningCLI (any LightningModule/DataModule named by ``class_path`` in the config)."""
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(args=argv, save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": "stnreg"})
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return _lightning(argv)
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (CliError, FileExistsError) as err:
        print(f"stnreg {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
