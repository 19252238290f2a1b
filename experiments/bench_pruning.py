r"""Wall time of each pruner, split into scoring and mask selection.

  python experiments/bench_pruning.py [--models=fc,vgg16] [--pruners=rand,mag,snip,grasp,synflow]
      [--synflow_rounds=100] [--compression=2] [--selection_baseline]

FC on MNIST-shaped and VGG16 on CIFAR-10-shaped inputs, random pixels and labels (timings do not
depend on pixel values), ``--prune_examples`` examples (100 = 10 per class in the study). Each
pruner runs ``schedule.prune`` once after a warm-up call that compiles its scoring kernel; the
score function is wrapped to block on and time its result, so

  scoring   = time inside score_fn (jitted kernel, dispatch, host transfer, finiteness check)
  selection = total - scoring      (masks_from_scores: top-k on host, masks back to jax).

Each is reported as wall time and as process CPU time (all threads). On a shared machine the
wall time depends on the load; the CPU time does not, and bounds the wall time the same work
takes on an idle machine (which runs it with 1-2 busy cores here).

``--selection_baseline`` also times one global selection against a plain ``np.partition`` and a
full ``np.sort`` over all prunable weights of each model, for scale.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["fc", "vgg16"], "fc | vgg16")
flags.DEFINE_list("pruners", ["rand", "mag", "snip", "grasp", "synflow"], "Pruners to time")
flags.DEFINE_integer("synflow_rounds", 100, "Rounds for SynFlow (the others use 1)")
flags.DEFINE_float("compression", 2.0, "Target compression c (density 10**-c)")
flags.DEFINE_enum("scope", "global", ["global", "local"], "Mask scope")
flags.DEFINE_integer("prune_examples", 100, "Examples in the prune batch (SNIP, GraSP)")
flags.DEFINE_bool("selection_baseline", False, "Also time np.partition / np.sort baselines")
flags.DEFINE_string("out", "", "Optional path of a JSON file with the rows")


def _model(name: str):
  import jax
  import jax.numpy as jnp
  from bfprune.models import FC, VGG16
  model, shape = (FC(), (28, 28, 1)) if name == "fc" else (VGG16(), (32, 32, 3))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1,) + shape))["params"]
  return model, shape, params


def bench_one(model_name: str, pruner: str) -> dict:
  import jax
  import numpy as np
  from bfprune.pruning import masks as M
  from bfprune.pruning import schedule as Sch

  model, shape, params = _model(model_name)
  apply_fn = lambda p, x: model.apply({"params": p}, x, train=False)
  rng = np.random.default_rng(0)
  n = FLAGS.prune_examples
  batch = (rng.normal(size=(n,) + shape).astype(np.float32),
           rng.integers(0, 10, n).astype(np.int32))
  score_fn = Sch.make_score_fn(pruner, apply_fn, batch=batch, input_shape=shape,
                               key=jax.random.key(0))
  masks0 = M.ones_like(params)
  t0 = time.perf_counter()
  jax.block_until_ready(score_fn(params, masks0))  # compile
  warmup_s = time.perf_counter() - t0

  scoring = [0.0, 0.0]  # wall, cpu

  def timed(p, m):
    t, c = time.perf_counter(), time.process_time()
    s = jax.block_until_ready(score_fn(p, m))
    scoring[0] += time.perf_counter() - t
    scoring[1] += time.process_time() - c
    return s

  rounds = FLAGS.synflow_rounds if pruner == "synflow" else Sch.default_rounds(pruner)
  density = M.density_from_compression(FLAGS.compression)
  t0, c0 = time.perf_counter(), time.process_time()
  masks = jax.block_until_ready(
      Sch.prune(timed, params, masks0, density, rounds=rounds, scope=FLAGS.scope))
  total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
  return {"model": model_name, "pruner": pruner, "rounds": rounds,
          "weights": M.count_prunable(masks0), "kept": M.count_kept(masks),
          "load_avg_1min": round(os.getloadavg()[0], 2),
          "warmup_s": round(warmup_s, 3), "total_s": round(total, 3),
          "scoring_s": round(scoring[0], 3), "selection_s": round(total - scoring[0], 3),
          "total_cpu_s": round(total_cpu, 3), "scoring_cpu_s": round(scoring[1], 3),
          "selection_cpu_s": round(total_cpu - scoring[1], 3)}


def selection_baseline(model_name: str) -> dict:
  import jax
  import numpy as np
  from bfprune.pruning import masks as M

  _, _, params = _model(model_name)
  masks = M.ones_like(params)
  rng = np.random.default_rng(0)
  scores = M.tree_map_masked(lambda m, p: None if m is None else rng.random(p.shape), masks,
                             params)
  flat = np.concatenate([s.ravel() for s in jax.tree.leaves(scores)])
  out = {"model": model_name, "weights": flat.size}
  for d in (0.5, 0.01):
    k = M.kept_count(d, flat.size)
    t0 = time.perf_counter()
    jax.block_until_ready(M.masks_from_scores(scores, d, "global", masks))
    out[f"masks_from_scores_d{d}_s"] = round(time.perf_counter() - t0, 4)
    t0 = time.perf_counter()
    np.partition(flat, flat.size - k)
    out[f"np_partition_d{d}_s"] = round(time.perf_counter() - t0, 4)
  t0 = time.perf_counter()
  np.sort(flat)
  out["np_sort_s"] = round(time.perf_counter() - t0, 4)
  return out


def main(argv):
  del argv
  rows = []
  print(f"{'model':6} {'pruner':8} {'rounds':>6} {'warmup_s':>9} {'total_s':>8} "
        f"{'scoring_s':>9} {'selection_s':>11} | {'cpu: total':>10} {'scoring':>8} "
        f"{'selection':>9} | load")
  for model_name in FLAGS.models:
    for pruner in FLAGS.pruners:
      r = bench_one(model_name, pruner)
      rows.append(r)
      print(f"{r['model']:6} {r['pruner']:8} {r['rounds']:6d} {r['warmup_s']:9.2f} "
            f"{r['total_s']:8.2f} {r['scoring_s']:9.2f} {r['selection_s']:11.2f} | "
            f"{r['total_cpu_s']:10.2f} {r['scoring_cpu_s']:8.2f} {r['selection_cpu_s']:9.2f} | "
            f"{r['load_avg_1min']:.1f}", flush=True)
    if FLAGS.selection_baseline:
      b = selection_baseline(model_name)
      rows.append(b)
      print(json.dumps(b), flush=True)
  if FLAGS.out:
    Path(FLAGS.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
