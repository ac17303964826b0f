"""Where things are: the repository, and ../shared beside the clone (CRDs, model configs)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
