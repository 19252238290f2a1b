r"""Inference time of VGG16 on CIFAR-10-shaped data: dense vs butterfly head vs every layer structured.

  python experiments/bench_models.py [--images=1017] [--batch_size=256] [--repeats=3] \
      [--variants=dense,head,all,dense_xla] [--per_layer]

The three architectures of the study's Table 2, timed in one process (masks do not change the
time of a masked-dense pass, so untrained weights give the same figures as trained ones).
Variants (same code path as sweep.py's ``inference_seconds``: ``Trainer.evaluate`` over the
images padded to whole batches, jitted and warmed up, median of ``--repeats``):
* ``dense``: the library's VGG16 (``models.conv3x3``, ``impl="auto"``: on a CPU the
  ``bfprune.conv`` formulations per spatial size, Winograd / im2col);
* ``head``: the ``--factorize=head`` model (the same convs, a butterfly classification head);
* ``all``: the ``--factorize=all`` model (every conv a KOPS2D, dense layers butterfly);
* ``dense_xla``: the dense VGG16 with XLA's convolution everywhere (``impl="generic"``, same
  function, same params), i.e. a plain ``nn.Conv`` VGG16: much slower than im2col at 2x2 on CPU,
  which flatters the ratio.

Prints wall time and process CPU time (CPU time is steadier on a shared machine) and the
ratios ``head / dense`` (the study: ~1.0x) and ``all / dense`` (the study measured 45x, GPU).
``--per_layer`` adds a table of each conv layer alone (one batch): XLA conv, im2col conv and
KOPS2D.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 1017, "Number of CIFAR-shaped random test images "
                     "(10000 = the CIFAR-10 test set)")
flags.DEFINE_integer("batch_size", 256, "Inference batch size")
flags.DEFINE_integer("repeats", 3, "Timed passes over the images (median reported)")
flags.DEFINE_string("variants", "dense,head,all,dense_xla", "Comma list of dense | head | "
                    "all | dense_xla")
flags.DEFINE_string("factorize_with", "butterfly", "Structured dense layer of the 'all' model")
flags.DEFINE_bool("per_layer", False, "Also time every conv layer alone (one batch)")

VARIANTS = ("dense", "head", "all", "dense_xla")


def xla_conv() -> Callable:
  """Constructor: the VGG16 conv computed by XLA's convolution at every spatial size."""
  import functools
  from bfprune import models
  return functools.partial(models.conv3x3, impl="generic")


def im2col_conv() -> Callable:
  """Constructor: a 3x3 conv (kernel and bias) computed by im2col at every spatial size."""
  import flax.linen as nn
  from bfprune import conv as conv_lib
  from bfprune import models

  class Im2colConv(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
      k = self.param("kernel", models.kaiming_normal, (3, 3, x.shape[-1], self.features))
      b = self.param("bias", nn.initializers.zeros, (self.features,))
      return conv_lib.im2col_conv(x, k) + b

  return Im2colConv


def build(variant: str, factorize_with: str):
  from bfprune import models
  from experiments.config import RunConfig
  from experiments.pipeline import build_model
  if variant == "dense_xla":
    return models.VGG16(conv=xla_conv())
  factorize = {"dense": "none", "head": "head", "all": "all"}[variant]
  cfg = RunConfig(dataset="cifar10", model="vgg16", factorize=factorize,
                  factorize_with=factorize_with).validate()
  return build_model(cfg)


def _timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
  """Median (wall s, process CPU s) of ``fn`` after one warm-up call."""
  import jax
  jax.block_until_ready(fn())
  walls, cpus = [], []
  for _ in range(repeats):
    w0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    walls.append(time.perf_counter() - w0)
    cpus.append(time.process_time() - c0)
  return statistics.median(walls), statistics.median(cpus)


def bench_model(variant: str, images: int, batch: int, repeats: int, factorize_with: str,
                params_cache: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bfprune import train
  from bfprune.pruning import masks as masks_lib

  model = build(variant, factorize_with)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(images, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, images).astype(np.int32)
  t0 = time.perf_counter()
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  init_s = time.perf_counter() - t0
  if variant == "dense_xla" and "dense" in params_cache:
    variables = params_cache["dense"]   # same params: the two dense variants must agree
  params_cache[variant] = variables
  masks = masks_lib.ones_like(variables["params"])
  tx = train.adam()
  trainer = train.Trainer(model, tx, train.make_mesh())
  state = trainer.put(train.init_state(variables, masks, tx))
  eval_data = trainer.put(train.make_eval_data(x, y, batch))
  t0 = time.perf_counter()
  trainer.evaluate(state, eval_data)   # compiles; returns host floats (synchronised)
  compile_s = time.perf_counter() - t0
  wall, cpu = _timed(lambda: trainer.evaluate(state, eval_data), repeats)
  logits = jax.jit(lambda p, xb: model.apply({"params": p}, xb))(state.params, x[:8])
  return {"variant": variant, "images": images, "padded": int(np.prod(eval_data.y.shape)),
          "wall_s": wall, "cpu_s": cpu, "first_pass_s": compile_s, "init_s": init_s,
          "logits": np.asarray(logits)}


def per_layer(batch: int, repeats: int) -> None:
  import flax.linen as nn
  import jax
  from bfprune import models
  from bfprune.structured.layers import KOPS2D

  shapes = models.vgg16_conv_shapes()
  makers = {"xla_conv": xla_conv(), "im2col": im2col_conv(), "kops2d": KOPS2D}
  print(f"\nper layer, batch {batch}: median wall ms / CPU ms; ratios of CPU time "
        "(best = the faster dense conv)")
  print(f"{'layer':<8}{'HxW':>6}{'Cin':>5}{'Cout':>6}" +
        "".join(f"{k:>22}" for k in makers) + f"{'kops/xla':>10}{'kops/best':>11}")
  x_key = jax.random.key(1)
  for i, (hw, cin, cout) in enumerate(shapes):
    x = jax.random.normal(x_key, (batch, hw, hw, cin))
    res = {}
    for name, make in makers.items():
      m: nn.Module = make(cout)
      p = m.init(jax.random.key(0), x[:1])
      f = jax.jit(m.apply)
      res[name] = _timed(lambda: f(p, x), repeats)
    print(f"conv{i + 1:<4}{hw:>4}^2{cin:>5}{cout:>6}" +
          "".join(f"{1e3 * w:>11.1f}/{1e3 * c:<10.1f}" for w, c in res.values()) +
          f"{res['kops2d'][1] / res['xla_conv'][1]:>10.2f}"
          f"{res['kops2d'][1] / min(res['xla_conv'][1], res['im2col'][1]):>11.2f}", flush=True)


def main(argv):
  del argv
  import jax
  import numpy as np
  variants = [v.strip() for v in FLAGS.variants.split(",") if v.strip()]
  for v in variants:
    if v not in VARIANTS:
      sys.exit(f"bench_models.py: error: --variants item {v!r} is not one of {VARIANTS}")
  if FLAGS.images < 1 or FLAGS.batch_size < 1 or FLAGS.repeats < 1:
    sys.exit("bench_models.py: error: --images, --batch_size and --repeats must be >= 1")
  print(f"jax {jax.__version__}, devices {jax.devices()}; VGG16 inference on "
        f"{FLAGS.images} CIFAR-shaped images, batch {FLAGS.batch_size}, median of "
        f"{FLAGS.repeats}")
  print(f"{'variant':<14}{'images':>8}{'wall s':>10}{'CPU s':>10}{'images/s':>10}"
        f"{'1st pass s':>12}")
  results, cache = {}, {}
  for v in variants:
    r = bench_model(v, FLAGS.images, FLAGS.batch_size, FLAGS.repeats, FLAGS.factorize_with,
                    cache)
    results[v] = r
    print(f"{v:<14}{r['images']:>8}{r['wall_s']:>10.2f}{r['cpu_s']:>10.2f}"
          f"{r['images'] / r['wall_s']:>10.0f}{r['first_pass_s']:>12.1f}", flush=True)
  if "dense" in results and "dense_xla" in results:
    diff = np.abs(results["dense"]["logits"] - results["dense_xla"]["logits"]).max()
    print(f"dense vs dense_xla: same function and params, max |logit diff| {diff:.2e}")
  study = {"head": "~1.0x", "all": "45x"}   # the study's Table 2 (GPU): 1.6-1.7 s vs 75-77 s
  for v in ("head", "all"):
    for base in ("dense", "dense_xla"):
      if v in results and base in results:
        a, b = results[v], results[base]
        print(f"ratio {v} / {base}: wall {a['wall_s'] / b['wall_s']:.2f}x, "
              f"CPU {a['cpu_s'] / b['cpu_s']:.2f}x   (study: {study[v]})")
  if FLAGS.per_layer:
    per_layer(FLAGS.batch_size, FLAGS.repeats)


if __name__ == "__main__":
  app.run(main)
