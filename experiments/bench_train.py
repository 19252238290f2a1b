r"""Examples/s of the jitted train step: FC on MNIST-shaped and VGG16 on CIFAR-10-shaped data.

  python experiments/bench_train.py [--models=fc,vgg16] [--steps=20] [--batch_size=256]

Times whole jitted chunks of optimizer steps (the same code path sweep.py uses) after a warm-up
chunk that compiles, on random inputs of the right shape (throughput does not depend on pixels).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLAGS = flags.FLAGS
flags.DEFINE_string("models", "fc,vgg16", "Comma list of fc | vgg16")
flags.DEFINE_integer("steps", 20, "Optimizer steps per timed chunk")
flags.DEFINE_integer("repeats", 3, "Timed chunks (median reported)")
flags.DEFINE_integer("batch_size", 256, "Batch size")
flags.DEFINE_string("factorize", "none", "none | head | all (layers of the benchmarked model)")


def bench(name: str, steps: int, repeats: int, batch: int, factorize: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bfprune import data as data_lib
  from bfprune import train
  from bfprune.pruning import masks as masks_lib
  from experiments.config import RunConfig
  from experiments.pipeline import build_model

  dataset = "mnist" if name == "fc" else "cifar10"
  cfg = RunConfig(dataset=dataset, model=name, factorize=factorize).validate()
  model = build_model(cfg)
  shape = (28, 28, 1) if name == "fc" else (32, 32, 3)
  n = batch * steps
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n,) + shape).astype(np.float32)
  y = rng.integers(0, 10, n).astype(np.int32)
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + shape))
  masks = masks_lib.ones_like(variables["params"])
  tx = train.adam()
  trainer = train.Trainer(model, tx, train.make_mesh(),
                          augment=data_lib.augment_cifar if dataset == "cifar10" else None)
  state = trainer.put(train.init_state(variables, masks, tx))
  xs, ys, m = trainer.put((jnp.asarray(x), jnp.asarray(y), masks))
  idx = np.arange(n).reshape(steps, batch)
  key = jax.random.key(0)
  t0 = time.perf_counter()
  state, loss = trainer.train_steps(state, m, xs, ys, idx, key)
  jax.block_until_ready(loss)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, loss = trainer.train_steps(state, m, xs, ys, idx, key)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  t = statistics.median(times)
  return {"model": f"{name}/{dataset}", "factorize": factorize, "batch": batch,
          "step_ms": 1e3 * t / steps, "examples_per_s": n / t, "first_chunk_s": compile_s}


def main(argv):
  del argv
  import jax
  names = [m.strip() for m in FLAGS.models.split(",") if m.strip()]
  for m in names:
    if m not in ("fc", "vgg16"):
      sys.exit(f"bench_train.py: error: --models item {m!r} is not fc or vgg16")
  print(f"jax {jax.__version__}, devices {jax.devices()}")
  print(f"{'model':<14}{'factorize':<10}{'batch':>6}{'step ms':>10}{'examples/s':>12}"
        f"{'1st chunk s':>13}")
  for m in names:
    r = bench(m, FLAGS.steps, FLAGS.repeats, FLAGS.batch_size, FLAGS.factorize)
    print(f"{r['model']:<14}{r['factorize']:<10}{r['batch']:>6}{r['step_ms']:>10.2f}"
          f"{r['examples_per_s']:>12.0f}{r['first_chunk_s']:>13.1f}")


if __name__ == "__main__":
  app.run(main)
