"""Shared test fixtures: where the real data lives (never downloaded)."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
  """BFPRUNE_DATA_DIR (relative paths resolve against the repo root) or <repo>/../shared/data."""
  env = os.environ.get("BFPRUNE_DATA_DIR")
  path = Path(env) if env else REPO.parent / "shared" / "data"
  if not path.is_absolute():
    path = (Path.cwd() / path) if (Path.cwd() / path).exists() else (REPO / path)
  return path.resolve()


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
  path = data_dir()
  assert (path / "mnist").is_dir(), f"test data not found at {path} (set BFPRUNE_DATA_DIR)"
  return path


@pytest.fixture(scope="session")
def mnist(shared_data_dir):
  from bfprune import data
  return data.load_dataset("mnist", shared_data_dir)
