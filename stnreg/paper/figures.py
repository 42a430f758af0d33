"""Figures like the paper's: inputs beside what the spatial transformer made of them."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle
from torch import Tensor

from ..viz import save_figure
from .models import CoLocalizer, STClassifier

__all__ = ["colocalization_figure", "transformer_figure"]


def _gray(x: Tensor) -> Tensor:
    """``(C, H, W)`` -> ``(H, W)``: channels side by side (addition's two digits)."""
    return torch.cat(list(x), dim=1) if x.shape[0] > 1 else x[0]


@torch.no_grad()
def transformer_figure(model: STClassifier, images: Tensor, path: str | os.PathLike, title: str = "") -> Path:
    """Top row: inputs ``(n, C, H, W)`` uint8; bottom row: the transformer outputs the classifier sees."""
    model.eval()
    x = images.float() / 255.0
    out = model.transformed(x)
    n = len(x)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for i in range(n):
        for row, img in ((0, x[i]), (1, out[i])):
            axes[row, i].imshow(_gray(img).cpu(), cmap="gray", vmin=0, vmax=1)
            axes[row, i].axis("off")
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("transformer output", fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


@torch.no_grad()
def colocalization_figure(
    model: CoLocalizer, images: Tensor, boxes: Tensor, path: str | os.PathLike, title: str = ""
) -> Path:
    """Inputs with the predicted sampling window (red) and the true digit frame (green)."""
    model.eval()
    windows = model.window(images.float() / 255.0)
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(1.8 * n, 2.0), squeeze=False)
    for i in range(n):
        ax = axes[0, i]
        ax.imshow(images[i, 0].cpu(), cmap="gray")
        for box, color in ((boxes[i], "lime"), (windows[i], "red")):
            x0, y0, x1, y1 = (float(v) - 0.5 for v in box)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.2))
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m stnreg.paper.figures CKPT --experiment RTS -o fig.png``: a trained checkpoint's figure."""
    import argparse

    from ..learn.data import resolve_data_path
    from .data import EXPERIMENTS, load_mnist, make_variant
    from .task import ClassificationTask, CoLocalizationTask

    ap = argparse.ArgumentParser(description="inputs and transformer outputs of a trained paper model")
    ap.add_argument("checkpoint")
    ap.add_argument("--experiment", required=True, choices=EXPERIMENTS)
    ap.add_argument("--data", default="mnist/mnist.npz", help="MNIST .npz or IDX folder ($STNREG_DATA-relative)")
    ap.add_argument("-n", type=int, default=10, help="test images shown")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args(argv)
    mnist = load_mnist(resolve_data_path(args.data))
    v = make_variant(args.experiment, mnist["x_test"][: args.n], mnist["y_test"][: args.n], args.seed)
    if args.experiment.startswith("coloc"):
        task = CoLocalizationTask.load_from_checkpoint(args.checkpoint, map_location="cpu")
        colocalization_figure(task.model, v.images, v.boxes, args.output, args.experiment)
    else:
        task = ClassificationTask.load_from_checkpoint(args.checkpoint, map_location="cpu")
        if task.model.transformer is None:
            raise SystemExit(f"{args.checkpoint}: a plain {task.model.architecture} has no transformer to show")
        transformer_figure(task.model, v.images, args.output, args.experiment)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
