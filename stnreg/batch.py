"""Many pairs: register every row of a CSV, spread over processes or GPUs by Lightning's prediction loop.

The CSV has a header with columns ``moving,fixed`` and optionally ``moving_labels,fixed_labels`` and
``mask`` (relative paths are taken relative to the CSV's folder); rows are numbered from 1, the first
line after the header. Pairs whose fixed images share one grid, moving images another, and the same
mask are batched (``batch_size`` at a time) into one optimization on one device
(:func:`stnreg.register.register_many`; each pair is still solved on its own). Each pair's outputs
go to ``OUT/<row>_<moving name>/`` exactly as ``stnreg register`` writes them, ``report.json`` last.

Failures never spread: every row is checked before work starts (files exist and are 2D/3D images,
labels and mask on their image's grid) and a bad row is reported and skipped; a batch that fails
while reading, optimizing or writing is retried pair by pair, so only the pair at fault is lost.
``OUT/summary.csv`` collects one line of metrics per registered pair and ``OUT/failures.csv`` one line
(row, moving, fixed, reason) per failed row. With ``resume``, pairs whose folder already holds a
``report.json`` are kept as they are, so a killed run loses at most the pairs in flight. With
``devices > 1`` Lightning starts that many processes (DDP; ``gloo`` on CPU) and its distributed
sampler gives each a share of the batches; each process records its failures in files that the
main process gathers.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import InputError
from .io import ImageInfo, image_info, read_image
from .outdir import check_output_folder
from .register import register_many
from .register.options import RegisterOptions, resolve_device

__all__ = ["BatchResult", "Failure", "Pair", "group_pairs", "read_pairs", "register_pairs"]

COLUMNS = ("moving", "fixed", "moving_labels", "fixed_labels", "mask")
_FAILURES = ".failures"  # per-row failure records of a run in progress (any process may write one)


@dataclass(frozen=True)
class Pair:
    """One row of a pairs CSV: its 1-based row number and its files (column -> absolute path)."""

    row: int
    files: dict[str, str]

    @property
    def moving(self) -> str:
        return self.files["moving"]

    @property
    def fixed(self) -> str:
        return self.files["fixed"]

    def folder(self, out_dir: str | os.PathLike) -> Path:
        """The pair's output folder, ``OUT/<row, 4 digits>_<moving file name without extensions>``."""
        return Path(out_dir) / f"{self.row:04d}_{Path(self.moving).name.split('.')[0]}"


@dataclass(frozen=True)
class Failure:
    """A row that was not registered, and why (one line)."""

    row: int
    moving: str
    fixed: str
    reason: str


@dataclass
class BatchResult:
    """What :func:`register_pairs` did: metrics per registered pair (this run's and earlier ones' with
    ``resume``), the failed rows, and the rows skipped because an earlier run had finished them."""

    summary: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def _check_row(files: dict[str, str]) -> tuple[str | None, dict[str, ImageInfo]]:
    """The reason a row cannot be registered (``None`` if it can), and its files' headers."""
    infos: dict[str, ImageInfo] = {}
    for key, path in files.items():
        try:
            infos[key] = image_info(path)
        except InputError as err:
            return f"{key}: {err}", infos
    mov, fix = infos["moving"], infos["fixed"]
    if mov.ndim != fix.ndim:
        return f"moving is {mov.ndim}D but fixed is {fix.ndim}D", infos
    for key, image in (("moving_labels", "moving"), ("fixed_labels", "fixed"), ("mask", "fixed")):
        if key in infos and infos[key].shape != infos[image].shape:
            return f"{key} {infos[key].shape} is not on the {image} image's grid {infos[image].shape}", infos
    if ("moving_labels" in files) != ("fixed_labels" in files):
        return "give both moving_labels and fixed_labels, or neither", infos
    return None, infos


def read_pairs(
    path: str | os.PathLike, mask: str | os.PathLike | None = None
) -> tuple[list[Pair], list[Failure], dict[int, dict[str, ImageInfo]]]:
    """Check every row of a pairs CSV without reading pixels.

    Args:
        path: the CSV (see the module docstring).
        mask: a fixed-space mask for every row that has no ``mask`` column of its own.

    Returns:
        The good rows, the bad rows with their reasons, and the good rows' file headers (by row).

    Raises:
        InputError: the CSV itself is missing, unreadable, without ``moving,fixed`` columns, or empty.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such pairs file")
    try:
        with open(p, newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{p}: cannot read as a CSV ({err})") from None
    missing = {"moving", "fixed"} - set(header)
    if missing:
        raise InputError(f"{p}: missing column(s) {', '.join(sorted(missing))} (need moving,fixed)")
    if not rows:
        raise InputError(f"{p}: no pairs listed")
    pairs, failures, infos = [], [], {}
    for i, row in enumerate(rows, start=1):
        files = {}
        for key in COLUMNS:
            value = (row.get(key) or "").strip()
            if not value and key == "mask" and mask is not None:
                value = str(mask)
            if value:
                files[key] = str(Path(value) if Path(value).is_absolute() else p.parent / value)
        if "moving" not in files or "fixed" not in files:
            failures.append(Failure(i, files.get("moving", ""), files.get("fixed", ""), "moving or fixed left empty"))
            continue
        reason, info = _check_row(files)
        if reason is None:
            pairs.append(Pair(i, files))
            infos[i] = info
        else:
            failures.append(Failure(i, files["moving"], files["fixed"], reason))
    return pairs, failures, infos


def group_pairs(pairs: list[Pair], infos: dict[int, dict[str, ImageInfo]], batch_size: int) -> list[list[int]]:
    """Indices into ``pairs`` grouped by (moving grid, fixed grid, mask), in chunks of at most ``batch_size``."""
    groups: dict[tuple, list[int]] = {}
    for k, pair in enumerate(pairs):
        info = infos[pair.row]
        groups.setdefault((info["moving"], info["fixed"], pair.files.get("mask")), []).append(k)
    return [idx[j : j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]


class _Groups(Dataset):
    def __init__(self, groups: list[list[int]]) -> None:
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> list[int]:
        return self.groups[i]


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if isinstance(err, InputError) else f"{type(err).__name__}: {text}"


class PairRegistration(L.LightningModule):
    """Runs :func:`stnreg.register.register_many` in ``predict_step``; gradients are enabled there on
    purpose (instance optimization), and the module holds no weights that registration could change."""

    def __init__(self, pairs: list[Pair], out_dir: str, options: RegisterOptions) -> None:
        super().__init__()
        self.pairs, self.out_dir, self.options = pairs, out_dir, options

    def _register(self, pairs: list[Pair]) -> None:
        labels = [
            (read_image(p.files["moving_labels"], label=True), read_image(p.files["fixed_labels"], label=True))
            if "moving_labels" in p.files
            else None
            for p in pairs
        ]
        kwargs = self.options.kwargs() | {"device": self.device}
        with torch.enable_grad():
            results = register_many(
                [p.moving for p in pairs],
                [p.fixed for p in pairs],
                labels=labels if any(labels) else None,
                fixed_mask=pairs[0].files.get("mask"),
                progress=False,
                **kwargs,
            )
        for pair, res in zip(pairs, results, strict=True):
            try:
                res.save(pair.folder(self.out_dir), protect=list(pair.files.values()))
            except Exception as err:  # a write that fails loses this pair only
                self._fail(pair, err)

    def _fail(self, pair: Pair, err: BaseException) -> None:
        record = Path(self.out_dir) / _FAILURES / f"{pair.row:06d}.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(Failure(pair.row, pair.moving, pair.fixed, _reason(err)).__dict__))

    def predict_step(self, batch: list[int], batch_idx: int) -> list[int]:
        pairs = [self.pairs[k] for k in batch]
        try:
            self._register(pairs)
        except Exception as err:  # the batch's fault lies with some pair: retry one by one
            if len(pairs) == 1:
                self._fail(pairs[0], err)
            else:
                for k in batch:
                    self.predict_step([k], batch_idx)
        return list(batch)


def _first(batch: list[list[int]]) -> list[int]:
    return batch[0]


def _lightning_devices(device: str | None, devices: int) -> tuple[str, int | list[int]]:
    """Lightning's ``accelerator`` and ``devices`` for a device name (``cuda:1`` keeps its index)."""
    dev = resolve_device(device)
    if dev.type == "cpu":
        return "cpu", devices
    if dev.index is not None:
        if devices != 1:
            raise InputError(f"device {device}: names one GPU, so --devices must be 1 (got {devices})")
        return "gpu", [dev.index]
    return "gpu", devices


def register_pairs(
    pairs_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: RegisterOptions | None = None,
    *,
    devices: int = 1,
    batch_size: int = 4,
    mask: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> BatchResult:
    """Register every good pair listed in ``pairs_csv`` into ``out_dir`` (see the module docstring).

    Args:
        options: registration options for every pair (default :class:`RegisterOptions`); its ``device``
            picks CPU processes or GPUs.
        devices: processes (CPU) or GPUs sharing the batches through Lightning's DDP prediction loop.
        batch_size: pairs on equal grids optimized together.
        mask: a fixed-space mask for rows without a ``mask`` column.
        resume: keep pairs that an earlier run finished (their folder has a ``report.json``).
        overwrite: allow a non-empty ``out_dir`` and register every pair again.

    Raises:
        InputError: a bad CSV, device or output folder (before any work); bad rows are not raised but
            returned in :attr:`BatchResult.failures` and written to ``failures.csv``.
    """
    if batch_size < 1 or devices < 1:
        raise InputError(f"batch size and devices must be >= 1, got {batch_size} and {devices}")
    opts = options or RegisterOptions()
    accelerator, lightning_devices = _lightning_devices(opts.device, devices)
    pairs, failures, infos = read_pairs(pairs_csv, mask)
    out = check_output_folder(out_dir, [pairs_csv, *(f for p in pairs for f in p.files.values())], overwrite, resume)
    done = {p.row for p in pairs if resume and (p.folder(out) / "report.json").exists()}
    todo = [p for p in pairs if p.row not in done]
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / _FAILURES, ignore_errors=True)
    if todo:
        groups = group_pairs(todo, infos, batch_size)
        # Every process needs at least one batch: split the largest batches until there are enough.
        while len(groups) < min(devices, len(todo)):
            big = max(groups, key=len)
            groups.remove(big)
            groups += [big[: len(big) // 2], big[len(big) // 2 :]]
        # Spawned processes on GPUs too: with "ddp" every rank would rerun the command from the start.
        strategy = "auto" if devices == 1 else "ddp_spawn"
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=lightning_devices,
            strategy=strategy,
            inference_mode=False,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
        )
        if not progress:  # Lightning's notices (accelerators, tips) would bury the summary
            logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        loader = DataLoader(_Groups(groups), batch_size=1, shuffle=False, collate_fn=_first)
        # Spawned processes cannot return predictions: results and failures are gathered from disk.
        trainer.predict(PairRegistration(todo, str(out), opts), loader, return_predictions=False)
    records = sorted((out / _FAILURES).glob("*.json")) if (out / _FAILURES).is_dir() else []
    failures += [Failure(**json.loads(r.read_text())) for r in records]
    shutil.rmtree(out / _FAILURES, ignore_errors=True)
    result = BatchResult(_collect(out, pairs), sorted(failures, key=lambda f: f.row), sorted(done))
    _write_csv(out / "summary.csv", result.summary)
    if result.failures:
        _write_csv(out / "failures.csv", [f.__dict__ for f in result.failures])
    else:
        (out / "failures.csv").unlink(missing_ok=True)  # a stale list from an earlier run would mislead
    return result


def _collect(out_dir: Path, pairs: list[Pair]) -> list[dict[str, Any]]:
    summary = []
    for pair in pairs:
        report = pair.folder(out_dir) / "report.json"
        if not report.exists():
            continue
        rep = json.loads(report.read_text())
        flat = {k: v for k, v in rep["metrics"].items() if isinstance(v, float)}
        if "jacobian" in rep["metrics"]:
            flat["folding_percent"] = rep["metrics"]["jacobian"]["folding_percent"]
        summary.append(
            {
                "row": pair.row,
                "moving": pair.moving,
                "fixed": pair.fixed,
                "output": str(report.parent),
                "seconds": rep["timings"]["total_s"],
                **flat,
            }
        )
    return summary


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys or ["row"])
        writer.writeheader()
        writer.writerows(rows)
