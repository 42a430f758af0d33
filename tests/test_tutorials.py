"""Tutorial notebooks run on a small budget so that they never rot."""

import json
import os
from pathlib import Path

import pytest

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
    assert ns["result"].metrics["dice_after"] > ns["result"].metrics["dice_before"]
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
    assert ns["refined"].metrics["ncc_after"] > ns["refined"].metrics["ncc_before"]
    assert (tmp_path / "out" / "pair" / "qc.png").exists() and (tmp_path / "out" / "learned_oasis2d.png").exists()


def test_stn_mnist_rts_notebook(tmp_path, data_dir):
    ns = run_notebook(
        TUTORIALS / "stn_mnist_rts.ipynb",
        {"STNREG_DATA": str(data_dir), "STNREG_TUTORIAL_BUDGET": "0.01", "STNREG_TUTORIAL_OUT": str(tmp_path / "out")},
        tmp_path,
    )
    assert all(e < 90.0 for e in ns["errors"].values())  # better than chance on a tiny budget
    assert (tmp_path / "out" / "rts_transformer.png").exists()
