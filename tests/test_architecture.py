"""Import rules (docs/architecture.md, "Packages and what they may import"), as import-linter contracts."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert f"{len(contracts)} kept, 0 broken" in result.stdout  # every contract ran


@pytest.mark.slow
def test_importing_packages_opens_nothing_and_store_stays_torch_free():
    """No module opens a database, client or model on import; store, api and the CLI never pull in torch."""
    code = (
        "import sys, store, store.tables, store.metadata, store.database, api, omniattr.cli, omniattr.settings;"
        "assert 'torch' not in sys.modules, 'torch imported';"
        "assert 'qdrant_edge' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
