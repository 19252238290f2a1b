r"""Sparse vs masked-dense test-set inference, FC (MNIST-shaped) and VGG16 (CIFAR-shaped).

  python experiments/bench_sparse.py [--models=fc,vgg16] [--compressions=0.5,1,2]
      [--sweep=0,0.25,...] [--fc_examples=10000] [--vgg_examples=1017] [--repeats=5] [--out=f.json]

For each model, one run: random pixels (timing only), one set of random weights, and for each
density 10^-c (c in --compressions plus the finer --sweep) a mask (--mask=random: uniform random
global top-k, i.e. every layer at about the same density; magnitude: global |w| top-k), then the
test-set forward pass, jitted and warmed up on one batch, timed as the median of --repeats full
passes (the methods' passes interleaved per round, so that load from other processes hits them
alike). Methods:

* ``dense``: ``model.apply`` on the masked params (what the sweep times; costs the same at any
  density);
* ``dense_fm``: bfprune.sparse's feature-major forward on the dense masked kernels (same layout
  and im2col as the sparse one, dense matmuls): separates the layout from the sparsity;
* ``bcsr`` / ``bcoo``: bfprune.sparse's forward on ``sparsify(params, masks, fmt)``.

For VGG16 the dense baselines do not depend on the density and one pass takes minutes on a busy
2-core CPU, so they are timed once (at the first compression), unless --vgg_dense_each.
The crossover is the largest density at which the sparse forward is faster than the baseline,
interpolated log-linearly in (density, time ratio) between the sweep's neighbouring points;
densities at which a layer keeps no weight (the net is disconnected and XLA folds the forward
into a constant) are marked and left out.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined by the script's main only, so that importing this module (e.g. to test
  ``crossover``) adds no flags that clash with other scripts' (report.py defines --out too)."""
  flags.DEFINE_list("models", ["fc", "vgg16"], "Models to benchmark: fc, vgg16")
  flags.DEFINE_list("compressions", ["0.5", "1", "2"], "Main compressions c (density 10^-c)")
  flags.DEFINE_list("sweep", ["0", "0.25", "0.75", "1.25", "1.5", "1.75", "2.5", "3"],
                    "Extra compressions for the crossover sweep")
  flags.DEFINE_list("vgg_sweep", ["0.25", "1.5", "2.5", "3"],
                    "Extra compressions for VGG16 (its passes are slow)")
  flags.DEFINE_enum("mask", "random", ["random", "magnitude"], "How masks are drawn")
  flags.DEFINE_integer("fc_examples", 10000, "FC test-set size (MNIST test set: 10000)")
  flags.DEFINE_integer("fc_batch", 10000, "FC batch size (whole set by default)")
  flags.DEFINE_integer("vgg_examples", 1017, "VGG16 test-set size (the CIFAR-10 subset: 1017)")
  flags.DEFINE_integer("vgg_batch", 256, "VGG16 batch size (last batch zero-padded)")
  flags.DEFINE_list("fc_formats", ["bcsr", "bcoo"], "Sparse formats timed for FC")
  flags.DEFINE_list("vgg_formats", ["bcsr"], "Sparse formats timed for VGG16 (bcoo is far slower)")
  flags.DEFINE_bool("vgg_dense_each", False, "Time VGG16's dense baselines at every density")
  flags.DEFINE_integer("repeats", 5, "Timed passes per method (median reported)")
  flags.DEFINE_integer("vgg_repeats", 3, "Timed passes per method for VGG16")
  flags.DEFINE_integer("seed", 0, "Seed of weights, masks and pixels")
  flags.DEFINE_string("out", "", "Optional path of a JSON file with the rows")


def _random_params(model, x, seed: int):
  """Params drawn with NumPy (kernels N(0, 2/fan_in), biases 0): no jax.random compile."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bfprune.pruning.masks import path_names

  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    if path_names(path)[-1] == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.standard_normal(leaf.shape) * math.sqrt(2.0 / fan_in), jnp.float32)
    return jnp.zeros(leaf.shape, jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _masks(params, density: float, kind: str, seed: int):
  """Global top-k masks of random or magnitude scores (exactly round(density * N) kept)."""
  import jax
  import numpy as np
  from bfprune.pruning import masks as M

  rng = np.random.default_rng(seed)
  def score(path, v):
    if M.path_names(path)[-1] != "kernel":
      return None
    return rng.random(v.shape) if kind == "random" else np.abs(np.asarray(v))
  return M.masks_from_scores(jax.tree_util.tree_map_with_path(score, params), density)


def _batches(n: int, batch: int, shape: tuple[int, ...], seed: int):
  """Random pixels in [0, 1), n examples as ceil(n / batch) device arrays (last zero-padded)."""
  import jax.numpy as jnp
  import numpy as np

  x = np.random.default_rng(seed + 1).random((n,) + shape, np.float32)
  nb = -(-n // batch)
  x = np.concatenate([x, np.zeros((nb * batch - n,) + shape, np.float32)])
  return [jnp.asarray(x[i * batch:(i + 1) * batch]) for i in range(nb)]


def _time_passes(fns: dict[str, tuple[Callable, object]], batches, repeats: int) -> dict:
  """Median seconds of a full pass over ``batches`` per method, rounds interleaved."""
  import jax

  for fn, p in fns.values():  # compile and warm up on one batch (all batches share a shape)
    jax.block_until_ready(fn(p, batches[0]))
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, (fn, p) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready([fn(p, b) for b in batches])
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(t) for k, t in times.items()}


def crossover(rows: list[dict], sparse: str, baseline: str) -> Optional[float]:
  """Largest density where ``sparse`` beats ``baseline`` (log-linear interpolation).

  Returns the highest measured density if sparse already wins there, None if it never wins.
  Rows with an empty layer (a disconnected net) are left out.
  """
  pts = sorted(((r["density"], math.log(r[sparse] / r[baseline])) for r in rows
                if r.get(sparse) and r.get(baseline) and not r.get("empty_layers")),
               reverse=True)  # high density first
  for i, (d, lr) in enumerate(pts):
    if lr < 0:
      if i == 0:
        return d
      d_hi, lr_hi = pts[i - 1]  # loses at d_hi, wins at d: interpolate the zero crossing
      t = lr_hi / (lr_hi - lr)
      return math.exp(math.log(d_hi) + t * (math.log(d) - math.log(d_hi)))
  return None


def bench_model(name: str) -> list[dict]:
  import jax
  import numpy as np
  from bfprune import models
  from bfprune import sparse as sp
  from bfprune.pruning import masks as M

  if name == "fc":
    model, shape = models.FC(), (28, 28, 1)
    n, batch, repeats, formats = FLAGS.fc_examples, FLAGS.fc_batch, FLAGS.repeats, FLAGS.fc_formats
    sweep, fwd_sparse, dense_each = FLAGS.sweep, sp.fc_apply_sparse, True
  elif name == "vgg16":
    model, shape = models.VGG16(), (32, 32, 3)
    n, batch, repeats = FLAGS.vgg_examples, FLAGS.vgg_batch, FLAGS.vgg_repeats
    formats, sweep, fwd_sparse = FLAGS.vgg_formats, FLAGS.vgg_sweep, sp.vgg16_apply_sparse
    dense_each = FLAGS.vgg_dense_each
  else:
    raise ValueError(f"--models: unknown model {name!r}; expected fc or vgg16")
  bad = [f for f in formats if f not in sp.FORMATS]
  if bad:
    raise ValueError(f"unknown sparse formats {bad}; expected some of {sp.FORMATS}")
  batches = _batches(n, batch, shape, FLAGS.seed)
  params = _random_params(model, batches[0][:1], FLAGS.seed)
  fwd_dense = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  fwd_fm = jax.jit(fwd_sparse)
  comps = sorted({float(c) for c in [*FLAGS.compressions, *sweep]})
  rows, dense_times = [], None
  for c in comps:
    density = M.density_from_compression(c)
    masks = _masks(params, density, FLAGS.mask, FLAGS.seed)
    masked = M.apply_masks(params, masks)
    fns = {}
    if dense_each or dense_times is None:
      fns.update({"dense": (fwd_dense, masked), "dense_fm": (fwd_fm, masked)})
    t0 = time.perf_counter()
    for fmt in formats:
      fns[fmt] = (jax.jit(fwd_sparse), sp.sparsify(params, masks, fmt))
    sparsify_s = (time.perf_counter() - t0) / max(len(formats), 1)
    times = _time_passes(fns, batches, repeats)
    if "dense" in times:
      dense_times = {k: times[k] for k in ("dense", "dense_fm")}
      measured = True
    else:
      times.update(dense_times)
      measured = False
    # A layer with no kept weight disconnects the net: XLA then folds the whole forward into
    # a constant, so such rows are marked and left out of the crossover.
    empty = [M.path_names(p)[0] for p, m in jax.tree_util.tree_leaves_with_path(masks)
             if not np.any(np.asarray(m))]
    row = {"model": name, "compression": c, "density": density, "kept": M.count_kept(masks),
           "empty_layers": empty,
           "examples": n, "batch": batch, "mask": FLAGS.mask, "repeats": repeats,
           "dense_measured_here": measured, "sparsify_seconds": sparsify_s, **times}
    rows.append(row)
    print(_fmt_row(row, formats), flush=True)
  for fmt in formats:
    for base in ("dense", "dense_fm"):
      d = crossover(rows, fmt, base)
      where = ("never, in the range timed" if d is None else
               f"density <= {d:.3g} (compression >= {-math.log10(d):.2f})")
      print(f"{name}: {fmt} faster than {base}: {where}")
      for r in rows:
        r[f"crossover_{fmt}_vs_{base}"] = d
  return rows


def _fmt_row(r: dict, formats) -> str:
  s = (f"{r['model']:>6} c={r['compression']:<5g} d={r['density']:<8.4g} kept={r['kept']:<9d}"
       f" dense={r['dense']:8.3f}s{'' if r['dense_measured_here'] else '*'}"
       f" dense_fm={r['dense_fm']:8.3f}s")
  for fmt in formats:
    s += (f" {fmt}={r[fmt]:8.3f}s ({r['dense'] / r[fmt]:6.2f}x vs dense,"
          f" {r['dense_fm'] / r[fmt]:6.2f}x vs dense_fm)")
  if r["empty_layers"]:
    s += f"  [empty layers {','.join(r['empty_layers'])}: net disconnected, not a timing]"
  return s


def main(argv):
  del argv
  import jax
  print(f"backend={jax.default_backend()} devices={jax.devices()} cpus={os.cpu_count()} "
        f"load={os.getloadavg()[0]:.1f} mask={FLAGS.mask} (seconds per test-set pass, median; "
        f"* = dense baseline timed at the first density only)", flush=True)
  rows = []
  for name in FLAGS.models:
    rows.extend(bench_model(name))
  print(f"load at end={os.getloadavg()[0]:.1f}")
  if FLAGS.out:
    Path(FLAGS.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  define_flags()
  app.run(main)
