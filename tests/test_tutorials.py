"""Tutorial notebooks run on a small budget so that they never rot."""

import json
import os
from pathlib import Path

import pytest
import torch

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


def run_notebook(path: Path, env: dict[str, str], cwd: Path) -> dict:
    """Execute the code cells of a notebook in order in one namespace (no kernel needed)."""
    cells = json.loads(path.read_text())["cells"]
    old_env, old_cwd = dict(os.environ), os.getcwd()
    os.environ.update(env)
    os.chdir(cwd)
    namespace: dict = {"__name__": "__main__"}
    try:
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "code":
                code = compile("".join(cell["source"]), f"{path.name}[cell {i}]", "exec")
                exec(code, namespace)
    finally:
        os.environ.clear()
        os.environ.update(old_env)
        os.chdir(old_cwd)
    return namespace


def test_register_3d_pair_notebook(tmp_path, data_dir):
    ns = run_notebook(
        TUTORIALS / "register_3d_pair.ipynb",
        {"STNREG_DATA": str(data_dir), "STNREG_TUTORIAL_BUDGET": "0.1", "STNREG_TUTORIAL_OUT": str(tmp_path / "out")},
        tmp_path,
    )
    # At this budget the notebook reaches NCC 0.834 (from 0.633) and gland Dice 0.838 (from 0.760), no
    # folding. Without the SVF stage it reaches NCC 0.713, Dice 0.745; without rigid+affine, NCC 0.808,
    # Dice 0.781: each threshold below fails when a stage does nothing useful.
    m = ns["result"].metrics
    assert m["ncc_after"] > 0.80, m
    assert m["dice_after"] > 0.81 and m["dice_after"] > m["dice_before"] + 0.05, m
    assert m["jacobian"]["folding_percent"] < 0.01, m["jacobian"]
    assert abs(ns["dice"][1] - m["dice_after"]) < 0.02  # the labels carried through the saved transform
    assert ns["rel"] < 0.01  # SimpleITK applies the exported transforms to the same effect (0.34% measured)
    assert (tmp_path / "out" / "qc.png").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in TUTORIALS.glob("*.ipynb")))
def test_notebooks_are_valid_json_without_outputs(name):
    nb = json.loads((TUTORIALS / name).read_text())
    assert nb["nbformat"] == 4
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")


def test_learned_oasis2d_notebook(tmp_path, data_dir):
    ns = run_notebook(
        TUTORIALS / "learned_oasis2d.ipynb",
        {"STNREG_DATA": str(data_dir), "STNREG_TUTORIAL_BUDGET": "0.003", "STNREG_TUTORIAL_OUT": str(tmp_path / "out")},
        tmp_path,
    )
    # 4 training steps leave the network near the identity (NCC 0.872 from 0.871); the 50 refinement
    # steps reach NCC 0.960, registration from scratch 0.961, both without folding.
    net, refined, scratch = (ns[k].metrics for k in ("net", "refined", "scratch"))
    assert abs(net["ncc_after"] - net["ncc_before"]) < 0.02, net  # an untrained network does no harm
    assert refined["ncc_after"] > 0.94 and scratch["ncc_after"] > 0.94, (refined, scratch)
    assert refined["ncc_after"] > scratch["ncc_after"] - 0.02, (refined, scratch)
    assert all(m["jacobian"]["folding_percent"] < 0.01 for m in (net, refined, scratch))
    assert (tmp_path / "out" / "pair" / "qc.png").exists() and (tmp_path / "out" / "learned_oasis2d.png").exists()


def test_stn_mnist_rts_notebook(tmp_path, data_dir):
    ns = run_notebook(
        TUTORIALS / "stn_mnist_rts.ipynb",
        {"STNREG_DATA": str(data_dir), "STNREG_TUTORIAL_BUDGET": "0.01", "STNREG_TUTORIAL_OUT": str(tmp_path / "out")},
        tmp_path,
    )
    # 512 digits x 3 epochs of 128 = 12 steps per model: too few to learn RTS MNIST (89.1% and 89.8% test
    # error measured, chance is 90%), so no accuracy is asserted; the notebook's wiring and budget are.
    errors = ns["errors"]
    assert set(errors) == {"cnn", "st-cnn"} and all(0 <= e <= 100 for e in errors.values()), errors
    for task in ns["models"].values():
        assert task.trainer.global_step == 12
    st = ns["models"]["st-cnn"].model
    x = ns["data"].test_set.tensors[0][:10].float() / 255
    with torch.no_grad():
        seen = st.transformed(x)
    assert seen.shape == (10, 1, 21, 21) and torch.isfinite(seen).all()
    assert (tmp_path / "out" / "rts_transformer.png").exists()


def test_synth_3d_notebook(tmp_path, data_dir):
    ns = run_notebook(
        TUTORIALS / "synth_3d.ipynb",
        {"STNREG_DATA": str(data_dir), "STNREG_TUTORIAL_BUDGET": "0.1", "STNREG_TUTORIAL_OUT": str(tmp_path / "out")},
        tmp_path,
    )
    assert ns["trainer"].global_step == 2
    net, refined = ns["net"].metrics, ns["refined"].metrics
    # The shipped network, trained on synthetic pairs only, on a real inter-subject prostate pair: gland
    # Dice 0.591 before, 0.752 after one forward pass; the refinement keeps or raises it.
    assert net["dice_after"] > net["dice_before"] + 0.1, net
    assert refined["dice_after"] > net["dice_after"] - 0.01, (net, refined)
    assert all(m["jacobian"]["folding_percent"] < 0.01 for m in (net, refined))
    assert ns["net"].settings["network"]["stages"] == ["svf"]
    assert (tmp_path / "out" / "synthetic_vs_real.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "synth_pair" / "report.json").exists()
