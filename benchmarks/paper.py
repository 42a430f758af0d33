"""Spatial Transformer Networks (Jaderberg et al., 2015): our error next to the paper's.

Trains each requested (experiment, model) row from its config in ``configs/paper/`` (the same
configs ``stnreg fit`` runs), with the budget given here, and evaluates on the experiment's test set
(MNIST's test digits, distorted with another seed). Results accumulate in
``benchmarks/results/paper.json`` (rerunning a row replaces it) and the whole table is rewritten to
``benchmarks/results/paper.md`` each time, with every row's budget (epochs, training digits, wall
time, threads), and a figure of inputs and transformer outputs per ST model in
``benchmarks/results/paper/``.

    python benchmarks/paper.py --experiment RTS --model cnn,st-cnn-aff --epochs 10 [--train-size 60000]
    python benchmarks/paper.py --experiment coloc-T --digits 0,1,2 --epochs 2
    python benchmarks/paper.py --experiment addition --model fcn,2xst-fcn-aff --epochs 20
    python benchmarks/paper.py --data /path/to/mnist-idx-folder ...   # any MNIST-format dataset

Rows: ``fcn``, ``cnn``, ``st-fcn-{aff,proj,tps}``, ``st-cnn-{aff,proj,tps}``, and for addition
``2xst-fcn-{aff,proj,tps}``; co-localization has one row per variant, averaged over ``--digits``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml

from stnreg.paper import ClassificationTask, CoLocalizationTask, MNISTVariants
from stnreg.paper.figures import colocalization_figure, transformer_figure

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {
    "R": "distorted_r",
    "RTS": "distorted_rts",
    "P": "distorted_p",
    "E": "distorted_e",
    "TC": "cluttered_tc",
    "addition": "addition",
    "coloc-T": "colocalization_t",
    "coloc-TC": "colocalization_tc",
}
# Test error (%) as printed in the paper (Table 1, the TC and addition tables); co-localization:
# the share of correctly localized digits (%), T 100 for all digits, TC 75-93 across digits.
TABLE1 = {
    "fcn": (2.1, 5.2, 3.1, 3.2),
    "cnn": (1.2, 0.8, 1.5, 1.4),
    "st-fcn-aff": (1.2, 0.8, 1.5, 2.7),
    "st-fcn-proj": (1.3, 0.9, 1.4, 2.6),
    "st-fcn-tps": (1.1, 0.8, 1.4, 2.4),
    "st-cnn-aff": (0.7, 0.5, 0.8, 1.2),
    "st-cnn-proj": (0.8, 0.6, 0.8, 1.3),
    "st-cnn-tps": (0.7, 0.5, 0.8, 1.1),
}
PAPER: dict[tuple[str, str], float | str] = {
    (exp, row): vals[i] for row, vals in TABLE1.items() for i, exp in enumerate(("R", "RTS", "P", "E"))
}
PAPER.update({("TC", "fcn"): 13.2, ("TC", "cnn"): 3.5, ("TC", "st-fcn-aff"): 2.0, ("TC", "st-cnn-aff"): 1.7})
PAPER.update(
    {
        ("addition", "fcn"): 47.7,
        ("addition", "cnn"): 14.7,
        ("addition", "st-fcn-aff"): 18.5,
        ("addition", "2xst-fcn-aff"): 9.0,
        ("addition", "2xst-fcn-proj"): 5.9,
        ("addition", "2xst-fcn-tps"): 5.8,
    }
)
PAPER.update({("coloc-T", "st-attention"): "100 (all digits)", ("coloc-TC", "st-attention"): "75-93"})
TRANSFORMS = {"aff": "affine", "proj": "projective", "tps": "tps"}


def default_rows(experiment: str) -> list[str]:
    return [row for (exp, row) in PAPER if exp == experiment]


def model_args(row: str) -> dict:
    """``st-cnn-tps`` -> architecture, transform, transformers."""
    if row in ("fcn", "cnn"):
        return {"architecture": row, "transformers": 1}
    k = 2 if row.startswith("2x") else 1
    arch, _, t = row.removeprefix("2x").rpartition("-")
    if arch not in ("st-fcn", "st-cnn") or t not in TRANSFORMS:
        raise SystemExit(f"unknown model row {row!r}")
    return {"architecture": arch, "transform": TRANSFORMS[t], "transformers": k}


def make_trainer(epochs: int, log_dir: Path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=L.pytorch.loggers.CSVLogger(log_dir, name="csv"),
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=max(1, epochs),
        enable_model_summary=False,
    )


def run_classification(exp: str, row: str, args: argparse.Namespace) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "paper" / f"{CONFIGS[exp]}.yaml").read_text())
    L.seed_everything(args.seed)
    task = ClassificationTask(**(cfg["model"]["init_args"] | model_args(row)))
    data_args = cfg["data"]["init_args"] | {"seed": args.seed, "train_size": args.train_size}
    if args.data:
        data_args["data"] = str(args.data)
    dm = MNISTVariants(**data_args)
    dm.setup()
    trainer = make_trainer(args.epochs, ROOT / "runs" / "paper-benchmark" / exp / row)
    t = time.perf_counter()
    trainer.fit(task, dm)
    seconds = time.perf_counter() - t
    error = float(trainer.validate(task, dm, verbose=False)[0]["val/error"])
    if task.model.transformer is not None:
        sample = dm.test_set.tensors[0][:10]
        transformer_figure(
            task.model, sample, RESULTS / "paper" / f"{exp}-{row}.png", f"{exp}, {row}: inputs and transformer outputs"
        )
    return {
        "error": error,
        "seconds": seconds,
        "train_digits": len(dm.train_set),
        "fresh": dm.hparams.fresh,
        "batch": dm.hparams.batch_size,
    }


def run_colocalization(exp: str, args: argparse.Namespace) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "paper" / f"{CONFIGS[exp]}.yaml").read_text())
    per_digit, pre_error, seconds, digits = {}, {}, 0.0, 0
    for d in args.digits:
        L.seed_everything(args.seed)
        task = CoLocalizationTask(**cfg["model"]["init_args"])
        data_args = cfg["data"]["init_args"] | {"seed": args.seed, "train_size": args.train_size, "digit": d}
        if args.data:
            data_args["data"] = str(args.data)
        dm = MNISTVariants(**data_args)
        dm.setup()
        trainer = make_trainer(args.epochs, ROOT / "runs" / "paper-benchmark" / exp / f"digit{d}")
        t = time.perf_counter()
        trainer.fit(task, dm)
        seconds += time.perf_counter() - t
        digits += len(dm.train_set)
        fresh, batch = dm.hparams.fresh, dm.hparams.batch_size
        per_digit[d] = float(trainer.validate(task, dm, verbose=False)[0]["val/accuracy"])
        pre_error[d] = float(task.pretrain_error)
        imgs, _, boxes = dm.test_set.tensors
        colocalization_figure(
            task.model,
            imgs[:8],
            boxes[:8],
            RESULTS / "paper" / f"{exp}-digit{d}.png",
            f"{exp}, digit {d}: window (red), digit (green)",
        )
    acc = list(per_digit.values())
    return {
        "accuracy": float(np.mean(acc)),
        "accuracy_min": min(acc),
        "accuracy_max": max(acc),
        "per_digit": per_digit,
        "pretrain_error": pre_error,
        "seconds": seconds,
        "train_digits": digits,
        "fresh": fresh,
        "batch": batch,
    }


def render(store: dict) -> str:
    def fmt(v: float | None) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    lines = [
        "# Spatial Transformer Networks: our test error next to the paper's",
        "",
        "Produced by `benchmarks/paper.py` (CPU). Cells: **ours** / paper, test error in %. Our models are trained "
        "on the budget listed per row below, far below the paper's (about 150k SGD iterations of batch 256); "
        "empty cells were not run in this budget.",
        "",
        "## Table 1: distorted MNIST",
        "",
        "| model | R | RTS | P | E |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in TABLE1:
        cells = []
        for exp in ("R", "RTS", "P", "E"):
            r = store.get(f"{exp}|{row}")
            cells.append(f"**{fmt(r['error'])}** / {PAPER[(exp, row)]}" if r else f"— / {PAPER[(exp, row)]}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    plain = {
        exp: [store[f"{exp}|{row}"]["error"] / PAPER[(exp, row)] for row in ("fcn", "cnn") if f"{exp}|{row}" in store]
        for exp in ("R", "RTS", "P", "E")
    }
    if plain["P"]:
        others = [v for exp in ("R", "RTS", "E") for v in plain[exp]]
        lines += [
            "",
            "P follows the generator the issue specifies (scale 0.75-1.0, then each corner of the 28 px image moved "
            f"by N(0, 5 px)). The plain models err {min(plain['P']):.1f}-{max(plain['P']):.1f}x the paper's "
            "numbers on it"
            + (f", against {min(others):.1f}-{max(others):.1f}x on R, RTS and E" if others else "")
            + ": the paper's P distortion was evidently milder, and the P column is not a like-for-like target.",
        ]
        floor_path = RESULTS / "paper-p-floor.json"
        floor = json.loads(floor_path.read_text())["rows"] if floor_path.exists() else {}
        clean, perfect = floor.get("cnn|clean|"), floor.get("cnn|P rectified|5")
        if clean and perfect:
            lines[-1] += (
                f" With a perfect transformer (each P digit warped back through its own true homography) the "
                f"plain CNN errs {perfect['error']:.2f}%, against {clean['error']:.2f}% on undistorted digits in "
                f"the same budget ({clean['epochs']} epochs): ink pushed off the canvas and foreshortened strokes "
                "are lost to any model. That reference is no strict bound (an ST-CNN can also zoom in), but it puts "
                "the ST-CNN target of the paper's 0.8 + 0.3 out of this generator's reach in practice "
                "(`paper-p-floor.md`, `benchmarks/paper_p_floor.py`)."
            )
        lines += _milder_p(floor, store)
    for exp, title in (("TC", "Translated cluttered MNIST (TC)"), ("addition", "MNIST addition")):
        lines += ["", f"## {title}", "", "| model | ours | paper |", "|---|---:|---:|"]
        for (e, row), paper in PAPER.items():
            if e == exp:
                r = store.get(f"{exp}|{row}")
                lines.append(f"| {row} | {'**' + fmt(r['error']) + '**' if r else '—'} | {paper} |")
    lines += [
        "",
        "`fresh` rows (see the budget table) draw new distortions, clutter and addition partners for every "
        "epoch, as an on-the-fly generator does; the others train on one fixed distorted set (`training "
        "digits` counts the images of one epoch: 300000 for addition rows made from five pairings of the "
        "60k training digits, before the per-epoch generator replaced that option). The addition CNN has one "
        "128-unit hidden layer before its output (`cnn_hidden` in `configs/paper/addition.yaml`); with a linear "
        "output on its conv features, as in Table 1's CNN, it reached 55.26 in the same 20 epochs.",
    ]
    lines += [
        "",
        "## Co-localization (% of test digits with IoU > 0.5)",
        "",
        "| variant | ours: mean (min-max over digits) | digits | paper |",
        "|---|---:|---|---:|",
    ]
    for exp in ("coloc-T", "coloc-TC"):
        r = store.get(f"{exp}|st-attention")
        cell = f"**{r['accuracy']:.1f}** ({r['accuracy_min']:.1f}-{r['accuracy_max']:.1f})" if r else "—"
        digits = ",".join(str(d) for d in r["per_digit"]) if r else ""
        lines.append(f"| {exp} | {cell} | {digits} | {PAPER[(exp, 'st-attention')]} |")
    lines += [
        "",
        "Co-localization setup (`CoLocalizationTask`): the paper's triplet hinge loss over all pairs of a batch; "
        "the encoder `e()` is the two conv blocks of a small CNN pre-trained inside the task on plain 28x28 MNIST "
        "digits of all classes (10k digits, 1 epoch, then frozen; its test error is kept per digit as "
        "`pretrain_error` in `paper.json`); the localization network is fully convolutional with a soft-argmax "
        "window centre; the window scale shrinks from 0.9 to 1/3 of the image over the first 75% of the steps. "
        "The wall time includes the pre-training.",
    ]
    lines += [
        "",
        "## SVHN and CUB-200-2011",
        "",
        "Not run: neither dataset is on this machine (no download). `configs/paper/svhn_64.yaml`, `svhn_128.yaml`, "
        "`cub_2x.yaml` and `cub_4x.yaml` train `SVHNTask` / `CUBTask` from the official formats (SVHN format 1 "
        "`digitStruct.mat` + PNGs, format 2 `*_32x32.mat`; CUB's `images.txt` folder layout); the loaders are tested "
        "on tiny files written in those formats (`tests/test_paper.py`). Paper: SVHN 64 px sequence error CNN 4.0, "
        "ST-CNN Single 3.7, Multi 3.6; 128 px CNN 5.6, ST-CNN Single 3.9; CUB accuracy 2xST-CNN 83.1%, 4xST-CNN "
        "84.1% (with an ImageNet-pretrained Inception backbone, which our from-scratch CNN backbone is not).",
        "",
        "## Budget of each row",
        "",
        "| experiment | model | epochs | training digits | fresh | batch | wall time (s) | threads | seed | torch |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for key, r in sorted(store.items()):
        exp, row = key.split("|")
        fresh = "yes" if r.get("fresh") else "no"
        budget = [r["epochs"], r["train_digits"], fresh, r["batch"], f"{r['seconds']:.0f}"]
        budget += [r["threads"], r["seed"], r["torch"]]
        lines.append(f"| {exp} | {row} | " + " | ".join(str(b) for b in budget) + " |")
    return "\n".join(lines) + "\n"


def _milder_p(floor: dict, store: dict) -> list[str]:
    """Lines on P at milder corner noise, from ``paper-p-floor.json``'s rows (``model|mode|σ``).

    The issue's σ = 5 px column is Table 1's P column (``store``).
    """
    stds = sorted({float(k.split("|")[2]) for k in floor if k.startswith("st-cnn") and k.split("|")[2] != "5"})
    if not stds:
        return []
    lines = [
        "",
        "The same models on P with milder corner noise, N(0, σ px), chosen so that the plain CNN errs as in the "
        "paper (`benchmarks/paper_p_floor.py --corner-std`, `paper-p-floor.md` for the other σ tried; ours, epochs "
        "in brackets):",
        "",
        "| model | " + " | ".join(f"σ = {v:g} px" for v in [*stds, 5.0]) + " | paper |",
        "|---|" + "---:|" * (len(stds) + 2),
    ]
    for row in ("cnn", "st-cnn-aff", "st-cnn-proj", "st-cnn-tps"):
        cells = []
        for v in [*stds, 5.0]:
            r = floor.get(f"{row}|P|{v:g}") if v != 5.0 else store.get(f"P|{row}")
            cells.append(f"**{r['error']:.2f}** ({r['epochs']})" if r else "—")
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {PAPER[('P', row)]} |")
    rectified = [floor.get(f"cnn|P rectified|{v:g}") for v in [*stds, 5.0]]
    cells = [f"{r['error']:.2f} ({r['epochs']})" if r else "—" for r in rectified]
    lines.append("| cnn on perfectly rectified digits | " + " | ".join(cells) + " | |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="RTS", help=f"comma-separated: {', '.join(CONFIGS)}")
    ap.add_argument("--model", default=None, help="comma-separated rows (default: every row the paper reports)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--train-size", type=int, default=None, help="training digits (default: all 60,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=None, help="MNIST .npz or folder of IDX .gz files")
    ap.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9", help="co-localization classes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="paper")
    args = ap.parse_args()
    args.digits = [int(d) for d in args.digits.split(",")]
    if args.data is None:
        os.environ.setdefault("STNREG_DATA", str(ROOT.parent / "shared" / "data"))
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # subnormal floats (e.g. underflowing softmax tails) are ~10x slower on CPU
    store_path = RESULTS / f"{args.out}.json"
    store: dict = {}
    for exp in args.experiment.split(","):
        if exp not in CONFIGS:
            raise SystemExit(f"unknown experiment {exp!r}; choose from {', '.join(CONFIGS)}")
        rows = (
            ["st-attention"]
            if exp.startswith("coloc")
            else (args.model.split(",") if args.model else default_rows(exp))
        )
        for row in rows:
            print(f"== {exp} / {row}: {args.epochs} epochs", flush=True)
            res = run_colocalization(exp, args) if exp.startswith("coloc") else run_classification(exp, row, args)
            res |= {"epochs": args.epochs, "threads": args.threads, "seed": args.seed, "torch": torch.__version__}
            # Re-read before writing: several runs may fill the same table side by side.
            store = json.loads(store_path.read_text()) if store_path.exists() else {}
            store[f"{exp}|{row}"] = res
            RESULTS.mkdir(parents=True, exist_ok=True)
            tmp = store_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(store, indent=1))
            tmp.replace(store_path)
            (RESULTS / f"{args.out}.md").write_text(render(store))
            shown = {k: v for k, v in res.items() if k != "per_digit"}
            print(f"   {shown}  paper: {PAPER.get((exp, row))}", flush=True)
    print(render(json.loads(store_path.read_text()) if store_path.exists() else store))


if __name__ == "__main__":
    main()
