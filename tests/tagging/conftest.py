"""Fixtures of the tagging tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve._serve_fixtures import make_run


@pytest.fixture(scope="package")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny run (scores arbitrary but deterministic)."""
    return make_run(tmp_path_factory.mktemp("tagging") / "run")
