"""How low can the error go on the issue's P distortion? A CNN on perfectly rectified digits.

An ST-CNN can at best undo the distortion exactly: its classifier then sees the digit through the
true inverse homography, minus whatever the distortion pushed off the 28x28 canvas or blurred. This
script trains the paper's plain CNN (``configs/paper/distorted_p.yaml`` with ``architecture: cnn``),
same budget for every row, on:

- ``clean``: undistorted MNIST (the CNN's own floor in this budget);
- ``P rectified``: each P image (as :func:`stnreg.paper.data.make_variant` makes it, uint8) warped
  back through the inverse of its own homography, i.e. a perfect projective transformer;
- ``P``: the P images as given (the plain CNN row of Table 1).

It also counts the test digits that lose more than 10% / 20% of their ink off the canvas. Writes
``benchmarks/results/paper-p-floor.{md,json}``.

    python benchmarks/paper_p_floor.py --epochs 10 [--threads 1] [--data /path/to/mnist.npz]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from torch.utils.data import TensorDataset

from stnreg.coords import lattice
from stnreg.learn.data import resolve_data_path
from stnreg.paper import ClassificationTask, MNISTVariants, load_mnist
from stnreg.paper.data import projective_maps, warp_projective

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("clean", "P rectified", "P")
PAPER_P = {"cnn": 1.5, "st-cnn-aff": 0.8, "st-cnn-proj": 0.8, "st-cnn-tps": 0.8}


def distorted(digits: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P images ``(N, 1, 28, 28)`` uint8 and their homographies ``(N, 3, 3)`` (canvas -> digit).

    Uses the generator's own maps and warp, so the images are distributed as the P experiment's.
    """
    g = torch.Generator().manual_seed(seed)
    h = projective_maps(len(digits), g)
    img = warp_projective(torch.as_tensor(digits).float()[:, None], h)
    return img.round().clamp(0, 255).to(torch.uint8), h


def rectified(images: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``images`` ``(N, 1, 28, 28)`` uint8 seen through the inverse of their maps ``h``: digit -> canvas."""
    # h has w > 0 on the digit's side, so its inverse has w > 0 throughout the digit frame.
    return warp_projective(images.float(), torch.linalg.inv(h)).round().clamp(0, 255).to(torch.uint8)


def ink_lost(digits: np.ndarray, h: torch.Tensor) -> torch.Tensor:
    """Share of each digit's ink ``(N,)`` whose pixel centre falls off the canvas (or past the horizon)."""
    pts = lattice((28, 28), "index", torch.float64) - 13.5  # pixel centres about the digit's centre
    hom = torch.cat([pts, torch.ones(28, 28, 1, dtype=torch.float64)], -1)
    m = torch.einsum("nij,hwj->nhwi", torch.linalg.inv(h), hom)
    inside = ((m[..., :2] / m[..., 2:]).abs() < 14).all(-1) & (m[..., 2] > 0)
    ink = torch.as_tensor(digits).double()
    return 1 - (ink * inside).sum((1, 2)) / ink.sum((1, 2))


class Variants(MNISTVariants):
    """:class:`MNISTVariants` of P whose images are ``clean``, ``P rectified`` or ``P`` (see the module)."""

    def __init__(self, mode: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mode = mode

    def _make(self, digits: tuple[np.ndarray, np.ndarray], seed: int) -> TensorDataset:
        x, y = digits
        if self.mode == "clean":
            return TensorDataset(torch.as_tensor(x)[:, None], torch.as_tensor(y).long())
        img, h = distorted(x, seed)
        return TensorDataset(rectified(img, h) if self.mode == "P rectified" else img, torch.as_tensor(y).long())


def run(mode: str, args: argparse.Namespace) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "paper" / "distorted_p.yaml").read_text())
    L.seed_everything(args.seed)
    task = ClassificationTask(**(cfg["model"]["init_args"] | {"architecture": "cnn"}))
    data_args = cfg["data"]["init_args"] | {"seed": args.seed, "train_size": args.train_size}
    if args.data:
        data_args["data"] = str(args.data)
    dm = Variants(mode, **data_args)
    dm.setup()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=args.epochs,
        enable_model_summary=False,
    )
    t = time.perf_counter()
    trainer.fit(task, dm)
    seconds = time.perf_counter() - t
    error = float(trainer.validate(task, dm, verbose=False)[0]["val/error"])
    return {"error": error, "seconds": seconds, "train_digits": len(dm.train_set), "batch": dm.hparams.batch_size}


def render(store: dict, lost: dict) -> str:
    lines = [
        "# P: the error of a plain CNN on perfectly rectified digits",
        "",
        "Produced by `benchmarks/paper_p_floor.py`. The paper's plain CNN, trained with the same budget on "
        "undistorted digits, on the issue's P digits warped back through their own true homography (what an "
        "ST-CNN with a perfect transformer passes to its classifier), and on the P digits as given. Test error "
        "in %, MNIST's 10k test digits (P drawn with seed + 1, as in `paper.md`).",
        "",
        "| training and test images | CNN error | epochs | training digits per epoch | wall time (s) | threads |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        r = store.get(mode)
        if r:
            lines.append(
                f"| {mode} | **{r['error']:.2f}** | {r['epochs']} | {r['train_digits']} | {r['seconds']:.0f} | "
                f"{r['threads']} |"
            )
    lines += [
        "",
        f"Test digits with more than 10% of their ink off the canvas: {lost['10']:.2f}%; more than 20%: "
        f"{lost['20']:.2f}%; more than 30%: {lost['30']:.2f}%.",
        "",
        f"The paper's P errors: CNN {PAPER_P['cnn']}, ST-CNN {PAPER_P['st-cnn-aff']} (Aff, Proj, TPS).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default=",".join(MODES), help=f"comma-separated: {', '.join(MODES)}")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=None, help="MNIST .npz or folder of IDX .gz files")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.data is None:
        os.environ.setdefault("STNREG_DATA", str(ROOT.parent / "shared" / "data"))
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    test_digits = load_mnist(resolve_data_path(str(args.data or "mnist/mnist.npz")))["x_test"]
    frac = ink_lost(test_digits, distorted(test_digits, args.seed + 1)[1])
    lost = {str(t): float((frac > t / 100).double().mean() * 100) for t in (10, 20, 30)}
    store_path = RESULTS / "paper-p-floor.json"
    store = json.loads(store_path.read_text()) if store_path.exists() else {}
    for mode in args.mode.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        print(f"== {mode}: {args.epochs} epochs", flush=True)
        store[mode] = run(mode, args) | {"epochs": args.epochs, "threads": args.threads, "torch": torch.__version__}
        print(f"   {store[mode]}", flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        store_path.write_text(json.dumps(store, indent=1))
        (RESULTS / "paper-p-floor.md").write_text(render(store, lost))
    print(render(store, lost))


if __name__ == "__main__":
    main()
