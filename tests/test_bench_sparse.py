"""experiments/bench_sparse.py's ``crossover``: hand-built rows whose answer is known exactly."""
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from experiments.bench_sparse import crossover  # noqa: E402

# exp(log(d)) can differ from d in the last bit; nothing else is rounded.
REL = 1e-12


def _row(density, sparse, dense, **extra):
  return {"density": density, "bcsr": sparse, "dense": dense, **extra}


def test_interpolates_log_linearly_between_the_last_loss_and_the_first_win():
  # Time ratios sparse / dense: 4 at density 1, 2 at 0.1, 1/2 at 0.01. The log-ratio falls
  # from +log 2 to -log 2 between 0.1 and 0.01, so it crosses 0 halfway in log density:
  # 10^-1.5.
  rows = [_row(1.0, 4.0, 1.0), _row(0.1, 2.0, 1.0), _row(0.01, 0.5, 1.0)]
  assert crossover(rows, "bcsr", "dense") == pytest.approx(10 ** -1.5, rel=REL)
  # Row order does not matter; absolute times only enter through their ratio.
  shuffled = [_row(0.01, 5.0, 10.0), _row(1.0, 0.4, 0.1), _row(0.1, 6.0, 3.0)]
  assert crossover(shuffled, "bcsr", "dense") == pytest.approx(10 ** -1.5, rel=REL)


def test_unequal_log_ratios_give_the_weighted_point():
  # log-ratio +log 3 at 0.1, -log 9 = -2 log 3 at 0.001: zero one third of the way down in
  # log density, i.e. at 10^(-1 - 2/3).
  rows = [_row(0.1, 3.0, 1.0), _row(0.001, 1.0, 9.0)]
  assert crossover(rows, "bcsr", "dense") == pytest.approx(10 ** (-1 - 2 / 3), rel=REL)


def test_crossing_at_a_grid_point():
  # Equal times at 0.1 (ratio exactly 1: not a win), faster at 0.01: the crossing is 0.1.
  rows = [_row(1.0, 3.0, 1.0), _row(0.1, 2.0, 2.0), _row(0.01, 1.0, 2.0)]
  assert crossover(rows, "bcsr", "dense") == pytest.approx(0.1, rel=REL)


def test_wins_already_at_the_highest_density_returns_it():
  rows = [_row(0.5, 1.0, 2.0), _row(0.05, 1.0, 4.0)]
  assert crossover(rows, "bcsr", "dense") == 0.5


def test_never_faster_is_none():
  assert crossover([_row(1.0, 2.0, 1.0), _row(0.1, 1.0, 1.0), _row(0.01, 1.5, 1.0)],
                   "bcsr", "dense") is None
  assert crossover([], "bcsr", "dense") is None


def test_the_first_crossing_from_the_top_counts():
  # Wins at 0.1, loses again at 0.01, wins at 0.001: the largest winning region starts
  # between 1 and 0.1 (log-ratios +log 2 and -log 2: halfway, 10^-0.5).
  rows = [_row(1.0, 2.0, 1.0), _row(0.1, 1.0, 2.0), _row(0.01, 2.0, 1.0), _row(0.001, 1.0, 2.0)]
  assert crossover(rows, "bcsr", "dense") == pytest.approx(10 ** -0.5, rel=REL)


def test_rows_with_an_empty_layer_or_no_timing_are_left_out():
  # The only "win" is a disconnected net (XLA folds it to a constant): not a crossing.
  rows = [_row(1.0, 2.0, 1.0), _row(0.001, 0.01, 1.0, empty_layers=["fc3"])]
  assert crossover(rows, "bcsr", "dense") is None
  # Without the disconnected row, and a row lacking the sparse time, the crossing is the one
  # between the two timed, connected rows: log-ratios +log 2 at 1, -log 2 at 0.01 -> 0.1.
  rows = [_row(1.0, 2.0, 1.0), _row(0.1, None, 1.0), _row(0.01, 1.0, 2.0),
          _row(0.001, 0.01, 1.0, empty_layers=["head"])]
  assert crossover(rows, "bcsr", "dense") == pytest.approx(0.1, rel=REL)
  # Other column names: the function reads the ones it is given.
  rows = [{"density": 1.0, "bcoo": 2.0, "dense_fm": 1.0, "empty_layers": []},
          {"density": 0.01, "bcoo": 1.0, "dense_fm": 2.0, "empty_layers": []}]
  assert crossover(rows, "bcoo", "dense_fm") == pytest.approx(0.1, rel=REL)
