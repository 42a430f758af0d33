"""Pair datasets for learned registration: ``.npy`` stacks and folders of images, in memory.

Every image is loaded once, reduced to its channel mean, scaled to ``[0, 1]`` by its own 0.5th and
99.5th intensity percentiles (:func:`normalize_intensity`, also used at inference) and, when
``shape`` is given, resampled to it over the same field of view (normalized coordinates). Label
maps become binary channels ``(K, *spatial)``: the channels of a multi-channel label file (or the
chosen ``label_channels``), or one channel per non-zero value of integer label maps.

Pairing (``mode``):
- ``"inter"``: every ordered pair ``(i, j)``, ``i != j`` of one collection (inter-subject); the
  validation pairs are ``(i, i+1)`` cyclically;
- ``"paired"``: ``moving_images/k`` with ``fixed_images/k`` (DeepReg's paired layout);
- ``"atlas"``: every image to one fixed atlas (an index into the collection or an image path).

Data locations: a path is used as given if it exists, otherwise it is looked up under
``$STNREG_DATA`` (so configs can name ``oasis2d/...`` portably).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..coords import lattice
from ..errors import DataNotFoundError, InputError
from ..io import read_image
from ..sampler import sample

__all__ = [
    "PairDataModule",
    "PairDataset",
    "load_collection",
    "load_paired",
    "normalize_intensity",
    "resolve_data_path",
]

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


def resolve_data_path(path: str | os.PathLike) -> Path:
    """``path`` if it exists, else ``$STNREG_DATA/path``; a clear error naming both otherwise."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    root = os.environ.get("STNREG_DATA")
    if root and (Path(root) / p).exists():
        return Path(root) / p
    where = f" or under STNREG_DATA={root}" if root else " (set STNREG_DATA to look under a data folder)"
    raise DataNotFoundError(f"{path}: not found as given{where}")


def normalize_intensity(x: Tensor) -> Tensor:
    """Scale ``(N, C, *spatial)`` images to ``[0, 1]`` per item by robust percentiles (0.5, 99.5)."""
    flat = x.float().flatten(1)
    if flat.shape[1] > 1_000_000:
        flat = flat[:, torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(0))[:1_000_000]]
    q = torch.quantile(flat, torch.tensor([0.005, 0.995], device=flat.device), dim=1)
    lo, hi = q[0], q[1]
    flat_range = hi - lo <= 1e-12
    hi = torch.where(flat_range, flat.amax(1), hi)
    lo = torch.where(flat_range, flat.amin(1), lo)
    scale = (hi - lo).clamp_min(1e-12).reshape(-1, *([1] * (x.dim() - 1)))
    return ((x.float() - lo.reshape(scale.shape)) / scale).clamp(0, 1)


def _resize(x: Tensor, shape: Sequence[int], mode: str) -> Tensor:
    """``(N, C, *spatial)`` resampled to ``shape`` over the same field of view."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    coords = lattice(shape, dtype=torch.float32).unsqueeze(0).expand(x.shape[0], *shape, len(shape))
    return sample(x, coords, mode, "border", antialias=mode == "linear")


def _files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise InputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _label_channels(maps: list[Tensor], channels: Sequence[int] | None) -> list[Tensor]:
    """Binary ``(K, *spatial)`` channels from label maps ``(C, *spatial)`` (see module docs)."""
    counts = {m.shape[0] for m in maps}
    if max(counts) > 1:
        # Files with differing channel counts (DeepReg's prostate labels): keep those all share.
        keep = list(range(min(counts))) if channels is None else list(channels)
        if max(keep) >= min(counts):
            raise InputError(f"label channel {max(keep)} requested, but some label files have only {min(counts)}")
        return [(m[keep] > 0).to(torch.uint8) for m in maps]
    values = sorted({int(v) for m in maps for v in torch.unique(m).tolist() if v != 0})
    if channels is not None:
        values = [values[i] for i in channels]
    if not values:
        raise InputError("the label maps are empty (no non-zero label)")
    return [torch.stack([m[0] == v for v in values]).to(torch.uint8) for m in maps]


def load_collection(
    source: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    index: Sequence[int] | None = None,
    shape: Sequence[int] | None = None,
    label_channels: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Images ``(N, 1, *shape)`` in ``[0, 1]`` and binary labels ``(N, K, *shape)`` (or ``None``).

    Args:
        source: an ``.npy`` stack ``(N, H, W)``, ``(N, D, H, W)`` or ``(N, C, D, H, W)``, or a folder of images
            (a folder holding ``images/`` and ``labels/`` uses those).
        labels: an ``.npy`` stack or a folder with one label file per image (same sorted order);
            defaults to ``source/labels`` when that exists.
        index: ``[start, stop]`` slice of the collection.
        shape: resample everything to this array-order shape (required when sizes differ).
        label_channels: which label channels (or which sorted non-zero values) to keep.
    """
    src = resolve_data_path(source)
    lab = None if labels is None else resolve_data_path(labels)
    if src.is_dir() and (src / "images").is_dir():
        lab = lab or ((src / "labels") if (src / "labels").is_dir() else None)
        src = src / "images"
    sl = slice(None) if index is None else slice(*index)
    if src.suffix == ".npy":
        arr = np.load(src, mmap_mode="r")[sl]
        if arr.ndim not in (3, 4, 5):
            raise InputError(f"{src}: expected a stack (N, *spatial) or (N, C, *spatial), got shape {arr.shape}")
        # (N, H, W): 2D; (N, D, H, W): 3D; (N, C, D, H, W): 3D with channels.
        imgs = [torch.as_tensor(np.array(a, dtype=np.float32)) for a in arr]
        imgs = [x if arr.ndim == 5 else x.unsqueeze(0) for x in imgs]
        label_maps = None
        if lab is not None:
            la = np.load(lab, mmap_mode="r")[sl]
            label_maps = [torch.as_tensor(np.array(a)).reshape(-1, *imgs[0].shape[1:]) for a in la]
    else:
        if not src.is_dir():
            raise InputError(f"{src}: give an .npy stack or a folder of images")
        files = _files(src)[sl]
        imgs = [read_image(f).data.float() for f in files]
        label_maps = None
        if lab is not None:
            lfiles = _files(lab)[sl]
            if len(lfiles) != len(files):
                raise InputError(f"{lab}: {len(lfiles)} label files for {len(files)} images in {src}")
            label_maps = [read_image(f, label=True).data for f in lfiles]
    if not imgs:
        raise InputError(f"{src}: the selection {index} holds no images")
    return _finish(imgs, label_maps, shape, label_channels, str(src))


def _finish(
    imgs: list[Tensor],
    label_maps: list[Tensor] | None,
    shape: Sequence[int] | None,
    label_channels: Sequence[int] | None,
    what: str,
) -> tuple[Tensor, Tensor | None]:
    """Stack ``(C, *spatial)`` images (channel mean, resized, normalized) and binary label channels."""
    sizes = {tuple(x.shape[1:]) for x in imgs}
    if shape is None and len(sizes) > 1:
        raise InputError(f"{what}: images of different sizes {sorted(sizes)[:4]}: set shape to resample them")
    target = tuple(shape) if shape is not None else sizes.pop()
    images = torch.cat([normalize_intensity(_resize(x.mean(0, keepdim=True)[None], target, "linear")) for x in imgs])
    if label_maps is None:
        return images, None
    if any(tuple(m.shape[1:]) != tuple(x.shape[1:]) for m, x in zip(label_maps, imgs, strict=True)):
        raise InputError(f"{what}: label maps and images differ in size")
    chans = _label_channels(label_maps, label_channels)
    return images, torch.cat([_resize(c[None].float(), target, "nearest").to(torch.uint8) for c in chans])


def load_paired(
    root: str | os.PathLike,
    index: Sequence[int] | None = None,
    shape: Sequence[int] | None = None,
    label_channels: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """DeepReg's paired layout: ``moving_images/k`` resampled onto ``fixed_images/k``'s grid in world
    coordinates (the identity map, as at inference), then both handled as in :func:`load_collection`.

    Returns:
        moving, fixed ``(N, 1, *shape)`` and their labels ``(N, K, *shape)`` (or ``None``).
    """
    from ..transforms.matrix import Affine
    from ..warp import apply

    base = resolve_data_path(root)
    sl = slice(None) if index is None else slice(*index)
    mfiles, ffiles = _files(base / "moving_images")[sl], _files(base / "fixed_images")[sl]
    if len(mfiles) != len(ffiles):
        raise InputError(f"{base}: {len(mfiles)} moving but {len(ffiles)} fixed images")
    has_labels = (base / "moving_labels").is_dir() and (base / "fixed_labels").is_dir()
    mlf = _files(base / "moving_labels")[sl] if has_labels else [None] * len(mfiles)
    flf = _files(base / "fixed_labels")[sl] if has_labels else [None] * len(mfiles)
    movs, fixs, mlabs, flabs = [], [], [], []
    for mf, ff, ml, fl in zip(mfiles, ffiles, mlf, flf, strict=True):
        mov, fix = read_image(mf), read_image(ff)
        ident = Affine(fix.ndim)
        with torch.no_grad():
            movs.append(apply(ident, mov, fix).data)
            fixs.append(fix.data.float())
            if has_labels:
                mlabs.append(apply(ident, read_image(ml, label=True), fix, "nearest").data)
                flabs.append(read_image(fl, label=True).data)
    if not movs:
        raise InputError(f"{base}: the selection {index} holds no pairs")
    mov_t, mlab_t = _finish(movs, mlabs or None, shape, label_channels, str(base / "moving_images"))
    fix_t, flab_t = _finish(fixs, flabs or None, shape, label_channels, str(base / "fixed_images"))
    return mov_t, fix_t, mlab_t, flab_t


class PairDataset(Dataset):
    """``(moving, fixed)`` pairs by index into in-memory collections.

    Items are dicts with ``moving``, ``fixed`` ``(1, *spatial)`` float in ``[0, 1]`` and, when
    labels exist, ``moving_labels``, ``fixed_labels`` ``(K, *spatial)`` uint8.
    """

    def __init__(
        self,
        moving: Tensor,
        fixed: Tensor,
        pairs: Sequence[tuple[int, int]],
        moving_labels: Tensor | None = None,
        fixed_labels: Tensor | None = None,
    ) -> None:
        if moving.shape[2:] != fixed.shape[2:]:
            raise InputError(f"moving {tuple(moving.shape[2:])} and fixed {tuple(fixed.shape[2:])} sizes differ")
        self.moving, self.fixed, self.pairs = moving, fixed, list(pairs)
        self.moving_labels, self.fixed_labels = moving_labels, fixed_labels

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict[str, Tensor]:
        i, j = self.pairs[k]
        item = {"moving": self.moving[i], "fixed": self.fixed[j]}
        if self.moving_labels is not None and self.fixed_labels is not None:
            item["moving_labels"], item["fixed_labels"] = self.moving_labels[i], self.fixed_labels[j]
        return item


def _pairs(n: int, mode: str, train: bool) -> list[tuple[int, int]]:
    if mode == "paired":
        return [(i, i) for i in range(n)]
    if mode == "atlas":
        return [(i, 0) for i in range(n)]
    if n < 2:
        raise InputError("inter-subject pairs need at least two images")
    if train:
        return [(i, j) for i in range(n) for j in range(n) if i != j]
    return [(i, (i + 1) % n) for i in range(n)]


class PairDataModule(L.LightningDataModule):
    """Train/validation pairs for :class:`stnreg.learn.RegistrationTask`.

    Args:
        train: training collection (see :func:`load_collection`); for ``mode="paired"`` a folder
            with ``moving_images`` and ``fixed_images`` (and optional ``*_labels``).
        val: validation collection; defaults to ``train`` with ``val_index``.
        train_labels, val_labels: label collections (optional; defaults as in :func:`load_collection`).
        train_index, val_index: ``[start, stop]`` slices (e.g. 80 training and 20 test subjects).
        mode: ``"inter"``, ``"paired"`` or ``"atlas"``.
        atlas: for ``"atlas"``: an image path, or an index into the training collection.
        shape: resample every image to this array-order shape.
        label_channels: which label channels to keep.
        batch_size, num_workers: loader settings.
    """

    def __init__(
        self,
        train: str,
        val: str | None = None,
        train_labels: str | None = None,
        val_labels: str | None = None,
        train_index: list[int] | None = None,
        val_index: list[int] | None = None,
        mode: str = "inter",
        atlas: str | int | None = None,
        shape: list[int] | None = None,
        label_channels: list[int] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if mode not in ("inter", "paired", "atlas"):
            raise InputError(f"mode must be 'inter', 'paired' or 'atlas', got {mode!r}")
        if mode == "atlas" and atlas is None:
            raise InputError("mode 'atlas' needs atlas (an image path or an index)")
        self.save_hyperparameters()
        self.train_set: PairDataset | None = None
        self.val_set: PairDataset | None = None

    def _dataset(self, source: str, labels: str | None, index: list[int] | None, train: bool) -> PairDataset:
        h = self.hparams
        if h.mode == "paired":
            mov, fix, mlab, flab = load_paired(source, index, h.shape, h.label_channels)
            return PairDataset(mov, fix, _pairs(mov.shape[0], "paired", train), mlab, flab)
        imgs, labs = load_collection(source, labels, index, h.shape, h.label_channels)
        if h.mode == "atlas":
            if isinstance(h.atlas, int):
                fix, flab = imgs[h.atlas : h.atlas + 1], None if labs is None else labs[h.atlas : h.atlas + 1]
            else:
                fix, flab = load_collection(h.atlas, None, None, tuple(imgs.shape[2:]), h.label_channels)
            return PairDataset(imgs, fix, _pairs(imgs.shape[0], "atlas", train), labs, flab)
        return PairDataset(imgs, imgs, _pairs(imgs.shape[0], "inter", train), labs, labs)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._dataset(h.train, h.train_labels, h.train_index, True)
        if self.val_set is None and stage in (None, "fit", "validate", "test"):
            source = h.val or h.train
            labels = h.val_labels if h.val else h.train_labels
            if h.val or h.val_index:
                self.val_set = self._dataset(source, labels, h.val_index, False)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            num_workers=self.hparams.num_workers,
            drop_last=len(self.train_set) > self.hparams.batch_size,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()
