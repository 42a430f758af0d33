"""Data modules for the paper's MNIST experiments (generated on setup, deterministic from a seed)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..learn.data import resolve_data_path
from .data import EXPERIMENTS, load_mnist, make_variant

__all__ = ["CUBData", "MNISTVariants", "SVHNData"]


class MNISTVariants(L.LightningDataModule):
    """Training and test sets of one experiment (the test set is MNIST's, distorted with ``seed + 1``).

    Batches are ``(images uint8 (N, C, H, W), labels)`` plus ``boxes`` ``(N, 4)`` for co-localization.

    Args:
        experiment: one of :data:`stnreg.paper.data.EXPERIMENTS`.
        data: MNIST ``.npz`` or a folder of the original IDX files (looked up under ``$STNREG_DATA``).
        train_size, test_size: use the first ``n`` digits (``None``: all).
        digit: keep only this class (co-localization trains one class at a time).
        seed: generation seed.
        pairings: ``addition`` only: the training set holds this many pairings of the training
            digits (new partners and distortions each, seeds ``seed + 1000 k``). On one fixed set
            of 60k pairs the classifiers memorize the pairs and stay at chance on the test set.
    """

    def __init__(
        self,
        experiment: str = "RTS",
        data: str = "mnist/mnist.npz",
        train_size: int | None = None,
        test_size: int | None = None,
        digit: int | None = None,
        seed: int = 0,
        batch_size: int = 256,
        num_workers: int = 0,
        pairings: int = 1,
    ) -> None:
        super().__init__()
        if experiment not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {experiment!r}; choose from {', '.join(EXPERIMENTS)}")
        if pairings < 1 or (pairings > 1 and experiment != "addition"):
            raise ValueError(f"pairings must be 1, or more for the addition experiment (got {pairings})")
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def _make(self, x, y, size: int | None, seed: int, pairings: int = 1) -> TensorDataset:
        h = self.hparams
        if h.digit is not None:
            keep = y == h.digit
            x, y = x[keep], y[keep]
        if size is not None:
            x, y = x[:size], y[:size]
        vs = [make_variant(h.experiment, x, y, seed + 1000 * k) for k in range(pairings)]
        parts = [torch.cat([v.images for v in vs]), torch.cat([v.labels for v in vs])]
        if vs[0].boxes is not None:
            parts.append(torch.cat([v.boxes for v in vs]))
        return TensorDataset(*parts)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        h = self.hparams
        mnist = load_mnist(resolve_data_path(h.data))
        self.train_set = self._make(mnist["x_train"], mnist["y_train"], h.train_size, h.seed, h.pairings)
        self.test_set = self._make(mnist["x_test"], mnist["y_test"], h.test_size, h.seed + 1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            self.train_set,
            self.hparams.batch_size,
            shuffle=True,
            drop_last=True,
            generator=g,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, 1024, num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class SVHNData(L.LightningDataModule):
    """SVHN format 1 folders (``train/``, ``test/`` with ``digitStruct.mat``), cropped and resized to ``size``.

    Args:
        train, test: the folders (looked up under ``$STNREG_DATA``).
        size: 64 or 128 (the paper's two settings).
        limit: use at most this many numbers per split.
    """

    def __init__(
        self,
        train: str = "svhn/train",
        test: str = "svhn/test",
        size: int = 64,
        limit: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        from .svhn import load_svhn

        if self.train_set is None:
            h = self.hparams
            self.train_set = TensorDataset(*load_svhn(resolve_data_path(h.train), h.size, h.limit))
            self.test_set = TensorDataset(*load_svhn(resolve_data_path(h.test), h.size, h.limit))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, self.hparams.batch_size, shuffle=True, drop_last=True, num_workers=self.hparams.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, 256, num_workers=self.hparams.num_workers)


class CUBData(L.LightningDataModule):
    """CUB-200-2011 (official layout under ``root``), images resized to ``size`` (224 or 448)."""

    def __init__(self, root: str = "CUB_200_2011", size: int = 224, batch_size: int = 32, num_workers: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        from .cub import CUBDataset

        root = resolve_data_path(self.hparams.root)
        self.train_set = CUBDataset(root, True, self.hparams.size)
        self.test_set = CUBDataset(root, False, self.hparams.size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, self.hparams.batch_size, shuffle=True, drop_last=True, num_workers=self.hparams.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, self.hparams.batch_size, num_workers=self.hparams.num_workers)
