"""CUB-200-2011 in its official folder layout, for the paper's fine-grained bird experiment.

``root`` holds ``images.txt`` (``id path``), ``image_class_labels.txt`` (``id class``, 1-200),
``train_test_split.txt`` (``id is_train``) and ``images/<path>``. Samples are read lazily and
resized (whole image, anti-aliased) to ``size`` x ``size``: 224 for the paper's 2x/4x ST-CNN at
224 px, 448 for its 448 px variant; training samples are flipped left-right at random.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .svhn import _crop_resize

__all__ = ["CUBDataset"]


def _table(path: Path) -> dict[int, str]:
    if not path.exists():
        raise ValueError(f"{path.parent}: missing {path.name} (CUB-200-2011 layout)")
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, value = line.split(maxsplit=1)
            rows[int(key)] = value.strip()
    return rows


class CUBDataset(Dataset):
    """``(image uint8 (3, size, size), label 0-199)`` pairs of the train or test split."""

    def __init__(self, root: str | os.PathLike, train: bool = True, size: int = 224, flip: bool | None = None) -> None:
        self.root = Path(root)
        paths = _table(self.root / "images.txt")
        labels = _table(self.root / "image_class_labels.txt")
        split = _table(self.root / "train_test_split.txt")
        ids = sorted(i for i, s in split.items() if (s == "1") == train)
        missing = [i for i in ids if i not in paths or i not in labels]
        if missing:
            raise ValueError(f"{self.root}: image ids {missing[:5]} lack a path or a label")
        self.items = [(paths[i], int(labels[i]) - 1) for i in ids]
        if not self.items:
            raise ValueError(f"{self.root}: no {'training' if train else 'test'} images listed")
        self.size = size
        self.flip = train if flip is None else flip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> tuple[Tensor, int]:
        from skimage.io import imread

        rel, label = self.items[k]
        path = self.root / "images" / rel
        try:
            img = imread(path)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot read ({err})") from None
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, -1)
        h, w = img.shape[:2]
        out = _crop_resize(img[..., :3], (0.0, 0.0, float(w), float(h)), self.size)
        if self.flip and torch.rand(()) < 0.5:
            out = out.flip(-1)
        return out, label
