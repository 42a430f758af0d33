import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert len(blocks) >= 2, "README must show the two commands"
    ci = [
        ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))
    ]
    assert ci == [blocks[1].strip()]
    assert "stnreg demo" in blocks[0]


def test_demo_recovers_known_warp(tmp_path):
    from stnreg.cli import main

    assert main(["demo", "-o", str(tmp_path), "-q"]) == 0
    assert (tmp_path / "qc.png").stat().st_size > 10_000
    for name in ("warped.nii.gz", "affine.tfm", "deformable.nii.gz", "report.json"):
        assert (tmp_path / name).exists(), name
