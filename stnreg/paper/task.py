"""LightningModules for the paper's experiments: classification and co-localization.

Both take plain constructor values (saved in checkpoints, so a file alone restores the model) and
read uint8 images from the data modules, scaling them to [0, 1] on the device. In the supervised
tasks the transformer's parameters (localization network and head) train with ``lr * loc_lr_scale``,
the paper-era split; co-localization trains only its localization network (the encoder is fixed).
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from .models import CoLocalizer, STClassifier

__all__ = ["CUBTask", "ClassificationTask", "CoLocalizationTask", "SVHNTask", "box_iou"]


def _split_groups(module: L.LightningModule, transformer: torch.nn.Module | None) -> list[dict]:
    """The transformer's parameters at ``lr * loc_lr_scale``, everything else at ``lr``."""
    h = module.hparams
    st = set() if transformer is None else {id(p) for p in transformer.parameters()}
    groups = [{"params": [p for p in module.parameters() if id(p) not in st], "lr": h.lr}]
    if st:
        groups.append({"params": list(transformer.parameters()), "lr": h.lr * h.loc_lr_scale})
    return groups


def _optimizer(module: L.LightningModule, groups: list[dict]):
    """The task's optimizer (``sgd`` or ``adam``) over ``groups``, with a per-step cosine decay."""
    h = module.hparams
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
        if self.hparams.get("channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
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
        return _optimizer(self, _split_groups(self, self._transformer()))


class ClassificationTask(_Supervised):
    """Train an :class:`~stnreg.paper.models.STClassifier`; logs ``val/error`` and ``test/error`` in %.

    Args: the classifier's (see :class:`STClassifier`), and
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``; lr, weight_decay.
        loc_lr_scale: learning-rate factor of the transformer's parameters.
        channels_last: keep weights and batches in ``channels_last`` memory format, which oneDNN's
            convolutions run 1.3-1.6x faster on CPU (measured on these models, one thread); the
            numbers are the same either way.
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
        cnn_hidden: list[int] | None = None,
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
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        opt = {
            k: v
            for k, v in {
                "fcn_hidden": fcn_hidden,
                "cnn_channels": cnn_channels,
                "cnn_kernels": cnn_kernels,
                "cnn_hidden": cnn_hidden,
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
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

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
    """The paper's co-localization: images of one class, and no labels or boxes in training.

    Paper: an ST with an attention transform crops each image ``I_n``; with ``e()`` the first layers
    of a CNN pre-trained for MNIST classification (fixed), the triplet hinge loss
    ``sum_n sum_{m != n} max(0, |e(T I_n) - e(T I_m)|² - |e(T I_n) - e(R I_n)|² + margin)`` pulls
    the crops of different images together and pushes each away from a random crop ``R I_n`` of the
    same image. Scored by the share of windows with IoU > 0.5 against the digit's frame
    (``val/accuracy``, %).

    Here, with the same loss (all pairs ``m != n`` of the batch):

    * pre-training: at the start of the first fit (:meth:`on_fit_start`), the model's encoder and
      classifier are trained on plain 28x28 MNIST digits of all classes (``pretrain_digits`` of the
      training set, ``pretrain_epochs`` of Adam at ``pretrain_lr``, batch ``pretrain_batch``,
      shuffled with ``pretrain_seed``; a few seconds at one thread), then frozen. The digits come
      from ``pretrain_data`` (an MNIST ``.npz`` or IDX folder, ``$STNREG_DATA``-relative), by
      default the data module's ``data``; the classifier's error on the first 2,000 test digits
      is kept in the ``pretrain_error`` buffer (%). The flag ``pretrained`` is a buffer too, so a
      checkpoint restores the encoder and does not pre-train again. Only the localization network
      is optimized afterwards.
    * coarse to fine: the window's scale starts at ``start_scale`` (most of the image, so every
      window holds its digit) and shrinks geometrically to ``crop / size`` over the first
      ``anneal`` of the training steps; the random crops ``R I_n`` have the current scale. With
      digit-sized windows from the start, windows that miss the digit get no gradient (the crop is
      empty background whatever the shift), empty crops are all alike (zero pull term), and the
      windows drift onto the background; started large, the windows keep their digit while they
      shrink.
    * evaluation uses digit-sized windows (:meth:`CoLocalizer.window`).
    """

    def __init__(
        self,
        size: int = 84,
        crop: int = 28,
        margin: float = 1.0,
        start_scale: float = 0.9,
        anneal: float = 0.75,
        beta: float = 10.0,
        loc_channels: list[int] | None = None,
        enc_channels: list[int] | None = None,
        pretrain_data: str | None = None,
        pretrain_digits: int = 10_000,
        pretrain_epochs: int = 1,
        pretrain_lr: float = 1e-3,
        pretrain_batch: int = 128,
        pretrain_seed: int = 0,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        kw = {k: v for k, v in {"loc_channels": loc_channels, "enc_channels": enc_channels}.items() if v is not None}
        self.model = CoLocalizer(size, crop, beta=beta, **kw)
        self.register_buffer("pretrained", torch.zeros((), dtype=torch.bool))
        self.register_buffer("pretrain_error", torch.tensor(float("nan")))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    # -- encoder pre-training -------------------------------------------------------------------

    def pretrain(self, images: Tensor, labels: Tensor, test_images: Tensor | None = None, test_labels=None) -> float:
        """Train the encoder + classifier on digits ``(N, 28, 28)`` uint8, then freeze them.

        Returns the classification error (%) on ``test_images`` (NaN without them).
        """
        h, m, dev = self.hparams, self.model, self.device
        x = torch.as_tensor(images)[:, None].to(dev)
        y = torch.as_tensor(labels).long().to(dev)
        params = list(m.encoder.parameters()) + list(m.classifier.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=h.pretrain_lr)
        g = torch.Generator().manual_seed(h.pretrain_seed)
        with torch.enable_grad():
            for _ in range(h.pretrain_epochs):
                order = torch.randperm(len(x), generator=g).to(dev)
                for i in range(0, len(x), h.pretrain_batch):
                    idx = order[i : i + h.pretrain_batch]
                    loss = F.cross_entropy(m.pretrain_step(x[idx].float() / 255.0), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        error = float("nan")
        if test_images is not None:
            with torch.no_grad():
                xt = torch.as_tensor(test_images)[:, None].to(dev).float() / 255.0
                pred = m.pretrain_step(xt).argmax(1).cpu()
                error = 100.0 * float((pred != torch.as_tensor(test_labels).long()).float().mean())
        self.freeze_encoder()
        self.pretrained.fill_(True)
        self.pretrain_error.fill_(error)
        return error

    def freeze_encoder(self) -> None:
        for p in list(self.model.encoder.parameters()) + list(self.model.classifier.parameters()):
            p.requires_grad_(False)

    def on_fit_start(self) -> None:
        if not bool(self.pretrained):
            from ..learn.data import resolve_data_path
            from .data import load_mnist

            path = self.hparams.pretrain_data
            if path is None:
                dm = getattr(self.trainer, "datamodule", None)
                path = getattr(getattr(dm, "hparams", {}), "data", None) if dm is not None else None
                if path is None:
                    raise ValueError("no pretrain_data given and the data module names no MNIST 'data'")
            mnist = load_mnist(resolve_data_path(path))
            n = self.hparams.pretrain_digits
            self.pretrain(mnist["x_train"][:n], mnist["y_train"][:n], mnist["x_test"][:2000], mnist["y_test"][:2000])
        self.freeze_encoder()

    # -- co-localization --------------------------------------------------------------------------

    def scale_at(self, step: int) -> float:
        """The window scale at training step ``step`` (geometric from ``start_scale`` to ``crop / size``)."""
        h = self.hparams
        final = h.crop / h.size
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        span = h.anneal * total
        frac = 1.0 if span <= 0 else min(1.0, step / span)
        start = max(h.start_scale, final)
        return start * (final / start) ** frac

    def random_crops(self, x: Tensor, scale: float | None = None) -> Tensor:
        """Crops of ``x`` ``(N, 1, H, W)`` at uniformly random places (``scale`` default: digit-sized)."""
        s = self.model.window_scale if scale is None else float(scale)
        n = x.shape[0]
        t = (torch.rand(n, 2, device=x.device, dtype=x.dtype) * 2 - 1) * (1 - s)
        return self.model.sample_window(x, torch.cat([torch.full_like(t[:, :1], s), t], 1))

    def triplet_loss(self, x: Tensor, scale: float | None = None) -> Tensor:
        """The paper's loss, averaged over the ``N (N - 1)`` ordered pairs of the batch ``x``."""
        e = self.model(x, scale)
        with torch.no_grad():
            neg = self.model.embed(self.random_crops(x, scale))
        sq = e.pow(2).sum(1)
        pos = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp_min(0)
        far = (e - neg).pow(2).sum(1)
        hinge = F.relu(pos - far[:, None] + self.hparams.margin)
        off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
        return hinge[off].mean()

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x = batch[0].float() / 255.0
        scale = self.scale_at(self.global_step)
        loss = self.triplet_loss(x, scale)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x))
        self.log("train/scale", scale, batch_size=len(x))
        return loss

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        x, boxes = batch[0].float() / 255.0, batch[2].float()
        hit = box_iou(self.model.window(x), boxes) > 0.5
        self.log("val/accuracy", 100.0 * hit.float().mean(), prog_bar=True, batch_size=len(x), sync_dist=True)
        self.log("val/error", 100.0 * (~hit).float().mean(), batch_size=len(x), sync_dist=True)

    def test_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        """Only the localization network trains (the encoder is fixed); cosine decay as the other tasks."""
        return _optimizer(self, [{"params": list(self.model.localization.parameters()), "lr": self.hparams.lr}])


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
