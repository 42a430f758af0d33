"""Training pairs synthesized from random label maps, for contrast-agnostic registration networks.

After SynthMorph (Hoffmann et al., IEEE TMI 2022): a network trained on images drawn on the fly from
random label maps, with random intensities, blur, bias fields, gamma and noise, and supervised by
the Dice of the warped labels alone, never sees a real image or a real contrast, and so learns to
align shapes whatever their contrast. Everything here is a batched tensor operation, on the device
of the generator's tensors, deterministic given a ``torch.Generator`` seed, in 2D and 3D.

Shapes: label maps ``(N, 1, *spatial)`` (int64, values ``0 .. labels-1``), one-hot labels
``(N, labels, *spatial)`` (float), images ``(N, 1, *spatial)`` in ``[0, 1]``; spatial axes in array
order (``(H, W)`` / ``(D, H, W)``); deformations are :class:`~stnreg.transforms.StationaryVelocity`
fields in the image's normalized coordinates (:mod:`stnreg.coords`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from ..sampler import gaussian_blur, sample
from ..transforms.dense import StationaryVelocity
from .task import random_affine

__all__ = [
    "SynthConfig",
    "SynthDataModule",
    "images_from_labels",
    "random_label_maps",
    "random_velocity",
    "smooth_noise",
    "synth_pairs",
]


def smooth_noise(
    n: int, channels: int, shape: Sequence[int], cell: float, generator: torch.Generator, device: torch.device | str
) -> Tensor:
    """Gaussian noise drawn on a coarse lattice (one sample per ``cell`` voxels) and upsampled
    (linear) to ``shape``: ``(n, channels, *shape)``, smooth on a scale of ``cell`` voxels."""
    # One coarse sample of margin each side: upsampling clamps at the edges, which would leave bands
    # half a cell wide that are constant across the edge (stripes, once warped).
    margin = math.ceil(cell)
    coarse = [max(2, math.ceil(s / cell)) + 2 for s in shape]
    noise = torch.randn(n, channels, *coarse, generator=generator, device=device)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    big = F.interpolate(noise, size=tuple(s + 2 * margin for s in shape), mode=mode, align_corners=False)
    for dim, s in enumerate(shape, start=2):
        big = big.narrow(dim, margin, s)
    return big


def random_velocity(
    n: int, shape: Sequence[int], strength: float, cell: float, generator: torch.Generator, device: torch.device | str
) -> StationaryVelocity:
    """A random smooth diffeomorphism: ``exp(v)`` of a velocity with components of standard deviation
    ``strength`` (normalized units: a fraction of the half-extent), smooth on ``cell`` voxels."""
    d = len(shape)
    field_shape = [max(4, math.ceil(s / 2)) for s in shape]  # half resolution: the field is smooth anyway
    v = smooth_noise(n, d, field_shape, cell / 2, generator, device) * strength
    return StationaryVelocity(field_shape, params=v)


def random_label_maps(
    n: int,
    shape: Sequence[int],
    labels: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    cell: float = 8.0,
    warp: float = 0.1,
) -> Tensor:
    """Random label maps ``(n, 1, *shape)``: the arg-max over ``labels`` channels of smooth noise
    (blobs about ``cell`` voxels across), warped by a random smooth deformation of ``warp``
    strength so that the blobs' boundaries curve as anatomy does."""
    noise = smooth_noise(n, labels, shape, cell, generator, device)
    phi = random_velocity(n, shape, warp, 4 * cell, generator, device).to(noise.device)
    # Reflection: border padding would smear the edge values into stripes.
    noise = sample(noise, phi.sampling_grid(tuple(shape)), "linear", "reflection")
    return noise.argmax(1, keepdim=True)


def images_from_labels(label_maps: Tensor, labels: int, generator: torch.Generator) -> Tensor:
    """One random contrast per item: a Gaussian mixture over labels (mean ``U(0, 1)``, spread
    ``U(0, 0.1)`` per label), partial-volume blur (sigma ``U(0, 1)`` voxels), a smooth multiplicative
    bias field, gamma ``exp(N(0, 0.25))``, noise ``U(0, 0.05)``; rescaled to ``[0, 1]``."""
    n, dev = label_maps.shape[0], label_maps.device
    d = label_maps.dim() - 2
    shape = tuple(label_maps.shape[2:])

    def u(*size: int) -> Tensor:
        return torch.rand(*size, generator=generator, device=dev)

    means, spreads = u(n, labels), u(n, labels) * 0.1
    flat = label_maps.flatten(1)
    img = means.gather(1, flat) + spreads.gather(1, flat) * torch.randn(flat.shape, generator=generator, device=dev)
    img = img.view(n, 1, *shape)
    img = gaussian_blur(img, u(n, 1).expand(n, d).cpu())
    bias = torch.exp(0.3 * smooth_noise(n, 1, shape, max(shape) / 4, generator, dev))
    img = (img * bias).clamp_min(0)
    img = img / img.flatten(1).amax(1).clamp_min(1e-6).view(n, *[1] * (d + 1))
    img = img ** torch.exp(0.25 * torch.randn(n, generator=generator, device=dev)).view(n, *[1] * (d + 1))
    img = img + u(n, 1).view(n, *[1] * (d + 1)) * 0.05 * torch.randn(img.shape, generator=generator, device=dev)
    lo = img.flatten(1).amin(1).view(n, *[1] * (d + 1))
    hi = img.flatten(1).amax(1).view(n, *[1] * (d + 1))
    return (img - lo) / (hi - lo).clamp_min(1e-6)


@dataclass(frozen=True)
class SynthConfig:
    """How pairs are drawn (see :func:`synth_pairs`).

    Attributes:
        shape: array-order spatial shape.
        labels: label values per map (background included).
        cell: blob size of the label maps, voxels.
        warp: shape warp of each label map (normalized units).
        deform: strength of the deformation between the two images of a pair (normalized units).
        affine: strength of a random affine between them (1: ±10° rotation, ~5% scale, ±5% shift).
        same_map: probability that both images come from one label map; otherwise each image's
            map is the shared one with an independent warp, as two subjects' anatomy differs.
    """

    shape: tuple[int, ...] = (64, 64, 64)
    labels: int = 16
    cell: float = 8.0
    warp: float = 0.1
    deform: float = 0.05
    affine: float = 1.0
    same_map: float = 0.5


def synth_pairs(n: int, config: SynthConfig, generator: torch.Generator, device: torch.device | str = "cpu") -> dict:
    """A batch of synthetic pairs: ``{"moving", "fixed"}`` images ``(n, 1, *shape)`` of independent
    random contrasts and ``{"moving_labels", "fixed_labels"}`` one-hot ``(n, labels, *shape)``.

    The moving map is the fixed map (or, with probability ``1 - same_map``, another warp of the same
    parent) moved by a random diffeomorphism and a random affine: the network has to undo both.
    """
    shape = tuple(config.shape)
    parent = random_label_maps(n, shape, config.labels, generator, device, config.cell, config.warp)
    fixed = parent
    phi = random_velocity(n, shape, config.deform, 4 * config.cell, generator, device).to(parent.device)
    coords = phi.sampling_grid(shape)
    if config.affine:
        coords = random_affine(n, len(shape), config.affine, generator).to(parent.device)(coords)
    moving = sample(parent, coords, "label", "zeros")
    other = torch.rand(n, generator=generator, device=parent.device) >= config.same_map
    if bool(other.any()):
        # A second anatomy: the parent map under an independent shape warp.
        psi = random_velocity(n, shape, config.warp / 2, 2 * config.cell, generator, device).to(parent.device)
        alt = sample(moving, psi.sampling_grid(shape), "label", "zeros")
        moving = torch.where(other.view(n, *[1] * (len(shape) + 1)), alt, moving)

    def one_hot(m: Tensor) -> Tensor:
        return F.one_hot(m[:, 0], config.labels).movedim(-1, 1).float()

    return {
        "moving": images_from_labels(moving, config.labels, generator),
        "fixed": images_from_labels(fixed, config.labels, generator),
        "moving_labels": one_hot(moving),
        "fixed_labels": one_hot(fixed),
    }


class _Stream(IterableDataset):
    """Endless batches from a seed (one stream per dataloader worker and process rank)."""

    def __init__(self, config: SynthConfig, batch_size: int, seed: int, count: int | None = None) -> None:
        self.config, self.batch_size, self.seed, self.count = config, batch_size, seed, count

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
        g = torch.Generator().manual_seed(self.seed + 1000 * rank + (info.id if info else 0))
        k = 0
        while self.count is None or k < self.count:
            yield synth_pairs(self.batch_size, self.config, g)
            k += 1


class SynthDataModule(L.LightningDataModule):
    """Synthetic training pairs drawn on the fly (:func:`synth_pairs`); a fixed validation set.

    Args:
        shape ... same_map: see :class:`SynthConfig`.
        batch_size: pairs per batch.
        val_batches: validation batches (the same pairs every epoch: drawn from ``seed + 1``).
        seed: the training stream's seed.
    """

    def __init__(
        self,
        shape: list[int] | None = None,
        labels: int = 16,
        cell: float = 8.0,
        warp: float = 0.1,
        deform: float = 0.05,
        affine: float = 1.0,
        same_map: float = 0.5,
        batch_size: int = 1,
        val_batches: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = SynthConfig(tuple(shape or (64, 64, 64)), labels, cell, warp, deform, affine, same_map)
        self.batch_size, self.val_batches, self.seed = batch_size, val_batches, seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Stream(self.config, self.batch_size, self.seed), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Stream(self.config, self.batch_size, self.seed + 1, self.val_batches), batch_size=None)
