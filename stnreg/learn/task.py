"""The LightningModule that trains a :class:`~stnreg.learn.model.RegistrationNet`.

Unsupervised: ``similarity(warped, fixed) + Σ w · regularizer(field)``, the regularizers acting on
every dense stage's field in voxels (the velocity for ``svf``). Weakly supervised: add
``dice_weight · Dice(warped moving labels, fixed labels)``. The constructor arguments are plain
values saved in every checkpoint (``hyper_parameters``), so ``RegistrationTask.load_from_checkpoint``
(or :func:`load_task`) restores the model from the file alone.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ..errors import InputError
from ..fields import jacobian_determinant
from ..losses import RegistrationLoss
from ..sampler import sample
from ..transforms.base import Transform
from ..transforms.matrix import Affine, rotation_matrix
from .model import DENSE, RegistrationNet, RegistrationOutput

__all__ = ["SHIPPED", "RegistrationTask", "load_task", "random_affine", "voxel_displacement"]


def random_affine(
    n: int,
    ndim: int,
    strength: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Affine:
    """Random normalized-space affines for augmentation: rotation ``±10°·s``, scale ``exp(N(0, 0.05 s))``
    per axis, translation ``±0.05·s`` of the half-extent, batch ``n``, on ``device`` (the
    generator's)."""
    g = generator
    k = 1 if ndim == 2 else 3
    rot = (torch.rand(n, k, generator=g, device=device) * 2 - 1) * math.radians(10.0) * strength
    scale = torch.exp(torch.randn(n, ndim, generator=g, device=device) * 0.05 * strength)
    shift = (torch.rand(n, ndim, generator=g, device=device) * 2 - 1) * 0.05 * strength
    linear = rotation_matrix(rot, ndim) * scale.unsqueeze(1)
    return Affine(ndim, params=torch.cat([linear, shift.unsqueeze(-1)], -1))


def voxel_displacement(transform: Transform, shape: tuple[int, ...]) -> Tensor:
    """``T(x) - x`` on the lattice of ``shape`` in voxels, ``(N, d, *shape)``, ``(x, y, z)`` channels,
    for a normalized-domain transform."""
    from ..coords import lattice

    mapped = transform.mapped_lattice(shape)
    grid = lattice(shape, dtype=mapped.dtype, device=mapped.device)
    half = torch.tensor([s / 2 for s in reversed(shape)], dtype=mapped.dtype, device=mapped.device)
    return torch.movedim((mapped - grid) * half, -1, 1)


class RegistrationTask(L.LightningModule):
    """Train a registration network from ``(moving, fixed[, labels])`` batches.

    Args:
        ndim ... matrix_net: the network (see :class:`~stnreg.learn.model.RegistrationNet`).
        similarity: ``"mse"``, ``"ncc"``, ``"lncc"`` (``window`` voxels) or ``"mi"``.
        regularization: weights of ``"diffusion"``, ``"bending"``, ``"folding"`` on dense fields
            (default ``{"diffusion": 1.0}``).
        dice_weight: weight of the Dice loss on labels (0: labels only evaluated).
        similarity_weight: weight of the image similarity (0: trained by the labels alone, as on
            synthetic pairs, :class:`~stnreg.learn.synth.SynthDataModule`).
        flow_weight: weight of the mean squared end-point error, in voxels of the fixed image,
            between the network's map and a batch's exact ``"target"`` map (synthetic pairs know
            it): a signal at every voxel, inside a label too, where the Dice has none. What decides
            whether a network starts to learn is the contrast, though (``same_contrast`` of
            :class:`~stnreg.learn.synth.SynthConfig`): on 2D pairs of one contrast the Dice alone
            did better in 1200 steps (``benchmarks/results/learned-synth.md``).
        lr: Adam learning rate.
        augment: strength of random affine augmentation applied independently to each image of a
            training pair (0: none; 1: ±10° rotation, ~5% scale, ±5% shift).
        input_shape: the array-order size the network was trained at (filled in from the data);
            inference resamples images to it.
    """

    def __init__(
        self,
        ndim: int = 2,
        stages: list[str] | None = None,
        in_channels: int = 1,
        encoder: list[int] | None = None,
        decoder: list[int] | None = None,
        final: list[int] | None = None,
        loc_channels: list[int] | None = None,
        loc_features: int = 64,
        control_points: int = 5,
        field_factor: int = 1,
        int_steps: int = 7,
        loc_pool: int = 4,
        matrix_net: str = "cnn",
        similarity: str = "lncc",
        window: int = 9,
        regularization: dict[str, float] | None = None,
        dice_weight: float = 0.0,
        similarity_weight: float = 1.0,
        flow_weight: float = 0.0,
        lr: float = 1e-3,
        augment: float = 0.0,
        input_shape: list[int] | None = None,
    ) -> None:
        super().__init__()
        RegistrationLoss(similarity, window, regularization=dict(regularization or {}))  # validates the names
        self.save_hyperparameters()
        net: dict[str, Any] = {"ndim": ndim, "stages": stages or ["svf"], "in_channels": in_channels}
        for key, value in (
            ("encoder", encoder),
            ("decoder", decoder),
            ("final", final),
            ("loc_channels", loc_channels),
        ):
            if value is not None:
                net[key] = value
        self.net = RegistrationNet(
            **net,
            loc_features=loc_features,
            control_points=control_points,
            field_factor=field_factor,
            int_steps=int_steps,
            loc_pool=loc_pool,
            matrix_net=matrix_net,
        )
        self.regularization = {"diffusion": 1.0} if regularization is None else dict(regularization)
        # The same loss definition as instance optimization (stnreg.register) uses.
        self.loss = RegistrationLoss(
            similarity,
            window,
            regularization=self.regularization,
            dice_weight=dice_weight,
            similarity_weight=similarity_weight,
        )

    def forward(self, moving: Tensor, fixed: Tensor) -> RegistrationOutput:
        return self.net(moving, fixed)

    def objective(
        self,
        out: RegistrationOutput,
        moving: Tensor,
        fixed: Tensor,
        moving_labels: Tensor | None = None,
        fixed_labels: Tensor | None = None,
        target: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms and their sum ``"loss"`` for a network (or refined) output; ``target`` is the
        exact map ``(N, *shape, d)`` (normalized, as ``sampling_grid``) where a batch knows it."""
        h = self.hparams
        fields = [out.raw[k] if family in DENSE else None for k, family in enumerate(self.net.stages)]
        warped_labels = None
        if h.dice_weight and moving_labels is not None and fixed_labels is not None:
            warped_labels = self.net.warp(moving_labels.float(), out.transform)
        labels = None if fixed_labels is None else fixed_labels.float()
        terms = self.loss(out.warped, fixed, fields, warped_labels, labels)
        if h.get("flow_weight") and target is not None:
            shape = tuple(fixed.shape[2:])
            half = torch.tensor([s / 2 for s in reversed(shape)], dtype=target.dtype, device=target.device)
            error = (out.transform.sampling_grid(shape) - target) * half
            terms["flow"] = h.flow_weight * error.square().sum(-1).mean()
            terms["loss"] = terms["loss"] + terms["flow"]
        return terms

    def _augment(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        h = self.hparams
        out = dict(batch)
        maps = {}
        for img_key, lab_key in (("moving", "moving_labels"), ("fixed", "fixed_labels")):
            img = batch[img_key]
            t = random_affine(img.shape[0], h.ndim, h.augment).to(img.device)
            coords = t.sampling_grid(tuple(img.shape[2:])).to(img.dtype)
            maps[img_key] = (t, coords)
            out[img_key] = sample(img, coords, "linear", "border")
            if lab_key in batch:
                out[lab_key] = sample(batch[lab_key].float(), coords, "nearest", "zeros")
        if "target" in batch:
            # moving'(x) = moving(Am x), fixed'(x) = fixed(Af x): the exact map becomes Am^-1 o T o Af.
            (am, _), (_, fixed_coords) = maps["moving"], maps["fixed"]
            moved = sample(batch["target"].movedim(-1, 1), fixed_coords.to(batch["target"].dtype), "linear", "border")
            out["target"] = am.inverse()(moved.movedim(1, -1))
        return out

    def _batch_terms(self, batch: dict[str, Tensor]) -> tuple[RegistrationOutput, dict[str, Tensor]]:
        """The network's output on a batch and its loss terms (labels and exact map where present)."""
        out = self(batch["moving"], batch["fixed"])
        labels = (batch.get("moving_labels"), batch.get("fixed_labels"))
        return out, self.objective(out, batch["moving"], batch["fixed"], *labels, batch.get("target"))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.hparams.input_shape is None:
            self.hparams.input_shape = list(batch["fixed"].shape[2:])
        if self.hparams.augment:
            batch = self._augment(batch)
        _, terms = self._batch_terms(batch)
        n = batch["fixed"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, prog_bar=False, batch_size=n)
        self.log("loss", terms["loss"], prog_bar=True, logger=False, batch_size=n)
        return terms["loss"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out, terms = self._batch_terms(batch)
        n = batch["fixed"].shape[0]
        logs = {f"val/{k}": v for k, v in terms.items()}
        jac = jacobian_determinant(voxel_displacement(out.transform, tuple(batch["fixed"].shape[2:])))
        logs["val/folding_percent"] = 100.0 * (jac <= 0).float().mean()
        if "moving_labels" in batch:
            warped = self.net.warp(batch["moving_labels"].float(), out.transform) > 0.5
            fixed = batch["fixed_labels"] > 0
            dims = tuple(range(2, fixed.dim()))
            inter = (warped & fixed).sum(dims).float()
            total = (warped.sum(dims) + fixed.sum(dims)).float()
            logs["val/dice"] = (2 * inter / total.clamp_min(1)).mean()
        self.log_dict(logs, prog_bar=True, batch_size=n, sync_dist=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


# Models shipped inside the package, by name (``stnreg register ... --model synth``).
SHIPPED = {"synth": "synth_svf.ckpt"}
MODEL_DIR = Path(__file__).resolve().parent / "models"


def load_task(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> RegistrationTask:
    """A trained :class:`RegistrationTask` from a Lightning checkpoint, in eval mode.

    ``path`` is a checkpoint file or the name of a shipped model (:data:`SHIPPED`: ``"synth"``, a 3D
    affine + SVF network trained on synthetic pairs only, :mod:`stnreg.learn.synth`).
    """
    p = MODEL_DIR / SHIPPED[str(path)] if str(path) in SHIPPED else Path(path)
    if str(path) in SHIPPED and not p.is_file():
        raise InputError(
            f"the model {path!r} is not installed ({p} is missing): train one with stnreg fit --config "
            f"configs/synth_svf.yaml and give its checkpoint, or place it there"
        )
    if not p.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        task = RegistrationTask.load_from_checkpoint(p, map_location=map_location)
    except (KeyError, RuntimeError, TypeError) as err:
        raise InputError(f"{p}: not a stnreg registration checkpoint ({err})") from None
    return task.eval()
