"""Shared test fixtures: where the real data lives (never downloaded).

The data folder is $BFPRUNE_DATA_DIR, else <repo>/../shared/data. When the tests selected for a
run need it (they use the ``shared_data_dir`` / ``mnist`` fixtures, or their module imports
``data_dir`` from here) and it lacks the MNIST files, the session stops before any test runs with
one message saying how to get the files; runs of tests that need no data are unaffected.
"""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_DATA_FIXTURES = {"shared_data_dir", "mnist"}
_MNIST_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")


def data_dir() -> Path:
  """BFPRUNE_DATA_DIR (relative paths resolve against the cwd, else the repo root) or
  <repo>/../shared/data."""
  env = os.environ.get("BFPRUNE_DATA_DIR")
  path = Path(env) if env else REPO.parent / "shared" / "data"
  if not path.is_absolute():
    path = (Path.cwd() / path) if (Path.cwd() / path).exists() else (REPO / path)
  return path.resolve()


def missing_data(path: Path) -> str | None:
  """Why ``path`` is not a usable test data folder (None if it is): it must hold the four MNIST
  files (``.gz`` or not, dashed or dotted names) in ``path/`` or ``path/mnist/``."""
  if not path.is_dir():
    return f"{path} does not exist"
  dirs = [path, path / "mnist"]
  def present(stem):
    return any(next(d.glob(n + "*"), None) for d in dirs for n in (stem, stem.replace("-idx", ".idx")))
  absent = [s for s in _MNIST_STEMS if not present(s)]
  if absent:
    return f"{path} has no MNIST {', '.join(absent)} (in it or in its mnist/)"
  return None


def pytest_configure(config):
  # sweep.py / collapse.py keep a persistent compilation cache under $XDG_CACHE_HOME by default:
  # the tests' subprocesses share one for the session, never the user's.
  config.bfprune_cache_home = tempfile.mkdtemp(prefix="bfprune-tests-cache-")
  os.environ["XDG_CACHE_HOME"] = config.bfprune_cache_home


def pytest_unconfigure(config):
  shutil.rmtree(getattr(config, "bfprune_cache_home", ""), ignore_errors=True)


def missing_cifar10(path: Path) -> str | None:
  """Why ``path`` holds no CIFAR-10 copy (None if it does): a ``cifar-10-*`` folder or archive
  in ``path/`` or ``path/cifar10/``."""
  if any(next(d.glob("cifar-10-*"), None) for d in (path, path / "cifar10") if d.is_dir()):
    return None
  return f"{path} has no CIFAR-10 (cifar-10-* in it or in its cifar10/)"


def _needs_data(item: pytest.Item) -> bool:
  module = getattr(item, "module", None)
  return (bool(_DATA_FIXTURES & set(getattr(item, "fixturenames", ())))
          or getattr(module, "data_dir", None) is data_dir)


def _needs_cifar10(item: pytest.Item) -> bool:  # modules that set NEEDS_CIFAR10 = True
  return bool(getattr(getattr(item, "module", None), "NEEDS_CIFAR10", False))


def pytest_collection_modifyitems(session, config, items):
  if not any(_needs_data(item) or _needs_cifar10(item) for item in items):
    return
  why = missing_data(data_dir())
  if why is None and any(_needs_cifar10(item) for item in items):
    why = missing_cifar10(data_dir())
  if why:
    pytest.exit(f"test data not found: {why}. Get the standard files with "
                "`python -m bfprune.data fetch DIR` and run the tests with BFPRUNE_DATA_DIR=DIR.",
                returncode=4)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
  return data_dir()


@pytest.fixture(scope="session")
def mnist(shared_data_dir):
  from bfprune import data
  return data.load_dataset("mnist", shared_data_dir)
