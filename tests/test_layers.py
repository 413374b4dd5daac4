"""The layering of docs/design.md is a checked contract: `lint-imports` ([tool.importlinter] in pyproject.toml)
passes, so an import from a lower layer into a higher one (model -> train, data -> model, ...) fails the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests._paths import ROOT

ROOT = ROOT


def test_imports_follow_the_layers():
    lint_imports = Path(sys.executable).parent / "lint-imports"  # the venv's, installed by the `dev` extra
    assert lint_imports.is_file(), f"{lint_imports} not found: pip install -e '.[dev]' (import-linter)"
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    report = result.stdout[result.stdout.find("Contracts\n"):]  # after import-linter's banner
    assert result.returncode == 0, f"lint-imports found an import against the layers:\n{report}{result.stderr}"
