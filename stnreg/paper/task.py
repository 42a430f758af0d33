"""LightningModules for the paper's experiments: classification and co-localization.

Both take plain constructor values (saved in checkpoints, so a file alone restores the model) and
read uint8 images from the data modules, scaling them to [0, 1] on the device. The transformer's
parameters (localization network and head) train with ``lr * loc_lr_scale``, the paper-era split.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from ..sampler import sample
from ..transforms import Attention
from .models import CoLocalizer, STClassifier

__all__ = ["CUBTask", "ClassificationTask", "CoLocalizationTask", "SVHNTask", "box_iou"]


def _optimizer(module: L.LightningModule, transformer: torch.nn.Module | None):
    h = module.hparams
    st = set() if transformer is None else {id(p) for p in transformer.parameters()}
    groups = [{"params": [p for p in module.parameters() if id(p) not in st], "lr": h.lr}]
    if st:
        groups.append({"params": list(transformer.parameters()), "lr": h.lr * h.loc_lr_scale})
    if h.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
    elif h.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=h.lr, weight_decay=h.weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {h.optimizer!r}")
    # Cosine decay over the whole run: a short budget still ends at a small learning rate.
    total = max(1, int(module.trainer.estimated_stepping_batches))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _Supervised(L.LightningModule):
    """Shared steps of the supervised tasks: uint8 images to [0, 1], loss and % error per stage."""

    def _transformer(self) -> torch.nn.Module | None:  # pragma: no cover - each task names its own
        raise NotImplementedError

    def _loss_and_error(self, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return F.cross_entropy(logits, y), 100.0 * (logits.argmax(1) != y).float().mean()

    def _step(self, batch: list[Tensor], stage: str) -> Tensor:
        x, y = batch[0].float() / 255.0, batch[1]
        loss, error = self._loss_and_error(self(x), y)
        on_epoch = stage != "train"
        self.log(f"{stage}/loss", loss, batch_size=len(y), sync_dist=on_epoch)
        self.log(f"{stage}/error", error, prog_bar=True, batch_size=len(y), sync_dist=on_epoch)
        return loss

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        return _optimizer(self, self._transformer())


class ClassificationTask(_Supervised):
    """Train an :class:`~stnreg.paper.models.STClassifier`; logs ``val/error`` and ``test/error`` in %.

    Args: the classifier's (see :class:`STClassifier`), and
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``; lr, weight_decay.
        loc_lr_scale: learning-rate factor of the transformer's parameters.
    """

    def __init__(
        self,
        architecture: str = "st-cnn",
        in_shape: list[int] | None = None,
        classes: int = 10,
        transform: str = "affine",
        st_output: list[int] | None = None,
        st_pool: int = 1,
        transformers: int = 1,
        fcn_hidden: list[int] | None = None,
        cnn_channels: list[int] | None = None,
        cnn_kernels: list[int] | None = None,
        dropout: float = 0.0,
        loc_hidden: list[int] | None = None,
        loc_channels: list[int] | None = None,
        loc_kernel: int = 5,
        loc_features: int = 50,
        tps_points: int = 4,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        loc_lr_scale: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        opt = {
            k: v
            for k, v in {
                "fcn_hidden": fcn_hidden,
                "cnn_channels": cnn_channels,
                "cnn_kernels": cnn_kernels,
                "loc_hidden": loc_hidden,
                "loc_channels": loc_channels,
            }.items()
            if v is not None
        }
        self.model = STClassifier(
            architecture,
            in_shape or [1, 28, 28],
            classes,
            transform,
            st_output,
            st_pool,
            transformers,
            dropout=dropout,
            loc_kernel=loc_kernel,
            loc_features=loc_features,
            tps_points=tps_points,
            **opt,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _transformer(self) -> torch.nn.Module | None:
        return self.model.transformer


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of boxes ``(N, 4)`` = ``x0, y0, x1, y1``."""
    lo = torch.maximum(a[:, :2], b[:, :2])
    hi = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (hi - lo).clamp(min=0).prod(1)
    area = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1) + (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    return inter / (area - inter).clamp_min(1e-12)


class CoLocalizationTask(L.LightningModule):
    """The paper's co-localization: images of one class; a triplet hinge loss
    ``max(0, |e(T I_n) - e(T I_m)|² - |e(T I_n) - e(R I_n)|² + margin)`` pulls the attended crops of
    different images together and pushes a random crop ``R I_n`` of the same image away. Scored by
    the share of sampling windows with IoU > 0.5 against the true digit frame (``val/accuracy``, %).
    """

    def __init__(
        self,
        size: int = 84,
        crop: int = 28,
        embedding: int = 32,
        margin: float = 1.0,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        loc_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = CoLocalizer(size, crop, embedding)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def random_crops(self, x: Tensor) -> Tensor:
        """Digit-sized crops at uniformly random places of ``x`` ``(N, 1, H, W)``."""
        s = self.hparams.crop / self.hparams.size
        n = x.shape[0]
        t = (torch.rand(n, 2, device=x.device) * 2 - 1) * (1 - s)
        att = Attention(2).with_params(torch.cat([torch.full((n, 1), s, device=x.device), t], 1))
        c = self.hparams.crop
        return sample(x, att.sampling_grid((c, c)).to(x.dtype), "linear", "zeros")

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x = batch[0].float() / 255.0
        e = self(x)
        pos = e.roll(1, 0)
        neg = self.model.encoder(self.random_crops(x))
        loss = F.relu((e - pos).pow(2).sum(1) - (e - neg).pow(2).sum(1) + self.hparams.margin).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        x, boxes = batch[0].float() / 255.0, batch[2].float()
        hit = box_iou(self.model.window(x), boxes) > 0.5
        self.log("val/accuracy", 100.0 * hit.float().mean(), prog_bar=True, batch_size=len(x), sync_dist=True)
        self.log("val/error", 100.0 * (~hit).float().mean(), batch_size=len(x), sync_dist=True)

    def test_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        return _optimizer(self, self.model.transformer)


class SVHNTask(_Supervised):
    """Multi-digit SVHN with :class:`~stnreg.paper.models.SVHNNet`: summed cross-entropy over the five
    positions; ``val/error`` is the % of numbers with any position wrong (the paper's sequence error)."""

    def __init__(
        self,
        size: int = 64,
        st: str = "single",
        channels: list[int] | None = None,
        hidden: int = 512,
        transform: str = "affine",
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        loc_lr_scale: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from .models import SVHNNet

        kw = {"channels": channels} if channels else {}
        self.model = SVHNNet(size, st, hidden=hidden, transform=transform, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _loss_and_error(self, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss = F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1)) * y.shape[1]
        return loss, 100.0 * (logits.argmax(-1) != y).any(1).float().mean()

    def _transformer(self) -> torch.nn.Module | None:
        return self.model.transformers


class CUBTask(_Supervised):
    """CUB-200 with :class:`~stnreg.paper.models.PartAttentionNet`; ``val/error`` in %."""

    def __init__(
        self,
        transformers: int = 2,
        crop: int = 112,
        channels: list[int] | None = None,
        classes: int = 200,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        loc_lr_scale: float = 0.01,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from .models import PartAttentionNet

        kw = {"channels": channels} if channels else {}
        self.model = PartAttentionNet(transformers, crop, classes=classes, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _transformer(self) -> torch.nn.Module | None:
        return self.model.transformers
