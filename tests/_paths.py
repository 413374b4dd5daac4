"""Where the repository and the shared real data are, for every test folder."""

from pathlib import Path

__all__ = ["ROOT", "SHARED_DATA"]

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
