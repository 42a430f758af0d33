"""Many pairs: register every row of a CSV, spread over processes or GPUs by Lightning's prediction loop.

The CSV has a header with columns ``moving,fixed`` and optionally ``moving_labels,fixed_labels``
(relative paths are taken relative to the CSV's folder). Pairs whose fixed images share one grid
and moving images another are batched (``batch_size`` at a time) into one optimization on one
device (:func:`stnreg.register.register_many`). Each pair's outputs go to
``OUT/<row>_<moving name>/`` exactly as ``stnreg register`` writes them, and ``OUT/summary.csv``
collects one line of metrics per pair. With ``devices > 1`` Lightning starts that many processes
(DDP; ``gloo`` on CPU) and its distributed sampler gives each a share of the rows.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .io import read_image
from .register import register_many

__all__ = ["PairRegistration", "group_pairs", "read_pairs", "register_pairs"]


def read_pairs(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a pairs CSV with absolute paths; raises a clear error for missing columns or files."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such pairs file")
    with open(p, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{p}: no pairs listed")
    missing = {"moving", "fixed"} - set(rows[0])
    if missing:
        raise ValueError(f"{p}: missing column(s) {', '.join(sorted(missing))} (need moving,fixed)")
    out = []
    for i, row in enumerate(rows):
        item = {}
        for key in ("moving", "fixed", "moving_labels", "fixed_labels"):
            value = (row.get(key) or "").strip()
            if not value:
                continue
            full = Path(value) if Path(value).is_absolute() else p.parent / value
            if not full.exists():
                raise ValueError(f"{p}: row {i + 1}: {key} file {full} does not exist")
            item[key] = str(full)
        out.append(item)
    return out


def _geometry(path: str) -> tuple:
    """Grid identity of an image file from its header alone (no pixels read)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise ValueError(f"{path}: cannot read as an image") from None
    rnd = lambda v: tuple(round(float(x), 4) for x in v)  # noqa: E731
    return (reader.GetSize(), rnd(reader.GetSpacing()), rnd(reader.GetOrigin()), rnd(reader.GetDirection()))


def group_pairs(rows: list[dict[str, str]], batch_size: int) -> list[list[int]]:
    """Row indices grouped by (moving grid, fixed grid), in chunks of at most ``batch_size``."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((_geometry(row["moving"]), _geometry(row["fixed"])), []).append(i)
    return [idx[k : k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]


class _Groups(Dataset):
    def __init__(self, groups: list[list[int]]) -> None:
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> list[int]:
        return self.groups[i]


class PairRegistration(L.LightningModule):
    """Runs :func:`stnreg.register` in ``predict_step``; gradients are enabled there on purpose
    (instance optimization), and the module holds no weights that registration could change."""

    def __init__(self, rows: list[dict[str, str]], out_dir: str, **register_kwargs: Any) -> None:
        super().__init__()
        self.rows, self.out_dir, self.kwargs = rows, out_dir, register_kwargs

    def predict_step(self, batch: list[int], batch_idx: int) -> list[int]:
        rows = [self.rows[i] for i in batch]
        labels = [
            tuple(read_image(r[k], label=True) for k in ("moving_labels", "fixed_labels"))
            if "moving_labels" in r and "fixed_labels" in r
            else None
            for r in rows
        ]
        with torch.enable_grad():
            results = register_many(
                [r["moving"] for r in rows],
                [r["fixed"] for r in rows],
                labels=labels if any(labels) else None,
                device=self.device,
                progress=False,
                **self.kwargs,
            )
        for i, row, res in zip(batch, rows, results, strict=True):
            res.save(_out_folder(self.out_dir, i, row), protect=list(row.values()))
        return list(batch)


def _first(batch: list[list[int]]) -> list[int]:
    return batch[0]


def _out_folder(out_dir: str | os.PathLike, i: int, row: dict[str, str]) -> Path:
    return Path(out_dir) / f"{i:04d}_{Path(row['moving']).name.split('.')[0]}"


def register_pairs(
    pairs_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    devices: int = 1,
    accelerator: str = "cpu",
    batch_size: int = 4,
    **register_kwargs: Any,
) -> list[dict[str, Any]]:
    """Register every pair listed in ``pairs_csv`` into ``out_dir``; returns one metrics dict per pair.

    ``devices`` processes (CPU) or GPUs share the batches through Lightning's DDP prediction loop.
    """
    rows = read_pairs(pairs_csv)
    groups = group_pairs(rows, batch_size)
    # Every process needs at least one batch: split the largest batches until there are enough.
    while len(groups) < min(devices, len(rows)):
        big = max(groups, key=len)
        groups.remove(big)
        groups += [big[: len(big) // 2], big[len(big) // 2 :]]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model = PairRegistration(rows, str(out_dir), **register_kwargs)
    strategy = "auto" if devices == 1 else ("ddp_spawn" if accelerator == "cpu" else "ddp")
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=True,
        enable_model_summary=False,
    )
    loader = DataLoader(_Groups(groups), batch_size=1, shuffle=False, collate_fn=_first)
    # Spawned processes cannot return predictions: every pair's report.json is gathered from disk.
    trainer.predict(model, loader, return_predictions=False)
    summary = _collect(out_dir, rows)
    if trainer.is_global_zero:
        _write_summary(Path(out_dir) / "summary.csv", summary)
    return summary


def _collect(out_dir: str | os.PathLike, rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    import json

    summary = []
    for i, row in enumerate(rows):
        report = _out_folder(out_dir, i, row) / "report.json"
        if not report.exists():
            continue
        rep = json.loads(report.read_text())
        flat = {k: v for k, v in rep["metrics"].items() if isinstance(v, float)}
        if "jacobian" in rep["metrics"]:
            flat["folding_percent"] = rep["metrics"]["jacobian"]["folding_percent"]
        summary.append(
            {
                "row": i,
                "moving": row["moving"],
                "fixed": row["fixed"],
                "output": str(report.parent),
                "seconds": rep["timings"]["total_s"],
                **flat,
            }
        )
    return summary


def _write_summary(path: Path, summary: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in summary:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(summary)
