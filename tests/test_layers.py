"""The import layers of pyproject.toml's [tool.importlinter] hold: `lint-imports` passes on this checkout,
and fails on a copy with an upward import or a new cycle (so the contracts are not vacuous)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.fail(f"{exe} is missing: install the dev extra (pip install -e '.[dev]'), which pins import-linter.")
    # the checkout's own package first on the path (an editable install may point at another tree)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(exe), "--no-cache", "--no-logo", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)


def test_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("registry.py", "import hfprune.cli.main", "Layers"),  # upward: the lowest layer imports the CLI
    ("arch/modules.py", "from hfprune.arch import base", "No import cycle"),  # a cycle inside arch/
    ("eval/perplexity.py", "import hfprune", "Only the CLI imports the package root"),
])
def test_a_violation_breaks_a_contract(tmp_path, module, line, broken):
    shutil.copytree(ROOT / "hfprune", tmp_path / "hfprune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / "hfprune" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa: E402\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    broken_section = result.stdout.split("Broken contracts", 1)[-1]
    assert broken in broken_section, result.stdout
