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
from dataclasses import dataclass, replace

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
    "random_contrast",
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


def random_contrast(n: int, labels: int, generator: torch.Generator, device: torch.device | str) -> Tensor:
    """Per-label intensity means ``U(0, 1)`` and spreads ``U(0, 0.1)``: ``(n, 2, labels)``."""
    u = torch.rand(n, 2, labels, generator=generator, device=device)
    return u * torch.tensor([1.0, 0.1], device=device).view(1, 2, 1)


def images_from_labels(
    label_maps: Tensor, labels: int, generator: torch.Generator, contrast: Tensor | None = None
) -> Tensor:
    """One random contrast per item: a Gaussian mixture over labels (``contrast`` from
    :func:`random_contrast`, drawn when not given), partial-volume blur (sigma ``U(0, 1)`` voxels),
    a smooth multiplicative bias field, gamma ``exp(N(0, 0.25))``, noise ``U(0, 0.05)``; rescaled
    to ``[0, 1]``."""
    n, dev = label_maps.shape[0], label_maps.device
    d = label_maps.dim() - 2
    shape = tuple(label_maps.shape[2:])

    def u(*size: int) -> Tensor:
        return torch.rand(*size, generator=generator, device=dev)

    if contrast is None:
        contrast = random_contrast(n, labels, generator, dev)
    means, spreads = contrast[:, 0], contrast[:, 1]
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
        same_contrast: probability that both images share one draw of label intensities (blur,
            bias, gamma and noise stay independent). Such pairs are what an untrained network can
            learn from: in 1200 steps on 2D pairs its flow error went from 3.33 to 1.03 voxels²
            with one contrast and stayed at 3.22 with independent ones
            (``benchmarks/results/learned-synth.md``); the rest teach it to ignore contrast.
    """

    shape: tuple[int, ...] = (64, 64, 64)
    labels: int = 16
    cell: float = 8.0
    warp: float = 0.1
    deform: float = 0.05
    affine: float = 1.0
    same_map: float = 0.5
    same_contrast: float = 0.0


def synth_pairs(n: int, config: SynthConfig, generator: torch.Generator, device: torch.device | str = "cpu") -> dict:
    """A batch of synthetic pairs: ``{"moving", "fixed"}`` images ``(n, 1, *shape)`` of independent
    random contrasts, ``{"moving_labels", "fixed_labels"}`` one-hot ``(n, labels, *shape)`` and
    ``"target"``, the exact fixed -> moving map at the fixed voxel centres, ``(n, *shape, d)`` in
    normalized ``(x, y, z)`` coordinates (what a perfect network's ``sampling_grid`` returns).

    The moving map is the fixed map (or, with probability ``1 - same_map``, another warp of the same
    parent) moved by a random diffeomorphism and a random affine: the network has to undo both.
    """
    shape = tuple(config.shape)
    parent = random_label_maps(n, shape, config.labels, generator, device, config.cell, config.warp)
    fixed = parent
    phi = random_velocity(n, shape, config.deform, 4 * config.cell, generator, device).to(parent.device)
    coords = phi.sampling_grid(shape)
    # The exact answer, T with moving(T(x)) = fixed(x): the inverse of every map applied to the moving
    # map, in reverse order (T = psi^-1 o phi^-1 o A^-1 below).
    target = phi.inverse()
    if config.affine:
        a = random_affine(n, len(shape), config.affine, generator, parent.device)
        coords = a(coords)
        target = target.compose(a.inverse())
    moving = sample(parent, coords, "label", "zeros")
    target_grid = target.sampling_grid(shape)
    other = torch.rand(n, generator=generator, device=parent.device) >= config.same_map
    if bool(other.any()):
        # A second anatomy: the parent map under an independent shape warp.
        psi = random_velocity(n, shape, config.warp / 2, 2 * config.cell, generator, device).to(parent.device)
        alt = sample(moving, psi.sampling_grid(shape), "label", "zeros")
        moving = torch.where(other.view(n, *[1] * (len(shape) + 1)), alt, moving)
        alt_grid = psi.inverse().compose(target).sampling_grid(shape)
        target_grid = torch.where(other.view(n, *[1] * (len(shape) + 1)), alt_grid, target_grid)

    def one_hot(m: Tensor) -> Tensor:
        return F.one_hot(m[:, 0], config.labels).movedim(-1, 1).float()

    fixed_contrast = random_contrast(n, config.labels, generator, parent.device)
    shared = torch.rand(n, generator=generator, device=parent.device) < config.same_contrast
    moving_contrast = torch.where(
        shared.view(n, 1, 1), fixed_contrast, random_contrast(n, config.labels, generator, parent.device)
    )
    return {
        "moving": images_from_labels(moving, config.labels, generator, moving_contrast),
        "fixed": images_from_labels(fixed, config.labels, generator, fixed_contrast),
        "moving_labels": one_hot(moving),
        "fixed_labels": one_hot(fixed),
        "target": target_grid,
    }


class _Stream(IterableDataset):
    """Endless batches from a seed (one stream per dataloader worker and process rank)."""

    def __init__(
        self,
        config: SynthConfig,
        batch_size: int,
        seed: int,
        count: int | None = None,
        device: str = "cpu",
        contrast_warmup: int = 0,
    ) -> None:
        self.config, self.batch_size, self.seed, self.count = config, batch_size, seed, count
        self.device, self.contrast_warmup = device, contrast_warmup

    def _config(self, k: int) -> SynthConfig:
        """The config of batch ``k``: ``same_contrast`` falls linearly from 1 to its value over the
        first ``contrast_warmup`` batches."""
        if k >= self.contrast_warmup:
            return self.config
        p = self.config.same_contrast
        return replace(self.config, same_contrast=1.0 - (1.0 - p) * k / self.contrast_warmup)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        g = torch.Generator(device=device).manual_seed(self.seed + 1000 * rank + (info.id if info else 0))
        k = 0
        while self.count is None or k < self.count:
            yield synth_pairs(self.batch_size, self._config(k), g, device)
            k += 1


class SynthDataModule(L.LightningDataModule):
    """Synthetic training pairs drawn on the fly (:func:`synth_pairs`); a fixed validation set.

    Args:
        shape ... same_contrast: see :class:`SynthConfig`.
        batch_size: pairs per batch.
        val_batches: validation batches (the same pairs every epoch: drawn from ``seed + 1``).
        seed: the training stream's seed.
        contrast_warmup: training batches over which the probability of a shared contrast falls
            linearly from 1 to ``same_contrast`` (0: none): a network learns to register one
            contrast first and only then, slowly, across contrasts.
        device: where pairs are drawn: ``"cpu"``, ``"cuda"`` (on the GPU that trains, no copies:
            synthesis on the CPU would starve a GPU), or ``"auto"`` (CUDA when there is one). A
            CUDA stream draws other numbers than a CPU one from the same seed.
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
        same_contrast: float = 0.0,
        contrast_warmup: int = 0,
        batch_size: int = 1,
        val_batches: int = 4,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = SynthConfig(
            tuple(shape or (64, 64, 64)), labels, cell, warp, deform, affine, same_map, same_contrast
        )
        # Validation always pairs independent contrasts: what the network is for.
        self.val_config = replace(self.config, same_contrast=0.0)
        self.batch_size, self.val_batches, self.seed = batch_size, val_batches, seed
        self.contrast_warmup = contrast_warmup
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device

    def train_dataloader(self) -> DataLoader:
        stream = _Stream(self.config, self.batch_size, self.seed, None, self.device, self.contrast_warmup)
        return DataLoader(stream, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        stream = _Stream(self.val_config, self.batch_size, self.seed + 1, self.val_batches, self.device)
        return DataLoader(stream, batch_size=None)
