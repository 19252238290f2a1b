r"""First-epoch time of same-shaped runs with and without JAX's persistent compilation cache.

Runs one small ``experiments/sweep.py`` (two runs of the same shapes, e.g. SNIP at c = 1, 2)
three times, each in a fresh process and output folder:

* ``none``: ``--compilation_cache=none``: every run compiles its train / eval / score steps;
* ``cold``: an empty cache folder: run 1 compiles and writes, run 2 should read;
* ``warm``: the same folder again (a later sweep): both runs should read.

Prints, per mode, each run's first-epoch seconds (``history[0].epoch_seconds``: the jitted train
step's compile, or cache read, plus one epoch), the sweep's wall seconds and the cache's entry
count, then same-run ratios. Usage:

  python experiments/bench_compile_cache.py --pruner=snip --compression=1,2 --post_epochs=1 \
      --train_examples=4096 [--dataset=cifar10] [--out=/tmp/bench_cache]
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "experiments" / "sweep.py"

flags.DEFINE_string("dataset", "mnist", "mnist | cifar10")
flags.DEFINE_string("pruner", "snip", "sweep.py --pruner")
flags.DEFINE_string("compression", "1,2", "sweep.py --compression: same shapes, one run each")
flags.DEFINE_integer("post_epochs", 1, "sweep.py --post_epochs")
flags.DEFINE_integer("train_examples", 4096, "sweep.py --train_examples")
flags.DEFINE_string("data_dir", None, "sweep.py --data_dir (default: $BFPRUNE_DATA_DIR)")
flags.DEFINE_string("out", "/tmp/bfprune_bench_compile_cache", "Scratch folder (emptied first)")
FLAGS = flags.FLAGS


def sweep(out_dir: Path, cache: str) -> tuple[list[float], float]:
  """Runs the sweep; returns each run's first-epoch seconds and the wall seconds."""
  args = [sys.executable, str(SWEEP), f"--dataset={FLAGS.dataset}", f"--pruner={FLAGS.pruner}",
          f"--compression={FLAGS.compression}", f"--post_epochs={FLAGS.post_epochs}",
          f"--train_examples={FLAGS.train_examples}", f"--out_dir={out_dir}",
          f"--compilation_cache={cache}"]
  if FLAGS.data_dir:
    args.append(f"--data_dir={FLAGS.data_dir}")
  t0 = time.perf_counter()
  proc = subprocess.run(args, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode:
    sys.exit(f"bench_compile_cache.py: sweep failed:\n{proc.stderr[-3000:]}")
  rows = [json.loads(l) for l in (out_dir / "results.jsonl").read_text().splitlines() if l]
  if len(rows) < 2:
    sys.exit(f"bench_compile_cache.py: the sweep made {len(rows)} run(s); give --compression at "
             "least two values (same shapes, e.g. 1,2)")
  return [r["history"][0]["epoch_seconds"] for r in rows], wall


def main(argv):
  del argv
  out = Path(FLAGS.out)
  shutil.rmtree(out, ignore_errors=True)
  cache = out / "cache"
  results = {}
  for mode in ("none", "cold", "warm"):
    firsts, wall = sweep(out / mode, "none" if mode == "none" else str(cache))
    entries = len(os.listdir(cache)) if cache.exists() else 0
    results[mode] = firsts
    print(f"{mode:5s} first-epoch s per run: {', '.join(f'{s:.2f}' for s in firsts)}; "
          f"sweep wall {wall:.1f} s; cache entries {entries}", flush=True)
  none, cold, warm = results["none"], results["cold"], results["warm"]
  print(f"run 2 / run 1 first epoch: none {none[1] / none[0]:.2f}, cold {cold[1] / cold[0]:.2f}, "
        f"warm {warm[1] / warm[0]:.2f}")
  print(f"run 2 first epoch, cold cache / no cache: {cold[1] / none[1]:.2f}; "
        f"run 1, warm / none: {warm[0] / none[0]:.2f}")


if __name__ == "__main__":
  app.run(main)
