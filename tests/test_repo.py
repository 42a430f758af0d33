import ast
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


def _layers() -> dict[str, int]:
    """ARCHITECTURE.md's layer table: each ``stnreg/`` path named in a row's module column -> the row's layer."""
    table = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if row:
            for path in re.findall(r"`(stnreg/[^`]*)`", row.group(2)):
                table[path] = int(row.group(1))
    return table


def _layer_of(path: str, table: dict[str, int]) -> int | None:
    """The layer of a file: its own row, else the row of the nearest package folder (``stnreg/fast/``)."""
    if path in table:
        return table[path]
    folders = [p for p in table if p.endswith("/") and path.startswith(p)]
    return table[max(folders, key=len)] if folders else None


def _module_file(name: str) -> str | None:
    """``stnreg.a.b`` -> ``stnreg/a/b.py`` or ``stnreg/a/b/__init__.py`` (``None``: no such module)."""
    base = name.replace(".", "/")
    for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if (ROOT / candidate).exists():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """The ``stnreg`` files that a source file imports, in functions too, but not under ``TYPE_CHECKING``."""
    # The package that relative imports start from: the folder, for a module and for an __init__ alike.
    package = list(path.relative_to(ROOT).parts[:-1])
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            if not node.level:
                base = node.module or ""
            # ``from pkg import submodule`` imports the submodule; ``from module import name`` the module.
            names = [f"{base}.{a.name}" if _module_file(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        found.update(f for n in names if n.split(".")[0] == "stnreg" and (f := _module_file(n)))
    return found


def test_every_module_imports_only_from_its_layer_and_the_ones_above():
    """ARCHITECTURE.md's layer table is the import rule; a module that reaches down a layer fails here."""
    table = _layers()
    assert len(table) > 20, "ARCHITECTURE.md must keep its layer table (| layer | `stnreg/...` | ... |)"
    wrong = []
    for path in sorted((ROOT / "stnreg").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        layer = _layer_of(rel, table)
        if layer is None:
            wrong.append(f"{rel} has no row in ARCHITECTURE.md's layer table")
            continue
        for target in sorted(_imports(path)):
            below = _layer_of(target, table)
            if below is None or below > layer:
                wrong.append(f"{rel} (layer {layer}) imports {target} (layer {below})")
    assert not wrong, "\n".join(wrong)
