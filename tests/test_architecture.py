"""The architecture of docs/architecture.md holds: layers point down, no import cycles, small modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [ROOT / "backend" / "defect_assist", ROOT / "worker" / "defect_assist_worker", ROOT / "tools"]
MAX_LINES = 400


def test_import_contracts_are_kept() -> None:
    """``lint-imports`` (import-linter, contracts in pyproject.toml): layers and acyclic siblings."""
    linter = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(linter)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def test_no_module_is_a_god_module() -> None:
    too_long = {
        str(path.relative_to(ROOT)): n
        for package in PACKAGES
        for path in package.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"
