r"""The main job: flags -> validated run configs -> runs -> ``<out_dir>/results.jsonl``.

Examples:
  python experiments/sweep.py --pruner=grasp                      # the study's MNIST setting
  python experiments/sweep.py --pruner=rand,snip --compression=0.5,1,2 --seeds=2
  python experiments/sweep.py --dataset=cifar10 --factorize=head --pruner=synflow
  python experiments/sweep.py --grid=paper_mnist --dry_run          # what it would run

Every configuration is validated before any training starts: a flag value is used as given or
refused with one line (a flag no run would use, a flag a --grid sets, an empty or repeated list
item are refused too). Each finished run appends one row (atomically) to results.jsonl;
rerunning the same command skips runs already there. The last line says how many runs are
finished and where their results are.
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
flags.DEFINE_string("model", None, "fc | vgg16 (default: fc for mnist, vgg16 for cifar10)")
flags.DEFINE_string("factorize", "none", "Comma list of none | head | all: which layers are "
                    "butterfly / K-matrix (head: the classifier; all: every layer)")
flags.DEFINE_string("factorize_with", "butterfly", "butterfly | kmatrix | monarch: the "
                    "structured dense layer that --factorize puts in")
flags.DEFINE_bool("prune_factors", False, "Also prune butterfly twiddles / Monarch blocks")
flags.DEFINE_string("pruner", "none", "Comma list of none | rand | mag | snip | grasp | synflow")
flags.DEFINE_string("compression", "1", "Comma list of compressions c in [0, 9] for the runs "
                    "with a pruner; density = 10**-c")
flags.DEFINE_integer("pre_epochs", None, "Training epochs before pruning, >= 0, for the runs "
                     "with a pruner (default: 10 for mag, 0 for the others)")
flags.DEFINE_integer("post_epochs", 50, "Training epochs after pruning")
flags.DEFINE_integer("prune_rounds", None, "Pruning rounds, >= 1, for the runs with a pruner "
                     "(default: 100 for synflow, 1 for the others)")
flags.DEFINE_string("prune_schedule", "exponential", "exponential | linear density schedule")
flags.DEFINE_string("prune_scope", "global", "global | local mask selection")
flags.DEFINE_integer("prune_per_class", 10, "Pruning examples per class (SNIP, GraSP)")
flags.DEFINE_integer("batch_size", 256, "Batch size (divisible by the number of devices)")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate")
flags.DEFINE_float("dropout", 0.1, "Dropout rate")
flags.DEFINE_bool("batch_norm", False, "VGG16 with BatchNorm (needs --model=vgg16)")
flags.DEFINE_integer("seed", 0, "First seed")
flags.DEFINE_integer("train_examples", 0, "Use only the first n training examples (0: all)")
flags.DEFINE_integer("seeds", 1, "Number of seeds: seed, seed+1, ...")
flags.DEFINE_string("data_dir", None, "Folder of the standard data files (default: "
                    "$BFPRUNE_DATA_DIR, else tensorflow-datasets)")
flags.DEFINE_string("out_dir", "runs/sweep", "Where results.jsonl and checkpoints are written")
flags.DEFINE_string("compilation_cache", "", "JAX persistent compilation cache folder, or 'none' "
                    "(default: $XDG_CACHE_HOME/bfprune/jax): same-shaped runs reuse compiles")
flags.DEFINE_string("grid", None, "A named grid; it sets "
                    + ", ".join(f"--{f}" for f in cfg_lib.GRID_FLAGS)
                    + " (giving any of them with --grid is an error). "
                    + ". ".join(cfg_lib.describe_grid(g) for g in cfg_lib.GRIDS) + ".")
flags.DEFINE_bool("dry_run", False, "Print the runs this command would do (how many, then one "
                  "line each: key, settings, finished or to do) and exit: no training, no data "
                  "loaded, nothing written")

# Flags that only some runs use: given explicitly while no run of the command uses them, they
# would be recorded in every run's key without changing anything, so they are refused.
_USED_BY = {
    "compression": (lambda c: c.pruner != "none", "no run prunes (--pruner=none)"),
    "pre_epochs": (lambda c: c.pruner != "none", "no run prunes (--pruner=none)"),
    "prune_rounds": (lambda c: c.pruner != "none", "no run prunes (--pruner=none)"),
    "prune_scope": (lambda c: c.pruner != "none", "no run prunes (--pruner=none)"),
    "prune_schedule": (lambda c: c.pruner != "none" and c.prune_rounds > 1,
                       "every run prunes in one round (see --prune_rounds)"),
    "prune_per_class": (lambda c: c.pruner in ("snip", "grasp"),
                        "only snip and grasp prune with examples"),
    "factorize_with": (lambda c: c.factorize != "none",
                       "no run has structured layers (--factorize=none)"),
    "prune_factors": (lambda c: c.pruner != "none" and c.factorize != "none",
                      "no run prunes structured layers (needs a pruner and --factorize)"),
}


def _flag_text(name: str) -> str:
  return f"--{name}={FLAGS[name].value}"


def configs_from_flags() -> list[cfg_lib.RunConfig]:
  """Every run the flags ask for, validated; raises ConfigError naming the bad flag."""
  err = cfg_lib.ConfigError
  if FLAGS.seeds < 1:
    raise err(f"--seeds={FLAGS.seeds} must be >= 1")
  if FLAGS.seed < 0:
    raise err(f"--seed={FLAGS.seed} must be >= 0")
  if FLAGS.pre_epochs is not None and FLAGS.pre_epochs < 0:
    raise err(f"--pre_epochs={FLAGS.pre_epochs} must be >= 0 (leave it out for the default: "
              f"{cfg_lib.MAG_PRE_EPOCHS} for mag, 0 for the others)")
  if FLAGS.prune_rounds is not None and FLAGS.prune_rounds < 1:
    raise err(f"--prune_rounds={FLAGS.prune_rounds} must be >= 1 (leave it out for the "
              "default: 100 for synflow, 1 for the others)")
  if not FLAGS.out_dir:
    raise err("--out_dir is empty")
  if Path(FLAGS.out_dir).exists() and not Path(FLAGS.out_dir).is_dir():
    raise err(f"--out_dir={FLAGS.out_dir!r} exists and is not a folder")
  if FLAGS.grid is not None:
    if FLAGS.grid not in cfg_lib.GRIDS:
      raise err(f"--grid={FLAGS.grid!r} is not valid; expected one of "
                f"{', '.join(cfg_lib.GRIDS)}")
    for name in cfg_lib.GRID_FLAGS:
      if FLAGS[name].present:
        raise err(f"{_flag_text(name)} cannot be combined with --grid={FLAGS.grid}, which sets "
                  f"{', '.join('--' + f for f in cfg_lib.GRID_FLAGS)}; drop one of them")
    grid = cfg_lib.GRIDS[FLAGS.grid]
    dataset, model, cells = grid["dataset"], grid["model"], grid["cells"]
  else:
    dataset = FLAGS.dataset
    if dataset not in cfg_lib.DATASETS:
      raise err(f"--dataset={dataset!r} is not valid; expected one of "
                f"{', '.join(cfg_lib.DATASETS)}")
    model = cfg_lib.DEFAULT_MODEL[dataset] if FLAGS.model is None else FLAGS.model
    pruners = cfg_lib.parse_list(FLAGS.pruner, str, "pruner")
    compressions = cfg_lib.parse_list(FLAGS.compression, float, "compression")
    for c in compressions:  # every value, also those an unpruned run would not use
      if not 0 <= c <= 9:  # False for nan too
        raise err(f"--compression={c} must be in [0, 9] (density = 10**-c)")
    factorizations = cfg_lib.parse_list(FLAGS.factorize, str, "factorize")
    cells = [(f, p, c) for f, p in itertools.product(factorizations, pruners)
             # Without a pruner the compression is meaningless: one dense run, not one per value.
             for c in (compressions if p != "none" else [0.0])]
  out = []
  for (factorize, pruner, c), seed in itertools.product(
      cells, range(FLAGS.seed, FLAGS.seed + FLAGS.seeds)):
    prunes = pruner != "none"  # an unpruned run neither pre-trains nor prunes
    out.append(cfg_lib.RunConfig(
        dataset=dataset, model=model, factorize=factorize, pruner=pruner, compression=c,
        factorize_with=FLAGS.factorize_with, prune_factors=FLAGS.prune_factors,
        pre_epochs=cfg_lib.default_pre_epochs(pruner, FLAGS.pre_epochs) if prunes else 0,
        post_epochs=FLAGS.post_epochs,
        prune_rounds=cfg_lib.default_rounds(pruner, FLAGS.prune_rounds) if prunes else 1,
        prune_schedule=FLAGS.prune_schedule, prune_scope=FLAGS.prune_scope,
        prune_per_class=FLAGS.prune_per_class, batch_size=FLAGS.batch_size, lr=FLAGS.lr,
        dropout=FLAGS.dropout, batch_norm=FLAGS.batch_norm, seed=seed,
        train_examples=FLAGS.train_examples).validate())
  for name, (uses, why) in _USED_BY.items():
    given = FLAGS[name].present and FLAGS[name].value is not False  # --noprune_factors is fine
    if given and not any(uses(c) for c in out):
      raise err(f"{_flag_text(name)} has no effect: {why}")
  return out


def describe(cfg: cfg_lib.RunConfig) -> str:
  """The settings that tell runs apart, on one line."""
  text = (f"{cfg.model}/{cfg.dataset} factorize={cfg.factorize} pruner={cfg.pruner} "
          f"c={cfg.compression:g} seed={cfg.seed}")
  if cfg.pruner != "none":
    text += f" pre_epochs={cfg.pre_epochs} rounds={cfg.prune_rounds}"
  return text + f" post_epochs={cfg.post_epochs}"


def dry_run(configs: list[cfg_lib.RunConfig], results: Path, done: set[str]) -> None:
  """Prints the count, then one line per run: key, finished / to do, settings."""
  finished = sum(c.key() in done for c in configs)
  try:
    _print_runs(configs, results, done, finished)
  except BrokenPipeError:  # e.g. piped into head: the reader has seen enough; exit quietly
    devnull = os.open(os.devnull, os.O_WRONLY)  # so the exit's flush of stdout cannot fail
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _print_runs(configs, results, done, finished) -> None:
  runs = f"{len(configs)} run" + ("s" if len(configs) != 1 else "")
  print(f"sweep: {runs} ({finished} finished in {results}, {len(configs) - finished} to do); "
        "dry run, nothing trained or written")
  for c in configs:
    print(f"{c.key()}  {'finished' if c.key() in done else 'to do   '}  {describe(c)}")


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
  results = Path(FLAGS.out_dir) / "results.jsonl"
  try:
    configs = configs_from_flags()
    done = results_io.finished_keys(results_io.read_rows(results))
  except (cfg_lib.ConfigError, results_io.ResultsError) as e:
    sys.exit(f"sweep.py: error: {e}")
  if FLAGS.dry_run:
    dry_run(configs, results, done)
    return

  todo = [c for c in configs if c.key() not in done]
  new = 0

  def summary() -> str:
    already = len(configs) - len(todo)
    return (f"{already + new} of {len(configs)} runs finished ({new} new, {already} already "
            f"there); results in {results}")

  logging.info("%d runs requested, %d already in %s, %d to do", len(configs),
               len(configs) - len(todo), results, len(todo))
  if not todo:
    print(f"sweep: {summary()}")
    return
  # Heavy imports after validation so a bad flag fails in a fraction of a second.
  from bfprune import checkpoint
  from bfprune import data as data_lib
  from experiments import pipeline
  try:
    pipeline.enable_compilation_cache(FLAGS.compilation_cache)
  except pipeline.CompilationCacheError as e:
    sys.exit(f"sweep.py: error: {e}")
  try:
    dataset = pipeline.load_training_data(configs[0].dataset, FLAGS.data_dir,
                                          FLAGS.train_examples, configs[0].batch_size)
    if any(c.pruner in ("snip", "grasp") for c in todo):  # before any run starts
      pipeline.check_prune_examples(dataset, FLAGS.prune_per_class,
                                    _flag_text("prune_per_class"),
                                    "lower it, or raise --train_examples")
  except data_lib.DataError as e:
    sys.exit(f"sweep.py: data error: {e}")
  except pipeline.DataSizeError as e:
    sys.exit(f"sweep.py: error: {e}")
  ckpt_root = Path(FLAGS.out_dir) / "checkpoints"
  for cfg in configs:  # a checkpoint left by a run that finished just before a kill
    if cfg.key() in done and (ckpt_root / cfg.key()).exists():
      shutil.rmtree(ckpt_root / cfg.key())
  try:
    for i, cfg in enumerate(todo, 1):
      tag = f"[{i}/{len(todo)}] {describe(cfg)}"
      logging.info("%s: start (key %s)", tag, cfg.key())
      t0 = time.perf_counter()
      row = pipeline.run_one(cfg, dataset, ckpt_dir=str(ckpt_root / cfg.key()),
                             log=lambda s: logging.info("%s: %s", tag, s),
                             history_log=lambda s: logging.info("%s: %s", tag, s))
      row["data_dir"] = str(FLAGS.data_dir or os.environ.get("BFPRUNE_DATA_DIR", "tfds"))
      results_io.append_row(results, row)
      new += 1
      shutil.rmtree(ckpt_root / cfg.key(), ignore_errors=True)
      logging.info("%s: top1=%.2f density=%.4g flop_density=%.4g collapsed=%s (%.0f s)", tag,
                   row["top1"], row["density"], row["flop_density"], row["collapsed"],
                   time.perf_counter() - t0)
  except KeyboardInterrupt:
    print(f"sweep: interrupted; {summary()}; the same command resumes", flush=True)
    sys.exit(130)
  except checkpoint.CheckpointMismatchError as e:  # its message names the folder to delete
    sys.exit(f"sweep.py: error: {e}")
  try:
    ckpt_root.rmdir()  # every run's checkpoints are gone; keep the folder if anything is left
  except OSError:
    pass
  print(f"sweep: {summary()}")


if __name__ == "__main__":
  app.run(main)
