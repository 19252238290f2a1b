"""Benchmark: fast butterfly multiply vs dense ``x @ W`` on this machine.

For each n: forward and forward+backward (gradient w.r.t. x AND the weights) wall time,
median of --repeats calls after warm-up (``block_until_ready``), of
  * the butterfly ``butterfly_multiply`` (nstacks=1, nblocks=1, increasing stride), once per
    implementation in --impl ("cpu": the CPU-tuned passes, "generic": the portable passes
    used on GPU / TPU, "auto": what this platform picks),
  * dense ``x @ W`` with W (n, n),
  * optionally (--reference) the one-einsum-per-factor reference with plain autodiff,
their ratios, and the butterfly's effective memory bandwidth next to a plain copy bandwidth
measured in the same run. Ratios from one run are what counts (other jobs share the CPU).

Bytes counted for the butterfly (itemsize 4 for float32), with P = radix passes per block:
  forward   = 2 (P + 2) * batch * n * itemsize
              (each pass reads its input and writes its output; plus the transposes into
              and out of the feature-major layout, each a read and a write)
  fwd + bwd = forward + (4 P + 4) * batch * n * itemsize
              (per pass backward: the transposed pass reads g and writes the input
              cotangent, the pass-matrix gradient reads g and the saved input; plus the two
              transposes of the cotangents)
The tiny pass matrices (n * radix entries per pass) are not counted. Copy bandwidth is
(read + write) / time of ``a * 2`` (input donated, so no fresh pages) on an array of one
activation (batch x n float32, per n) and on a --copy_mib MiB array (beyond the L3 cache).
Timing: --rounds rounds over all cases; per round and case one untimed call, then a run of
timed calls (steady state, caches as in a training loop that repeats the same step).

The byte counts follow the CPU path's passes; for the other implementations they are the
same traffic model (what the passes must move), not what they actually move.

Usage: python experiments/bench_butterfly.py --batch=256 --sizes=256,1024,4096,8192 \
         --impl=cpu,generic
"""
from __future__ import annotations

from pathlib import Path
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bfprune.structured import butterfly as bf  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 256, "Rows of x.")
flags.DEFINE_list("sizes", ["256", "1024", "4096", "8192"], "Butterfly sizes n (powers of 2).")
flags.DEFINE_integer("repeats", 15, "Timed calls per measurement (median reported).")
flags.DEFINE_integer("warmup", 3, "Untimed calls after compilation.")
flags.DEFINE_integer("rounds", 3, "Rounds over all cases (repeats are split among them).")
flags.DEFINE_bool("reference", False, "Also time the einsum-per-factor reference.")
flags.DEFINE_integer("copy_mib", 64, "Size of the array for the copy-bandwidth baseline.")
flags.DEFINE_list("impl", ["cpu", "generic"],
                  f"butterfly_multiply implementations to time, from {', '.join(bf.IMPLS)}.")


def _median_ms(cases: dict) -> dict:
  """cases: name -> (fn, args). Compiles and warms up each, then times them in --rounds
  rounds; in each round every case gets one untimed call and then its share of the
  --repeats timed calls in a row (steady state, as in a training loop), so that load from
  other jobs that comes and goes hits all cases alike. Returns median ms per case."""
  for fn, args in cases.values():
    for _ in range(1 + FLAGS.warmup):
      jax.block_until_ready(fn(*args))
  times = {name: [] for name in cases}
  per_round = max(1, -(-FLAGS.repeats // FLAGS.rounds))
  for _ in range(FLAGS.rounds):
    for name, (fn, args) in cases.items():
      jax.block_until_ready(fn(*args))
      for _ in range(per_round):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def _fwd_bwd(fn):
  """jit of (w, x) -> gradients w.r.t. both of sum(fn(w, x) * ct)."""
  def loss(w, x, ct):
    return jnp.sum(fn(w, x) * ct)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _copy_gbs(nbytes: int) -> float:
  """(read + write) / time of ``a * 2`` on a float32 array of nbytes, in GB/s. The input is
  donated and the output fed back, so no call touches freshly mapped memory (page faults
  would otherwise dominate above glibc's 32 MiB mmap threshold)."""
  f = jax.jit(lambda v: v * 2, donate_argnums=0)
  a = jnp.ones((nbytes // 4,), jnp.float32)
  for _ in range(1 + FLAGS.warmup):
    a = jax.block_until_ready(f(a))
  times = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    a = jax.block_until_ready(f(a))
    times.append(time.perf_counter() - t0)
  return 2 * nbytes / float(np.median(times)) / 1e9


def main(argv):
  del argv
  for impl in FLAGS.impl:
    if impl not in bf.IMPLS:
      sys.exit(f"bench_butterfly.py: error: --impl item {impl!r} is not one of "
               f"{', '.join(bf.IMPLS)}")
  b = FLAGS.batch
  key = jax.random.PRNGKey(0)
  rows = []
  copy_before = _copy_gbs(FLAGS.copy_mib * 2 ** 20)
  for n in (int(s) for s in FLAGS.sizes):
    log_n = n.bit_length() - 1
    k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, n), 4)
    x = jax.random.normal(k1, (b, n), jnp.float32)
    ct = jax.random.normal(k2, (b, n), jnp.float32)
    tw = jax.random.normal(k3, (1, 1, log_n, n // 2, 2, 2), jnp.float32) / np.sqrt(2)
    w = jax.random.normal(k4, (n, n), jnp.float32) / np.sqrt(n)

    dense = lambda w_, x_: x_ @ w_
    cases = {
        "dense": (jax.jit(dense), (w, x)),
        "dense_fb": (_fwd_bwd(dense), (w, x, ct)),
    }
    for impl in FLAGS.impl:
      bfly = lambda t_, x_, impl=impl: bf.butterfly_multiply(t_, x_, True, impl)
      cases[f"bf/{impl}"] = (jax.jit(bfly), (tw, x))
      cases[f"bf_fb/{impl}"] = (_fwd_bwd(bfly), (tw, x, ct))
    if FLAGS.reference:
      ref = lambda t_, x_: bf.butterfly_multiply_reference(t_, x_, True)
      cases["ref"] = (jax.jit(ref), (tw, x))
      cases["ref_fb"] = (_fwd_bwd(ref), (tw, x, ct))
    t = _median_ms(cases)
    npass = len(bf.radix_plan(log_n))
    unit = b * n * 4
    t["copy"] = _copy_gbs(unit)
    for impl in FLAGS.impl:
      t[f"gbs/{impl}"] = 2 * (npass + 2) * unit / (t[f"bf/{impl}"] * 1e-3) / 1e9
      t[f"gbs_fb/{impl}"] = ((2 * (npass + 2) + 4 * npass + 4) * unit
                             / (t[f"bf_fb/{impl}"] * 1e-3) / 1e9)
    t["n"], t["plan"] = n, "+".join(str(m) for m in bf.radix_plan(log_n))
    rows.append(t)
    print(f"n={n} done", flush=True)
  copy_after = _copy_gbs(FLAGS.copy_mib * 2 ** 20)

  print(f"\nbatch {b}, float32, {jax.devices()[0].device_kind}, median of {FLAGS.repeats} "
        f"(ms). Copy bandwidth ({FLAGS.copy_mib} MiB, read + write): "
        f"{copy_before:.1f} GB/s before, {copy_after:.1f} GB/s after.")
  head = (f"{'n':>6} {'radix':>9} {'impl':>7} | {'dense':>8} {'bfly':>7} {'x':>6} | {'dense f+b':>9} "
          f"{'bfly f+b':>8} {'x':>6} | {'fwd GB/s':>8} {'f+b GB/s':>8} {'copy GB/s':>9}")
  if FLAGS.reference:
    head += f" | {'ref':>8} {'ref f+b':>8}"
  print(head)
  print("-" * len(head))
  for t in rows:
    for impl in FLAGS.impl:
      fw, fb = t[f"bf/{impl}"], t[f"bf_fb/{impl}"]
      line = (f"{t['n']:>6} {t['plan']:>9} {impl:>7} | {t['dense']:>8.2f} {fw:>7.2f} "
              f"{t['dense'] / fw:>6.1f} | {t['dense_fb']:>9.2f} {fb:>8.2f} "
              f"{t['dense_fb'] / fb:>6.1f} | {t[f'gbs/{impl}']:>8.1f} "
              f"{t[f'gbs_fb/{impl}']:>8.1f} {t['copy']:>9.1f}")
      if FLAGS.reference:
        line += f" | {t['ref']:>8.2f} {t['ref_fb']:>8.2f}"
      print(line)
  print("x = dense time / butterfly time. radix: factors per pass (log2 of the radix). "
        "copy GB/s: copy of one batch x n float32 activation, same run.")


if __name__ == "__main__":
  app.run(main)
