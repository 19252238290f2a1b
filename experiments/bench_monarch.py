r"""Monarch multiply vs butterfly multiply vs dense ``x @ W.T``, forward and forward+backward.

  python experiments/bench_monarch.py [--sizes=1024,4096] [--batch=256] [--repeats=21]
      [--modes=fwd,fwd_bwd] [--butterfly_impl=bfprune.structured.butterfly] [--out=f.json]

One square n x n weight per method (one stack, one block): dense W (n, n); butterfly twiddle
(1, 1, log2 n, n/2, 2, 2) (``butterfly.butterfly_multiply``); Monarch blocks (1, m, m, m) twice,
m = sqrt n (``monarch.monarch_multiply``; n must be a perfect square). Each function is jitted
and compiled before timing; forward+backward is ``jax.grad`` of sum(y^2) w.r.t. the weight and
x (what a training step needs). The methods' repeats are interleaved (one call of each per
round) so that load from other processes hits them alike; the median over rounds is reported,
with ratios to dense and multiply-adds per vector (dense n^2, butterfly 2 n log2 n, Monarch
2 n sqrt n). ``--butterfly_impl`` names any importable module with a ``butterfly_multiply`` of
the same signature (e.g. a saved copy of an older version, to compare implementations).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["1024", "4096"], "Sizes n (perfect squares and powers of 2)")
flags.DEFINE_integer("batch", 256, "Batch size")
flags.DEFINE_integer("repeats", 21, "Timed rounds (median reported)")
flags.DEFINE_list("modes", ["fwd", "fwd_bwd"], "fwd | fwd_bwd")
flags.DEFINE_string("butterfly_impl", "bfprune.structured.butterfly",
                    "Module providing butterfly_multiply(twiddle, x)")
flags.DEFINE_string("out", "", "Optional path of a JSON file with the rows")

METHODS = ("dense", "butterfly", "monarch")


def _setup(n: int, batch: int):
  """{method: (forward fn, weight, macs per vector)} and the input x (batch, n)."""
  import importlib

  import jax
  import jax.numpy as jnp
  from bfprune.structured import inits
  from bfprune.structured.monarch import monarch_multiply
  butterfly_multiply = importlib.import_module(FLAGS.butterfly_impl).butterfly_multiply

  m = math.isqrt(n)
  log_n = n.bit_length() - 1
  if m * m != n or 2 ** log_n != n:
    raise ValueError(f"--sizes: n = {n} must be both a power of 2 and a perfect square "
                     "(a power of 4)")
  k = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(k[0], (batch, n), jnp.float32)
  dense_w = jax.random.normal(k[1], (n, n), jnp.float32) / math.sqrt(n)
  twiddle = inits.random(k[2], (1, 1, log_n, n // 2, 2, 2), jnp.float32)
  blocks = (jax.random.normal(k[3], (1, m, m, m), jnp.float32) / math.sqrt(m),
            jax.random.normal(k[4], (1, m, m, m), jnp.float32) / math.sqrt(m))
  return x, {
      "dense": (lambda w, v: v @ w.T, dense_w, n * n),
      "butterfly": (lambda w, v: butterfly_multiply(w, v), twiddle, 2 * n * log_n),
      "monarch": (lambda w, v: monarch_multiply(w[0], w[1], v), blocks, 2 * n * m),
  }


def bench_size(n: int, batch: int, repeats: int, modes: list[str]) -> list[dict]:
  import jax
  import jax.numpy as jnp

  x, methods = _setup(n, batch)
  fns = {}
  for name, (f, w, _) in methods.items():
    if "fwd" in modes:
      fns[(name, "fwd")] = (jax.jit(f), w)
    if "fwd_bwd" in modes:
      fns[(name, "fwd_bwd")] = (
          jax.jit(jax.grad(lambda w_, v, f=f: jnp.sum(f(w_, v) ** 2), argnums=(0, 1))), w)
  for fn, w in fns.values():  # compile and warm up
    jax.block_until_ready(fn(w, x))
    jax.block_until_ready(fn(w, x))
  times = {key: [] for key in fns}
  for _ in range(repeats):
    for key, (fn, w) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(w, x))
      times[key].append(time.perf_counter() - t0)
  med = {key: statistics.median(t) for key, t in times.items()}
  nan = float("nan")
  rows = []
  for name, (_, _, macs) in methods.items():
    row = {"n": n, "batch": batch, "method": name, "macs_per_vector": macs,
           "butterfly_impl": FLAGS.butterfly_impl}
    for mode in ("fwd", "fwd_bwd"):
      t = med.get((name, mode), nan)
      row[f"{mode}_ms"] = 1e3 * t
      row[f"{mode}_vs_dense"] = t / med.get(("dense", mode), nan)
    row["fwd_gmacs_per_s"] = macs * batch / med.get((name, "fwd"), nan) / 1e9
    rows.append(row)
  return rows


def main(argv):
  del argv
  import jax
  bad = set(FLAGS.modes) - {"fwd", "fwd_bwd"}
  if bad or not FLAGS.modes:
    raise app.UsageError(f"--modes must be a non-empty subset of fwd,fwd_bwd, got {FLAGS.modes}")
  rows = []
  print(f"backend={jax.default_backend()} devices={jax.devices()} batch={FLAGS.batch} "
        f"repeats={FLAGS.repeats} (median) butterfly_impl={FLAGS.butterfly_impl}")
  print(f"{'n':>5} {'method':>9} {'MACs/vec':>9} {'fwd ms':>8} {'f+b ms':>8} {'fwd/dense':>9} "
        f"{'f+b/dense':>9} {'GMAC/s':>7}")
  for n in (int(s) for s in FLAGS.sizes):
    for r in bench_size(n, FLAGS.batch, FLAGS.repeats, FLAGS.modes):
      rows.append(r)
      print(f"{r['n']:>5} {r['method']:>9} {r['macs_per_vector']:>9} {r['fwd_ms']:>8.3f} "
            f"{r['fwd_bwd_ms']:>8.3f} {r['fwd_vs_dense']:>9.3f} {r['fwd_bwd_vs_dense']:>9.3f} "
            f"{r['fwd_gmacs_per_s']:>7.2f}")
    by = {r["method"]: r for r in rows if r["n"] == n}
    print(f"{n:>5} monarch/butterfly: fwd {by['monarch']['fwd_ms'] / by['butterfly']['fwd_ms']:.3f}"
          f"  fwd+bwd {by['monarch']['fwd_bwd_ms'] / by['butterfly']['fwd_bwd_ms']:.3f}")
  if FLAGS.out:
    Path(FLAGS.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  app.run(main)
