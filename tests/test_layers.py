"""The layering rules of the project, and ruff/mypy cleanliness, as tests."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# A layer may import itself and the layers listed for it, nothing above.
ALLOWED = {
    "db": {"db"},
    "models": {"models"},
    "worker": {"worker", "db", "models"},
    "listeners": {"listeners", "worker", "db", "models"},
}
LAYERS = set(ALLOWED)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_nothing_imports_upward(layer: str) -> None:
    for path in (REPO / layer).rglob("*.py"):
        upward = (_imports(path) & LAYERS) - ALLOWED[layer]
        assert not upward, f"{path.relative_to(REPO)} imports {sorted(upward)}"


def test_db_and_models_never_read_the_environment() -> None:
    for layer in ("db", "models"):
        for path in (REPO / layer).rglob("*.py"):
            text = path.read_text()
            assert "os.environ" not in text and "getenv" not in text, path


def test_listener_process_never_imports_torch() -> None:
    code = (
        "import sys, listeners.cli, listeners.dicom, worker.sweeper, worker.celery_app;"
        "sys.exit(1 if 'torch' in sys.modules or 'monai' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_ruff_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_clean(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
