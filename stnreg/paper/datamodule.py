"""Data modules for the paper's MNIST experiments (generated on setup, deterministic from a seed)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from ..learn.data import resolve_data_path
from .data import P_CORNER_STD, check_variant_options, load_mnist, make_variant

__all__ = ["CUBData", "MNISTVariants", "SVHNData"]


class _FreshBatches(IterableDataset):
    """Shuffled batches of a training set drawn anew for every epoch.

    ``draw(epoch)`` returns the epoch's ``TensorDataset``; ``epoch()`` reads the current epoch.
    Yields tuples of ``batch_size`` rows (the last partial batch is dropped).
    """

    def __init__(
        self, draw: Callable[[int], TensorDataset], size: int, batch_size: int, seed: int, epoch: Callable[[], int]
    ) -> None:
        self.draw, self.size, self.batch_size, self.seed, self.epoch = draw, size, batch_size, seed, epoch

    def __len__(self) -> int:
        return self.size // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        e = self.epoch()
        tensors = self.draw(e).tensors
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + e))
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield tuple(t[idx] for t in tensors)


class MNISTVariants(L.LightningDataModule):
    """Training and test sets of one experiment (the test set is MNIST's, distorted with ``seed + 1``).

    Batches are ``(images uint8 (N, C, H, W), labels)`` plus ``boxes`` ``(N, 4)`` for co-localization.

    Args:
        experiment: one of :data:`stnreg.paper.data.EXPERIMENTS`.
        data: MNIST ``.npz`` or a folder of the original IDX files (looked up under ``$STNREG_DATA``).
        train_size, test_size: use the first ``n`` digits (``None``: all).
        digit: keep only this class (co-localization trains one class at a time).
        seed: generation seed.
        fresh: draw new distortions (and for ``addition`` new partners and clutter) for every
            training epoch, from seed ``seed + 1000 * epoch``, as an on-the-fly generator does;
            epoch 0 is :attr:`train_set`. With one fixed set the classifiers memorize it (a CNN
            reaches 0% training error on R within 20 epochs while its test error stays near 3%;
            on addition the test error stays at chance). The generation is vectorized and runs in
            the main process (2-4 s per 60k digits), so ``num_workers`` applies to the test set only.
            The batches are not split across processes: under DDP use ``fresh=False``.
        p_corner_std: the ``P`` experiment's corner displacement, N(0, this) pixels; the issue's
            (and default) 5 px is harsher than the paper's data (``benchmarks/results/paper.md``).
            Other experiments reject a value other than the default.
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
        fresh: bool = True,
        p_corner_std: float = P_CORNER_STD,
    ) -> None:
        super().__init__()
        check_variant_options(experiment, p_corner_std)
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        self._train_digits: tuple[np.ndarray, np.ndarray] | None = None

    def _select(self, x: np.ndarray, y: np.ndarray, size: int | None) -> tuple[np.ndarray, np.ndarray]:
        if self.hparams.digit is not None:
            keep = y == self.hparams.digit
            x, y = x[keep], y[keep]
        return (x[:size], y[:size]) if size is not None else (x, y)

    def _make(self, digits: tuple[np.ndarray, np.ndarray], seed: int) -> TensorDataset:
        v = make_variant(self.hparams.experiment, *digits, seed, p_corner_std=self.hparams.p_corner_std)
        return TensorDataset(*([v.images, v.labels] + ([v.boxes] if v.boxes is not None else [])))

    def draw_train(self, epoch: int) -> TensorDataset:
        """The training set of ``epoch`` (:attr:`train_set` for epoch 0 or without ``fresh``)."""
        if epoch == 0 or not self.hparams.fresh:
            return self.train_set
        return self._make(self._train_digits, self.hparams.seed + 1000 * epoch)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        h = self.hparams
        mnist = load_mnist(resolve_data_path(h.data))
        self._train_digits = self._select(mnist["x_train"], mnist["y_train"], h.train_size)
        self.train_set = self._make(self._train_digits, h.seed)
        self.test_set = self._make(self._select(mnist["x_test"], mnist["y_test"], h.test_size), h.seed + 1)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        if h.fresh:
            batches = _FreshBatches(self.draw_train, len(self.train_set), h.batch_size, h.seed, self._epoch)
            return DataLoader(batches, batch_size=None)
        g = torch.Generator().manual_seed(h.seed)
        return DataLoader(
            self.train_set, h.batch_size, shuffle=True, drop_last=True, generator=g, num_workers=h.num_workers
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
