"""Training a contrast-agnostic network on synthetic pairs (``configs/synth_affine_svf.yaml``): what a
step costs on this CPU, and what a training run learned.

Part 1, measured here (``--threads`` threads): the seconds to synthesize one batch
(:func:`stnreg.learn.synth_pairs`), the seconds of one optimizer step of the config's network
(forward, Dice of the warped labels, backward, Adam) and the process's peak RSS, over ``--steps``
steps after two untimed ones. Part 2, read from a finished run's Lightning CSV log (``--log``, as
``stnreg fit --config configs/synth_affine_svf.yaml`` writes it under ``runs/``): the validation
Dice of the warped labels (one-hot, all labels, 4 fixed synthetic pairs) and the mean training
Dice loss per 500 steps, against the validation Dice before any training (the identity network).

    python benchmarks/synth_training.py --log runs/synth_affine_svf/csv/version_0/metrics.csv

Writes ``benchmarks/results/learned-synth.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from stnreg.learn import RegistrationTask, SynthConfig, SynthDataModule, synth_pairs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    dims = tuple(range(2, a.dim()))
    return float((2 * (a * b).sum(dims) / (a + b).sum(dims).clamp_min(1)).mean())


def step_costs(config: dict, steps: int) -> dict:
    """Seconds per synthetic batch and per optimizer step; peak RSS (MiB) of this process."""
    data_args = config["data"]["init_args"]
    model_args = config["model"]["init_args"]
    cfg = SynthConfig(
        tuple(data_args["shape"]),
        data_args["labels"],
        data_args["cell"],
        data_args.get("warp", 0.1),
        data_args["deform"],
        data_args["affine"],
        data_args.get("same_map", 0.5),
    )
    g = torch.Generator().manual_seed(0)
    task = RegistrationTask(**model_args)
    opt = torch.optim.Adam(task.parameters(), lr=model_args["lr"])
    synth_s, step_s = [], []
    for k in range(steps + 2):
        t0 = time.perf_counter()
        b = synth_pairs(data_args["batch_size"], cfg, g)
        t1 = time.perf_counter()
        out = task(b["moving"], b["fixed"])
        terms = task.objective(out, b["moving"], b["fixed"], b["moving_labels"], b["fixed_labels"])
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        t2 = time.perf_counter()
        if k >= 2:
            synth_s.append(t1 - t0)
            step_s.append(t2 - t1)
    return {
        "synth_s": float(np.mean(synth_s)),
        "step_s": float(np.mean(step_s)),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps_timed": steps,
    }


def identity_val_dice(config: dict) -> float:
    """The validation Dice before training: the fixed synthetic validation pairs, unregistered."""
    dm = SynthDataModule(**config["data"]["init_args"])
    return float(np.mean([_dice(b["moving_labels"], b["fixed_labels"]) for b in dm.val_dataloader()]))


def read_log(path: Path) -> dict:
    """Validation Dice per check and the mean training Dice loss per 500 steps from a CSV log."""
    val, train = [], {}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            step = int(row["step"])
            if row.get("val/dice"):
                val.append((step + 1, float(row["val/dice"]), float(row.get("val/diffusion_1") or "nan")))
            if row.get("train/dice"):
                train.setdefault((step // 500 + 1) * 500, []).append(float(row["train/dice"]))
    return {"val": val, "train": {k: float(np.mean(v)) for k, v in sorted(train.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "synth_affine_svf.yaml")
    ap.add_argument("--log", type=Path, required=True, help="metrics.csv of a finished training run")
    ap.add_argument("--wall", type=float, default=None, help="the run's wall time in minutes, if known")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps timed here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="learned-synth")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = yaml.safe_load(args.config.read_text())
    costs = step_costs(config, args.steps)
    before = identity_val_dice(config)
    log = read_log(args.log)
    shape = config["data"]["init_args"]["shape"]
    lines = [
        "# A network trained on synthetic pairs only (`configs/synth_affine_svf.yaml`)",
        "",
        f"`python benchmarks/synth_training.py --log {args.log}`; CPU, {args.threads} thread(s), "
        f"torch {torch.__version__}. Network: {config['model']['init_args']['stages']} at {shape}, "
        "trained by the Dice of the warped one-hot labels alone (no image similarity).",
        "",
        "## What a step costs here",
        "",
        "| synthesize a batch, s | optimizer step, s | steps per hour | peak RSS, MiB |",
        "|---:|---:|---:|---:|",
        f"| {costs['synth_s']:.3f} | {costs['step_s']:.3f} | "
        f"{3600 / (costs['synth_s'] + costs['step_s']):.0f} | {costs['peak_mib']:.0f} |",
        "",
        "## What the run learned",
        "",
        f"Validation Dice before training (identity): **{before:.4f}**."
        + (f" Run wall time: {args.wall:.0f} min." if args.wall else ""),
        "",
        "| step | validation Dice | SVF diffusion (voxels², validation) |",
        "|---:|---:|---:|",
        *[f"| {s} | {d:.4f} | {f:.2e} |" for s, d, f in log["val"]],
        "",
        "| steps up to | mean training Dice loss |",
        "|---:|---:|",
        *[f"| {s} | {v:.3f} |" for s, v in log["train"].items()],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text(text)
    (RESULTS / f"{args.out}.json").write_text(
        json.dumps({"costs": costs, "identity_val_dice": before, "log": log, "config": config}, indent=1)
    )


if __name__ == "__main__":
    main()
