r"""The main job: flags -> validated run configs -> runs -> ``<out_dir>/results.jsonl``.

Examples:
  python experiments/sweep.py --pruner=grasp                      # the study's MNIST setting
  python experiments/sweep.py --pruner=rand,snip --compression=0.5,1,2 --seeds=2
  python experiments/sweep.py --dataset=cifar10 --factorize=head --pruner=synflow
  python experiments/sweep.py --grid=paper_mnist --dry_run          # what it would run
  python experiments/sweep.py --grid=paper_mnist --shard=2/8        # worker 2 of 8 (0-based)

Every configuration is validated before any training starts: a flag value is used as given or
refused with one line (a flag no run would use, a flag a --grid sets, an empty or repeated list
item are refused too). Each finished run appends one row (atomically) to results.jsonl;
rerunning the same command skips runs already there. The last line says how many runs are
finished and where their results are.

Many machines, one grid: ``--shard=I/N`` runs part I (0-based) of N of the requested runs (the
runs sorted by key, every N-th from the I-th), so N workers started with the same flags and a
shared ``--out_dir`` (e.g. a job array) cover the grid once. Each run is claimed before it starts
(``experiments/claims.py``: a file ``<out_dir>/claims/<key>`` naming host and pid), so workers
started twice by mistake, or unsharded sweeps beside sharded ones, never run a configuration
twice; a claim whose owner is gone (pid not running on its host, or, from another host, no
heartbeat for ``--claim_timeout`` seconds) is taken over, and the run resumes from its
checkpoint. Results rows are appended under a file lock, so results.jsonl stays whole.

One run over many processes / hosts: ``--coordinator_address``, ``--num_processes``,
``--process_id`` (or ``--distributed=auto``) start JAX's multi-controller runtime
(``experiments/distributed.py``); the mesh spans every process's devices and process 0 alone
writes results.
"""
from __future__ import annotations

import contextlib
import itertools
import logging as std_logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import claims as claims_lib  # noqa: E402
from experiments import config as cfg_lib  # noqa: E402
from experiments import cpu_flags  # noqa: E402
from experiments import distributed  # noqa: E402
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
flags.DEFINE_integer("test_examples", 0, "Evaluate on the first n test examples only (0: all; "
                     "for quick checks)")
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
flags.DEFINE_string("shard", None, "I/N: run only part I (0-based) of N of the requested runs "
                    "(sorted by run key, every N-th from the I-th); N workers with the same "
                    "flags and --out_dir cover them once")
flags.DEFINE_float("claim_timeout", 600.0, "Seconds without a heartbeat (refreshed every "
                   "minute) after which a run claimed by a worker on another host is taken "
                   "over; on the same host a claim is taken over as soon as its process is gone")
flags.DEFINE_bool("sparse_inference", True, "Time a real sparse (BCSR) test-set pass of the "
                  "pruned model for the row's inference_seconds_sparse (--model=fc or vgg16 "
                  "with --factorize=none; a VGG16 pass takes 10-45 s on a 2-core CPU)")
cpu_flags.define_flags()
distributed.define_flags()

# Flags that only some runs use: given explicitly while no run of the command uses them, they
# would be recorded in every run's key without changing anything, so they are refused.
_USED_BY = {
    "compression": (lambda c: c.pruner != "none", "no run prunes (--pruner=none)"),
    "pre_epochs": (lambda c: c.pruner != "none", "no run prunes (--pruner=none)"),
    "prune_rounds": (lambda c: c.pruner != "none", "no run prunes (--pruner=none)"),
    "prune_scope": (lambda c: c.pruner != "none", "no run prunes (--pruner=none)"),
    "prune_schedule": (lambda c: c.pruner != "none" and c.prune_rounds > 1,
                       "every run prunes in one round (see --prune_rounds)"),
    "prune_per_class": (lambda c: c.pruner in cfg_lib.DATA_PRUNERS,
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
        train_examples=FLAGS.train_examples, test_examples=FLAGS.test_examples).validate())
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


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
  """``--shard=I/N`` -> (I, N); None when not given. ConfigError for anything else."""
  if text is None:
    return None
  parts = text.split("/")
  try:
    i, n = (int(p) for p in parts)
  except ValueError:
    i = n = None
  if len(parts) != 2 or i is None:
    raise cfg_lib.ConfigError(f"--shard={text!r} is not I/N (e.g. --shard=0/4: the first of 4 "
                              "workers)")
  if n < 1:
    raise cfg_lib.ConfigError(f"--shard={text}: N must be >= 1")
  if not 0 <= i < n:
    raise cfg_lib.ConfigError(f"--shard={text}: I must be in [0, {n - 1}] (workers are "
                              "numbered from 0)")
  return i, n


def shard_of(configs: list[cfg_lib.RunConfig], i: int, n: int) -> list[cfg_lib.RunConfig]:
  """Worker ``i`` of ``n``'s runs, in the order requested: the runs sorted by key, every n-th
  from the i-th. Deterministic, balanced (sizes differ by at most one), and the n parts of one
  list of runs are disjoint and cover it."""
  keys = sorted({c.key() for c in configs})
  mine = set(keys[i::n])
  return [c for c in configs if c.key() in mine]


def dry_run(configs: list[cfg_lib.RunConfig], results: Path, done: set[str],
            holders: Optional[dict[str, claims_lib.Holder]] = None,
            shard: Optional[tuple[int, int]] = None, total: Optional[int] = None) -> None:
  """Prints the count, then one line per run: key, finished / to do / running, settings
  (a running run, claimed by a live worker, ends with its holder in brackets)."""
  try:
    _print_runs(configs, results, done, holders or {}, shard, total)
  except BrokenPipeError:  # e.g. piped into head: the reader has seen enough; exit quietly
    devnull = os.open(os.devnull, os.O_WRONLY)  # so the exit's flush of stdout cannot fail
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _runs_text(n: int) -> str:
  return f"{n} run" + ("s" if n != 1 else "")


def _print_runs(configs, results, done, holders, shard, total) -> None:
  finished = sum(c.key() in done for c in configs)
  running = sum(c.key() in holders and c.key() not in done for c in configs)
  part = f"shard {shard[0]}/{shard[1]} of {_runs_text(total)}: " if shard else ""
  extra = f", {running} of them running in other workers" if running else ""
  print(f"sweep: {part}{_runs_text(len(configs))} ({finished} finished in {results}, "
        f"{len(configs) - finished} to do{extra}); dry run, nothing trained or written")
  for c in configs:
    key = c.key()
    if key in done:
      print(f"{key}  finished  {describe(c)}")
    elif key in holders:
      print(f"{key}  running   {describe(c)}  [claimed by {holders[key].describe()}]")
    else:
      print(f"{key}  to do     {describe(c)}")


class _QuietLibraries(std_logging.Filter):
  """Drops orbax's per-save INFO chatter so one line per epoch stays readable."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


# Why process 0 skips a run (broadcast to the other processes of a multi-process run).
_RUN, _RUNNING_ELSEWHERE, _FINISHED_ELSEWHERE = 0, 1, 2


def main(argv):
  std_logging.getLogger().addFilter(_QuietLibraries())
  for handler in std_logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  out_dir = Path(FLAGS.out_dir)
  results = out_dir / "results.jsonl"
  try:
    configs = configs_from_flags()
    shard = parse_shard(FLAGS.shard)
    if not FLAGS.claim_timeout > 0:
      raise cfg_lib.ConfigError(f"--claim_timeout={FLAGS.claim_timeout:g} must be > 0 seconds")
    dist = distributed.validate_flags()
    done = results_io.finished_keys(results_io.read_rows(results))
  except (cfg_lib.ConfigError, results_io.ResultsError) as e:
    sys.exit(f"sweep.py: error: {e}")
  mine = shard_of(configs, *shard) if shard else configs
  claims_dir = out_dir / "claims"
  if FLAGS.dry_run:
    holders = claims_lib.live_holders(claims_dir, [c.key() for c in mine], FLAGS.claim_timeout)
    dry_run(mine, results, done, holders, shard, len(configs))
    return

  # Heavy imports after validation so a bad flag fails in a fraction of a second.
  cpu_flags.apply_keep_freed_memory()  # before the first computation
  distributed.initialize(dist)
  import jax
  import numpy as np
  if FLAGS.batch_size % jax.device_count():
    sys.exit(f"sweep.py: error: --batch_size={FLAGS.batch_size} is not divisible by the "
             f"{jax.device_count()} devices the batch is split over")
  lead = distributed.is_main()  # process 0: decides, claims, writes rows, logs
  if not lead:
    logging.set_verbosity(logging.WARNING)
  # Process 0's view of what is finished is the one every process follows.
  todo_mask = distributed.from_main(
      lambda: np.array([c.key() not in done for c in mine], bool),
      like=np.zeros(len(mine), bool)) if mine else []
  todo = [c for c, t in zip(mine, todo_mask) if t]
  counts = {"new": 0, "elsewhere": 0, "running": 0, "lost": 0}
  part = f"shard {shard[0]}/{shard[1]}: " if shard else ""

  def summary() -> str:
    already = len(mine) - len(todo) + counts["elsewhere"]
    text = (f"{part}{already + counts['new']} of {len(mine)} runs finished ({counts['new']} "
            f"new, {already} already there")
    if counts["running"]:
      text += f", {counts['running']} running in other workers"
    if counts["lost"]:
      text += f", {counts['lost']} taken over by other workers"
    return text + f"); results in {results}"

  logging.info("%s%d runs requested, %d already in %s, %d to do", part, len(mine),
               len(mine) - len(todo), results, len(todo))
  if not todo:
    if lead:
      print(f"sweep: {summary()}")
    return
  from bfprune import checkpoint
  from bfprune import data as data_lib
  from experiments import pipeline
  try:
    pipeline.enable_compilation_cache(FLAGS.compilation_cache)
  except pipeline.CompilationCacheError as e:
    sys.exit(f"sweep.py: error: {e}")
  dataset = None  # loaded with the first run this worker gets (none when others have them all)

  def load() -> Any:
    try:
      ds = pipeline.load_training_data(configs[0].dataset, FLAGS.data_dir,
                                       FLAGS.train_examples, configs[0].batch_size,
                                       FLAGS.test_examples)
      if any(c.pruner in cfg_lib.DATA_PRUNERS for c in todo):  # before any run starts
        pipeline.check_prune_examples(ds, FLAGS.prune_per_class,
                                      _flag_text("prune_per_class"),
                                      "lower it, or raise --train_examples")
      return ds
    except data_lib.DataError as e:
      sys.exit(f"sweep.py: data error: {e}")
    except pipeline.DataSizeError as e:
      sys.exit(f"sweep.py: error: {e}")

  ckpt_root = out_dir / "checkpoints"
  if lead:
    for cfg in mine:  # a checkpoint left by a run that finished just before a kill
      if cfg.key() in done and (ckpt_root / cfg.key()).exists():
        shutil.rmtree(ckpt_root / cfg.key(), ignore_errors=True)
  worker = f"{socket.gethostname()} pid {os.getpid()}" + (f" shard {FLAGS.shard}" if shard
                                                          else "")
  try:
    for i, cfg in enumerate(todo, 1):
      tag = f"[{i}/{len(todo)}] {describe(cfg)}"
      key = cfg.key()
      claim: Optional[claims_lib.Claim] = None

      def decide() -> int:
        """Process 0: claim the run; then re-read the results, in case another worker
        finished it since they were read."""
        nonlocal claim
        got = claims_lib.try_claim(claims_dir, key, FLAGS.claim_timeout,
                                   heartbeat_seconds=min(60.0, FLAGS.claim_timeout / 4),
                                   note=f"{worker}: {describe(cfg)}")
        if isinstance(got, claims_lib.Holder):
          logging.info("%s: skipped, claimed by %s", tag, got.describe())
          return _RUNNING_ELSEWHERE
        if key in results_io.finished_keys(results_io.read_rows(results)):
          got.release()
          logging.info("%s: skipped, finished by another worker", tag)
          return _FINISHED_ELSEWHERE
        claim = got
        return _RUN

      verdict = int(distributed.from_main(lambda: np.int32(decide()), like=np.int32(0)))
      if verdict == _RUNNING_ELSEWHERE:
        counts["running"] += 1
        continue
      if verdict == _FINISHED_ELSEWHERE:
        counts["elsewhere"] += 1
        continue
      logging.info("%s: start (key %s)", tag, key)
      t0 = time.perf_counter()
      try:
        dataset = load() if dataset is None else dataset
        with claim.heartbeat() if claim is not None else contextlib.nullcontext():
          row = pipeline.run_one(cfg, dataset, ckpt_dir=str(ckpt_root / key),
                                 log=lambda s: logging.info("%s: %s", tag, s),
                                 history_log=lambda s: logging.info("%s: %s", tag, s),
                                 time_sparse=FLAGS.sparse_inference,
                                 small_matmul=FLAGS.small_matmul_options)
      except BaseException:
        if claim is not None:  # free for the next worker at once; its checkpoint stays
          claim.release()
        raise
      distributed.barrier(f"run {key} done")  # every process is past its last checkpoint I/O
      if not lead:
        continue
      row["data_dir"] = str(FLAGS.data_dir or os.environ.get("BFPRUNE_DATA_DIR", "tfds"))
      with claim.finishing() as held:
        if held:  # nobody can take the claim over while the row is written
          results_io.append_row(results, row)
      if not held:
        counts["lost"] += 1
        logging.warning("%s: finished, but its claim was taken over meanwhile (this worker was "
                        "silent for more than --claim_timeout=%g s?); its row is left to the "
                        "new owner", tag, FLAGS.claim_timeout)
        continue
      counts["new"] += 1
      shutil.rmtree(ckpt_root / key, ignore_errors=True)
      logging.info("%s: top1=%.2f density=%.4g flop_density=%.4g collapsed=%s (%.0f s)", tag,
                   row["top1"], row["density"], row["flop_density"], row["collapsed"],
                   time.perf_counter() - t0)
  except KeyboardInterrupt:
    if lead:
      print(f"sweep: interrupted; {summary()}; the same command resumes", flush=True)
    sys.exit(130)
  except checkpoint.CheckpointMismatchError as e:  # its message names the folder to delete
    sys.exit(f"sweep.py: error: {e}")
  finally:
    if lead:  # folders other workers may still use are kept while anything is in them
      for folder in (ckpt_root, claims_dir):
        try:
          folder.rmdir()
        except OSError:
          pass
  if lead:
    print(f"sweep: {summary()}")


if __name__ == "__main__":
  app.run(main)
