"""Command line: ``stnreg register | apply | demo | fit | validate | test``.

Parsing and printing only; the logic is the Python API. ``fit``/``validate``/``test`` hand the rest of
the command line to Lightning's ``LightningCLI`` (``--config FILE``, every value overridable).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

from .errors import InputError
from .outdir import check_output_folder
from .register.options import RegisterOptions, resolve_device, stage_defaults_text

__all__ = ["main"]


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _register_one(args: argparse.Namespace, options: RegisterOptions) -> dict:
    from .io import read_image
    from .register import register

    inputs = [args.moving, args.fixed, *(args.labels or []), *([args.model] if args.model else [])]
    inputs += [args.mask] if args.mask else []
    check_output_folder(args.output, inputs, overwrite=args.overwrite)
    mov, fix = read_image(args.moving), read_image(args.fixed)
    lab = None
    if args.labels:
        lab = (read_image(args.labels[0], label=True), read_image(args.labels[1], label=True))
    if args.model:
        from .learn import register_with_model

        result = register_with_model(
            args.model,
            mov,
            fix,
            args.refine,
            labels=lab,
            device=options.device,
            progress=not args.quiet,
            loss=options.loss,
            affine_init=args.affine_init,
        )
    else:
        mask = read_image(args.mask) if args.mask else None
        result = register(mov, fix, labels=lab, fixed_mask=mask, progress=not args.quiet, **options.kwargs())
    result.save(args.output, protect=inputs, qc=not args.no_qc)
    return result.metrics | {"timings": result.timings}


def _register_pairs(args: argparse.Namespace, options: RegisterOptions) -> int:
    from .batch import register_pairs

    res = register_pairs(
        args.pairs,
        args.output,
        options,
        devices=args.devices,
        batch_size=args.batch_size,
        mask=args.mask,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    for f in res.failures:
        print(f"stnreg register: row {f.row} failed: {f.reason}", file=sys.stderr)
    out = Path(args.output)
    done = len(res.summary)
    line = f"registered {done - len(res.skipped)} pair(s) into {out}"
    line += f", kept {len(res.skipped)} finished earlier (--resume)" if res.skipped else ""
    line += f"; {len(res.failures)} row(s) failed: see {out / 'failures.csv'}" if res.failures else ""
    print(f"{line} (summary: {out / 'summary.csv'})")
    return 1 if res.failures else 0


def _register(args: argparse.Namespace) -> int:
    if args.refine and not args.model:
        raise CliError("--refine needs --model CKPT")
    if args.affine_init and not args.model:
        raise CliError("--affine-init needs --model CKPT")
    if args.model and args.pairs:
        raise CliError("--model registers one pair; --pairs is not supported with it")
    if args.pairs and (args.moving or args.labels):
        raise CliError("with --pairs, list the images (and labels: moving_labels,fixed_labels columns) in the CSV")
    if args.resume and not args.pairs:
        raise CliError("--resume continues a --pairs run")
    options = RegisterOptions.from_namespace(args)
    resolve_device(options.device)  # before any work: a missing GPU is named, not a traceback
    if args.pairs:
        return _register_pairs(args, options)
    if not args.moving or not args.fixed:
        raise CliError("give MOVING and FIXED, or --pairs CSV")
    metrics = _register_one(args, options)
    summary = {k: v for k, v in metrics.items() if not isinstance(v, dict) or k in ("timings", "jacobian")}
    print(json.dumps(summary, indent=1, default=float))
    print(f"outputs in {args.output}")
    return 0


def _apply(args: argparse.Namespace) -> int:
    from .io import image_info, read_image, read_transform, write_image
    from .warp import apply

    out = Path(args.output)
    if out.is_dir():
        raise CliError(f"{out}: is a folder; -o names the output image file")
    if out.exists() and not args.overwrite:
        raise CliError(f"{out}: exists; give --overwrite to replace it")
    transform = read_transform(args.transform)
    image = read_image(args.image, label=args.interpolation != "linear")
    reference = read_image(args.reference)
    warped = apply(transform, image, reference, args.interpolation)
    layout = image_info(args.image).layout  # a 4D label file stays 4D
    write_image(out, warped, protect=[args.image, args.reference, args.transform], channels=layout)
    print(f"wrote {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    # The demo's folder is its own: a rerun replaces its results (but never a file in its place).
    check_output_folder(args.output, overwrite=True)
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default shown (unless the help already says what it is); the epilog's table kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if action.required or "default" in text else super()._get_help_string(action)


def _add_options(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`RegisterOptions` field, with its default and help."""
    for f in fields(RegisterOptions):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        if meta.pop("flag", False):
            parser.add_argument(flag, action="store_true", default=f.default, help=meta["help"])
        else:
            parser.add_argument(flag, default=f.default, **meta)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stnreg", description="Differentiable image registration (STN)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = parser.add_subparsers(dest="command", required=True)

    reg = sub.add_parser(
        "register",
        help="register MOVING to FIXED (or a list of pairs)",
        formatter_class=_HelpFormatter,
        epilog="default pyramids per stage (levels coarse to fine; a level ends at its tolerance or cap):\n"
        + stage_defaults_text()
        + "\n\nLabels (--labels, CSV label columns): the first label channel is scored (Dice, HD95) and used "
        "by --dice-weight.",
    )
    reg.add_argument("moving", nargs="?")
    reg.add_argument("fixed", nargs="?")
    reg.add_argument("-o", "--output", required=True, help="output folder (new or empty, or see --overwrite)")
    _add_options(reg)
    reg.add_argument(
        "--labels", nargs=2, metavar=("MOVING_LABELS", "FIXED_LABELS"), help="label maps: Dice/HD95, --dice-weight"
    )
    reg.add_argument("--mask", help="fixed-space mask restricting the similarity (with --pairs: every row's)")
    reg.add_argument("--model", help="a trained registration checkpoint (stnreg fit): one forward pass")
    reg.add_argument("--refine", type=int, default=0, help="with --model: N steps of instance optimization after it")
    reg.add_argument(
        "--affine-init",
        action="store_true",
        help="with --model: align the pair with rigid+affine first, then run the network (pairs far apart)",
    )
    reg.add_argument("--pairs", help="CSV with columns moving,fixed[,moving_labels,fixed_labels][,mask]")
    reg.add_argument("--devices", type=int, default=1, help="processes (CPU) or GPUs for --pairs (Lightning)")
    reg.add_argument("--batch-size", type=int, default=4, help="--pairs on equal grids optimized together")
    reg.add_argument("--resume", action="store_true", help="--pairs: keep the pairs an earlier run finished")
    reg.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty output folder (its other files are kept)"
    )
    reg.add_argument("--no-qc", action="store_true", help="skip the QC figure (qc.png)")
    reg.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    reg.set_defaults(func=_register)

    app = sub.add_parser("apply", help="apply a registration result or ITK transform to an image")
    app.add_argument("transform", help="output folder of 'stnreg register', an ITK transform or displacement field")
    app.add_argument("image")
    app.add_argument("--reference", required=True, help="image whose grid the output takes (the fixed image)")
    app.add_argument("-o", "--output", required=True)
    app.add_argument(
        "--interpolation",
        default="linear",
        choices=["linear", "nearest", "label"],
        help="linear for intensities; label (each label's indicator interpolated, the likeliest kept) for label "
        "maps; every channel is warped (default: %(default)s)",
    )
    app.add_argument("--overwrite", action="store_true", help="replace an existing output file")
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

    try:
        LightningCLI(args=argv, save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": "stnreg"})
    except InputError as err:  # the config's data: missing, unreadable, inconsistent
        print(f"stnreg {argv[0]}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
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
    except (CliError, InputError, FileExistsError) as err:
        print(f"stnreg {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
