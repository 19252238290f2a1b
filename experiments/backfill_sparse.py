r"""Adds ``inference_seconds_sparse`` to results rows written before that column existed.

  python experiments/backfill_sparse.py --results experiments/results/paper_mnist [--limit=5]
      [--data_dir=...]

For every row of ``<results>/results.jsonl`` without ``inference_seconds_sparse`` (in file
order, grouped by pre-trained state; until ``--limit`` rows are backfilled in this call):

1. its ``RunConfig`` is rebuilt from the row's fields (they are all in the row; the row's
   ``train_examples`` is the count used, so 0 = all is tried too) and must give the row's
   ``run_key`` back;
2. the run's masks are recomputed exactly as the run made them: the same initialisation, the
   same pre-training (e.g. 10 epochs for Mag) and the same pruning, with the same code
   (``pipeline.pretrained_state`` / ``pipeline.initial_masks``, which ``run_one`` is built
   from), on the same training examples (``train_examples``);
3. the recomputed masks must reproduce the row's ``density`` and ``flop_density`` to 1e-6 (and
   each layer's kept count, where the row lists ``layers``); otherwise the row is skipped with a
   warning and left as it was;
4. sparse inference is timed with ``pipeline.timed_sparse_inference`` (BCSR, median of 5 passes
   over the test set) on the params at pruning time (init or pre-trained) with those masks.
   The run's trained weights are not saved, but the time depends only on the sparsity pattern
   (how many entries each BCSR matrix stores, in which rows, and which input rows are gathered),
   not on the stored values, so this is the time the trained net would take (up to timing
   noise). The logit check of ``timed_sparse_inference`` still
   runs (against the masked-dense model on the same params); there is no dense top-1 to compare
   with, so that check is skipped.

The row gets ``inference_seconds_sparse`` (None where ``bfprune.sparse`` does not support the
model: ``--factorize=head|all``, BatchNorm; no masks are recomputed for those) and
``"inference_seconds_sparse_backfilled": true``; every other field is left as it was.

Each row is written back on its own, as soon as it is done: under the lock of
``results_io.append_row`` the file is re-read, the rows with that ``run_key`` still lacking the
value are replaced in place, and the file is rewritten atomically (temp file in the same
folder, fsync, rename). So a sweep may append to the file meanwhile, an interrupted backfill
loses at most the row in progress, and rerunning the command resumes with the rows still
missing the value; no row is ever duplicated or dropped. Pre-trained states are shared by rows
that differ only in pruner settings / compression (rows are processed grouped that way).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import config as cfg_lib  # noqa: E402
from experiments import results_io  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined by the script's main only, so that importing this module (tests, notebooks) adds
  no flags that clash with other scripts' (report.py defines --results too)."""
  flags.DEFINE_string("results", None,
                      "Folder holding results.jsonl (or the .jsonl file itself)")
  flags.DEFINE_string("data_dir", None, "Folder of the standard data files (default: "
                      "$BFPRUNE_DATA_DIR, else tensorflow-datasets)")
  flags.DEFINE_integer("limit", 0, "Backfill at most this many rows in this call (0: all); "
                       "skipped rows do not count")


FIELD = "inference_seconds_sparse"
MARK = "inference_seconds_sparse_backfilled"
TOL = 1e-6
# Settings that act only from pruning on: runs differing only in these share a pre-trained state.
PRUNE_ONLY_FIELDS = ("pruner", "compression", "post_epochs", "prune_rounds", "prune_schedule",
                     "prune_scope", "prune_per_class")


class BackfillError(ValueError):
  """A row that cannot be backfilled; the message says why (the row is skipped)."""


def config_from_row(row: dict[str, Any]) -> cfg_lib.RunConfig:
  """The row's RunConfig (validated); it must reproduce the row's run_key.

  Every RunConfig field is in the row, except that ``run_one`` overwrites ``train_examples``
  with the number of training examples actually used (60000 for the config's 0 = all), so both
  readings are tried.
  """
  names = [f.name for f in dataclasses.fields(cfg_lib.RunConfig)]
  missing = [n for n in names if n not in row]
  if missing:
    raise BackfillError(f"row lacks RunConfig fields {missing}")
  keys = []
  for train_examples in dict.fromkeys([row["train_examples"], 0]):
    try:
      cfg = cfg_lib.RunConfig(**{**{n: row[n] for n in names},
                                 "train_examples": train_examples}).validate()
    except (TypeError, cfg_lib.ConfigError) as e:
      raise BackfillError(f"row's config is not valid: {e}") from None
    if cfg.key() == row.get("run_key"):
      return cfg
    keys.append(cfg.key())
  raise BackfillError(f"the config rebuilt from the row has key {' or '.join(keys)}, the row "
                      f"says {row.get('run_key')}")


def pretrain_key(cfg: cfg_lib.RunConfig) -> tuple:
  """Identifies the state pruning starts from (equal for runs differing only after it)."""
  return tuple(sorted((k, v) for k, v in dataclasses.asdict(cfg).items()
                      if k not in PRUNE_ONLY_FIELDS))


def missing_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Rows still without the sparse column, one per run_key, in file order."""
  out, seen = [], set()
  for r in rows:
    if FIELD not in r and r.get("run_key") not in seen:
      seen.add(r.get("run_key"))
      out.append(r)
  return out


def check_masks(row: dict[str, Any], density: float, flop_density: float,
                layers: list[dict[str, Any]]) -> None:
  """Raises BackfillError unless recomputed masks reproduce the row's recorded sparsity."""
  for name, got in (("density", density), ("flop_density", flop_density)):
    want = row.get(name)
    if not isinstance(want, (int, float)) or not abs(got - want) <= TOL:
      raise BackfillError(f"recomputed masks give {name} {got!r}, the row recorded {want!r}")
  recorded = {l.get("name"): l.get("kept") for l in row.get("layers") or []
              if isinstance(l, dict)}
  for l in layers:
    if l["name"] in recorded and recorded[l["name"]] != l["kept"]:
      raise BackfillError(f"recomputed masks keep {l['kept']} weights in {l['name']}, the row "
                          f"recorded {recorded[l['name']]}")


class Backfiller:
  """Computes the sparse column of rows; datasets and pre-trained states are reused."""

  def __init__(self, data_dir: Optional[str], log: Callable[[str], None] = logging.info):
    self.data_dir, self.log = data_dir, log
    self._datasets: dict[tuple[str, int], Any] = {}
    self._start: tuple[Optional[tuple], Any] = (None, None)

  def dataset(self, cfg: cfg_lib.RunConfig):
    """The dataset the run saw: the named split, cut to ``train_examples`` as sweep.py does."""
    key = (cfg.dataset, cfg.train_examples)
    if key not in self._datasets:
      from experiments import pipeline
      ds = pipeline.load_training_data(cfg.dataset, self.data_dir, cfg.train_examples)
      self._datasets = {key: ds}  # one at a time (a grid has one dataset)
    return self._datasets[key]

  def value(self, row: dict[str, Any]) -> Optional[float]:
    """The row's sparse inference seconds (None: unsupported); BackfillError if unverifiable."""
    import jax
    from bfprune import metrics
    from bfprune.pruning import masks as masks_lib
    from experiments import pipeline

    cfg = config_from_row(row)
    why = pipeline.sparse_unsupported(cfg)
    if why is not None:
      self.log(f"{cfg.key()}: not supported by the sparse path ({why}): None")
      return None
    ds = self.dataset(cfg)
    for name, n in (("train_examples", len(ds.train_x)), ("test_examples", len(ds.test_x))):
      if name in row and row[name] != n:
        raise BackfillError(f"the row's run saw {row[name]} {name.split('_')[0]} examples, "
                            f"the data here has {n}")
    key = pretrain_key(cfg)
    if self._start[0] != key:
      self._start = (None, None)  # free the previous state first
      self._start = (key, pipeline.pretrained_state(cfg, ds, log=self.log))
    parts, state, masks = pipeline.initial_masks(cfg, ds, log=self.log, start=self._start[1])
    variables = {"params": state.params, **({"batch_stats": state.batch_stats}
                                            if state.batch_stats else {})}
    summ = metrics.summary(parts.model, jax.device_get(variables), masks, parts.in_shape)
    check_masks(row, masks_lib.density(masks), summ["flop_density"], summ["layers"])
    return pipeline.timed_sparse_inference(
        cfg, jax.device_get(state.params), jax.device_get(masks), ds.test_x, ds.test_y,
        model=parts.model, log=self.log)


def store(path: Path, run_key: str, value: Optional[float]) -> int:
  """Writes the value into every row of ``run_key`` still lacking it; returns how many."""
  def update(row):
    if row.get("run_key") != run_key or FIELD in row:
      return None
    return {**row, FIELD: value, MARK: True}
  return results_io.update_rows(path, update)


def backfill(path: Path, data_dir: Optional[str] = None, limit: int = 0,
             log: Callable[[str], None] = logging.info) -> dict[str, int]:
  """Backfills ``path`` (a results.jsonl); returns counts: missing, done, skipped, left."""
  todo = missing_rows(results_io.read_rows(path))
  # Group rows that share a pre-trained state (stable: file order within a group).
  order = {}
  for r in todo:
    try:
      order.setdefault(pretrain_key(config_from_row(r)), len(order))
    except BackfillError:
      pass
  def group(r):
    try:
      return order[pretrain_key(config_from_row(r))]
    except BackfillError:
      return len(order)  # rows whose config cannot be rebuilt last (they are skipped)
  todo.sort(key=group)
  stats = {"missing": len(todo), "done": 0, "skipped": 0}
  worker = Backfiller(data_dir, log)
  for i, row in enumerate(todo, 1):
    if 0 < limit <= stats["done"]:
      break
    tag = (f"[{i}/{len(todo)}] {row.get('model')}/{row.get('dataset')} factorize="
           f"{row.get('factorize')} pruner={row.get('pruner')} c={row.get('compression')} "
           f"seed={row.get('seed')} ({row.get('run_key')})")
    try:
      value = worker.value(row)
    except BackfillError as e:
      logging.warning("%s: skipped, %s", tag, e)
      stats["skipped"] += 1
      continue
    n = store(path, row["run_key"], value)
    stats["done"] += 1
    shown = "None" if value is None else f"{value:.4g} s"
    log(f"{tag}: {FIELD} = {shown} ({n} row{'s' if n != 1 else ''} updated)")
  stats["left"] = len(missing_rows(results_io.read_rows(path)))
  return stats


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.results:
    sys.exit("backfill_sparse.py: error: --results is required: the folder holding "
             "results.jsonl")
  path = Path(FLAGS.results)
  if path.is_dir():
    path = path / "results.jsonl"
  if not path.is_file():
    sys.exit(f"backfill_sparse.py: error: no results file at {path}")
  if FLAGS.limit < 0:
    sys.exit(f"backfill_sparse.py: error: --limit={FLAGS.limit} must be >= 0 (0: all rows)")
  try:
    results_io.read_rows(path)
  except ValueError as e:  # a malformed line
    sys.exit(f"backfill_sparse.py: error: {e}")
  from bfprune import data as data_lib
  try:
    stats = backfill(path, FLAGS.data_dir, FLAGS.limit)
  except data_lib.DataError as e:
    sys.exit(f"backfill_sparse.py: data error: {e}")
  print(f"{path}: {stats['missing']} rows lacked {FIELD}; {stats['done']} backfilled, "
        f"{stats['skipped']} skipped, {stats['left']} still without it")


if __name__ == "__main__":
  define_flags()
  app.run(main)
