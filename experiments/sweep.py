r"""The main job: flags -> validated run configs -> runs -> ``<out_dir>/results.jsonl``.

Examples:
  python experiments/sweep.py --pruner=grasp                      # the study's MNIST setting
  python experiments/sweep.py --pruner=rand,snip --compression=0.5,1,2 --seeds=2
  python experiments/sweep.py --dataset=cifar10 --factorize=head --pruner=synflow

Every configuration is validated before any training starts. Each finished run appends one
row (atomically) to results.jsonl; rerunning the same command skips runs already there.
"""
from __future__ import annotations

import itertools
import logging as std_logging
import os
import shutil
import sys
import time
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import config as cfg_lib  # noqa: E402
from experiments import results_io  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "mnist", "mnist | cifar10")
flags.DEFINE_string("model", "", "fc | vgg16 (default: fc for mnist, vgg16 for cifar10)")
flags.DEFINE_string("factorize", "none", "Comma list of none | head | all: which layers are "
                    "butterfly / K-matrix (head: the classifier; all: every layer)")
flags.DEFINE_string("factorize_with", "butterfly", "butterfly | kmatrix | monarch: the "
                    "structured dense layer that --factorize puts in")
flags.DEFINE_bool("prune_factors", False, "Also prune butterfly twiddles / Monarch blocks")
flags.DEFINE_string("pruner", "none", "Comma list of none | rand | mag | snip | grasp | synflow")
flags.DEFINE_string("compression", "1", "Comma list of compressions c; density = 10**-c")
flags.DEFINE_integer("pre_epochs", -1, "Training epochs before pruning (-1: 10 for mag, else 0)")
flags.DEFINE_integer("post_epochs", 50, "Training epochs after pruning")
flags.DEFINE_integer("prune_rounds", 0, "Pruning rounds (0: 100 for synflow, else 1)")
flags.DEFINE_string("prune_schedule", "exponential", "exponential | linear density schedule")
flags.DEFINE_string("prune_scope", "global", "global | local mask selection")
flags.DEFINE_integer("prune_per_class", 10, "Pruning examples per class (SNIP, GraSP)")
flags.DEFINE_integer("batch_size", 256, "Batch size (divisible by the number of devices)")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate")
flags.DEFINE_float("dropout", 0.1, "Dropout rate")
flags.DEFINE_bool("batch_norm", False, "VGG16 with BatchNorm")
flags.DEFINE_integer("seed", 0, "First seed")
flags.DEFINE_integer("train_examples", 0, "Use only the first n training examples (0: all)")
flags.DEFINE_integer("seeds", 1, "Number of seeds: seed, seed+1, ...")
flags.DEFINE_string("data_dir", None, "Folder of the standard data files (default: "
                    "$BFPRUNE_DATA_DIR, else tensorflow-datasets)")
flags.DEFINE_string("out_dir", "runs/sweep", "Where results.jsonl and checkpoints are written")
flags.DEFINE_string("compilation_cache", "", "JAX persistent compilation cache folder, or 'none' "
                    "(default: $XDG_CACHE_HOME/bfprune/jax): same-shaped runs reuse compiles")
flags.DEFINE_string("grid", "", "A named grid overriding --pruner/--compression/--factorize: "
                    + " | ".join(cfg_lib.GRIDS))


def configs_from_flags() -> list[cfg_lib.RunConfig]:
  """Every run the flags ask for, validated; raises ConfigError naming the bad flag."""
  dataset = FLAGS.dataset
  if dataset not in cfg_lib.DATASETS:
    raise cfg_lib.ConfigError(f"--dataset={dataset!r} is not valid; expected one of "
                              f"{', '.join(cfg_lib.DATASETS)}")
  model = FLAGS.model or cfg_lib.DEFAULT_MODEL[dataset]
  if FLAGS.seeds < 1:
    raise cfg_lib.ConfigError(f"--seeds={FLAGS.seeds} must be >= 1")
  if FLAGS.grid:
    if FLAGS.grid not in cfg_lib.GRIDS:
      raise cfg_lib.ConfigError(f"--grid={FLAGS.grid!r} is not valid; expected one of "
                                f"{', '.join(cfg_lib.GRIDS)}")
    dataset, model = cfg_lib.GRIDS[FLAGS.grid]["dataset"], cfg_lib.GRIDS[FLAGS.grid]["model"]
    cells = cfg_lib.GRIDS[FLAGS.grid]["cells"]
  else:
    pruners = cfg_lib.parse_list(FLAGS.pruner, str, "pruner")
    compressions = cfg_lib.parse_list(FLAGS.compression, float, "compression")
    factorizations = cfg_lib.parse_list(FLAGS.factorize, str, "factorize")
    cells = [(f, p, c) for f, p in itertools.product(factorizations, pruners)
             # Without a pruner the compression is meaningless: one dense run, not one per value.
             for c in (compressions if p != "none" else [0.0])]
  out = []
  for (factorize, pruner, c), seed in itertools.product(
      cells, range(FLAGS.seed, FLAGS.seed + FLAGS.seeds)):
    out.append(cfg_lib.RunConfig(
        dataset=dataset, model=model, factorize=factorize, pruner=pruner, compression=c,
        factorize_with=FLAGS.factorize_with, prune_factors=FLAGS.prune_factors,
        pre_epochs=cfg_lib.default_pre_epochs(pruner, FLAGS.pre_epochs)
        if pruner != "none" else 0,
        post_epochs=FLAGS.post_epochs,
        prune_rounds=cfg_lib.default_rounds(pruner, FLAGS.prune_rounds),
        prune_schedule=FLAGS.prune_schedule, prune_scope=FLAGS.prune_scope,
        prune_per_class=FLAGS.prune_per_class, batch_size=FLAGS.batch_size, lr=FLAGS.lr,
        dropout=FLAGS.dropout, batch_norm=FLAGS.batch_norm, seed=seed,
        train_examples=FLAGS.train_examples).validate())
  return out


class _QuietLibraries(std_logging.Filter):
  """Drops orbax's per-save INFO chatter so one line per epoch stays readable."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  std_logging.getLogger().addFilter(_QuietLibraries())
  for handler in std_logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    configs = configs_from_flags()
  except cfg_lib.ConfigError as e:
    sys.exit(f"sweep.py: error: {e}")

  # Heavy imports after validation so a bad flag fails in a fraction of a second.
  from bfprune import data as data_lib
  from experiments import pipeline
  try:
    pipeline.enable_compilation_cache(FLAGS.compilation_cache)
  except pipeline.CompilationCacheError as e:
    sys.exit(f"sweep.py: error: {e}")

  results = Path(FLAGS.out_dir) / "results.jsonl"
  done = results_io.finished_keys(results_io.read_rows(results))
  todo = [c for c in configs if c.key() not in done]
  logging.info("%d runs requested, %d already in %s, %d to do", len(configs),
               len(configs) - len(todo), results, len(todo))
  if not todo:
    return
  try:
    dataset = pipeline.load_training_data(configs[0].dataset, FLAGS.data_dir,
                                          FLAGS.train_examples, configs[0].batch_size)
  except data_lib.DataError as e:
    sys.exit(f"sweep.py: data error: {e}")
  except pipeline.DataSizeError as e:
    sys.exit(f"sweep.py: error: {e}")
  ckpt_root = Path(FLAGS.out_dir) / "checkpoints"
  for cfg in configs:  # a checkpoint left by a run that finished just before a kill
    if cfg.key() in done and (ckpt_root / cfg.key()).exists():
      shutil.rmtree(ckpt_root / cfg.key())
  for i, cfg in enumerate(todo, 1):
    tag = (f"[{i}/{len(todo)}] {cfg.model}/{cfg.dataset} factorize={cfg.factorize} "
           f"pruner={cfg.pruner} c={cfg.compression:g} seed={cfg.seed}")
    logging.info("%s: start (key %s)", tag, cfg.key())
    t0 = time.perf_counter()
    row = pipeline.run_one(cfg, dataset, ckpt_dir=str(ckpt_root / cfg.key()),
                           log=lambda s: logging.info("%s: %s", tag, s),
                           history_log=lambda s: logging.info("%s: %s", tag, s))
    row["data_dir"] = str(FLAGS.data_dir or os.environ.get("BFPRUNE_DATA_DIR", "tfds"))
    results_io.append_row(results, row)
    shutil.rmtree(ckpt_root / cfg.key(), ignore_errors=True)
    logging.info("%s: top1=%.2f density=%.4g flop_density=%.4g collapsed=%s (%.0f s)", tag,
                 row["top1"], row["density"], row["flop_density"], row["collapsed"],
                 time.perf_counter() - t0)


if __name__ == "__main__":
  app.run(main)
