r"""Train-step time: FC on MNIST-shaped and VGG16 on CIFAR-10-shaped data, optionally vs PyTorch.

  python experiments/bench_train.py [--models=fc,vgg16] [--steps=0] [--calls=0] [--warmup=3] \
      [--repeats=3] [--batch_size=256] [--factorize=none] [--compare_torch] [--per_layer]

Times whole jitted chunks of optimizer steps, the code path sweep.py uses (``Trainer.train_steps``
with ``--steps`` steps per call; 0 = sweep.py's chunk: 64 for the FC, 1 for VGG16), on random
inputs of the right shape (throughput does not depend on pixels). A chunk is ``--calls`` such
calls back to back (0: 4 for the FC, 256 steps, about one MNIST epoch, as sweep.py runs them; 1
for VGG16): a lone 64-step FC call (~0.1 s) measured up to 20 % slower right after the CPU did
something else (PyTorch's chunk, or 0.2 s idle), which back-to-back calls, like an epoch of
sweep.py, do not pay. Before the ``--repeats`` timed chunks come ``--warmup`` untimed ones: the
first, a single call, compiles; the next let the heap reach its size (with PyTorch in the same
process, the first VGG16 steps page-fault up to 0.8 GB of new memory each). ``step_ms`` is the
median chunk time divided by its steps.

``--compare_torch`` builds the same networks as a plain PyTorch ``nn.Sequential`` (FC: 784-100x5-10
with ReLU and dropout 0.1; VGG16: the 13 3x3 convs of ``models.VGG16_PLAN`` with bias, ReLU and
dropout 0.1, 2x2 max-pools, a 2x2 average pool, one 512->10 linear; no BatchNorm), trained with
``torch.optim.Adam(lr=1e-3)`` and cross-entropy on the same batches, with
``torch.set_num_threads(<cores>)``. The two are timed alternately, chunk by chunk, in one process
so both see the same machine load; the ratio ``bfprune / torch`` is printed per model. PyTorch
comes from the ``bench`` extra (``pip install -e .[bench]``).

``--per_layer`` adds where a VGG16 step's convolutions spend their time: each of the 13 3x3 convs
alone (batch ``--batch_size``, median of ``--repeats``), its forward, input gradient and kernel
gradient timed separately as ``Conv3x3`` computes them on this platform (each gradient jitted
alone, so XLA drops the other), beside PyTorch's ``nn.Conv2d`` forward and
``torch.autograd.grad`` for each gradient with ``--compare_torch``.

By default the process first calls ``bfprune.platform.keep_freed_memory()`` (malloc reuses
freed memory; it applies to both frameworks); ``--nokeep_freed_memory`` measures without it.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import cpu_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("models", "fc,vgg16", "Comma list of fc | vgg16")
flags.DEFINE_integer("steps", 0, "Optimizer steps per timed chunk (0: sweep.py's chunk, "
                     "64 for fc, 1 for vgg16)")
flags.DEFINE_integer("calls", 0, "Jitted calls of --steps steps per timed chunk, back to back "
                     "(0: 4 for fc, 1 for vgg16); PyTorch runs as many steps per chunk")
flags.DEFINE_integer("repeats", 3, "Timed chunks (median reported)")
flags.DEFINE_integer("warmup", 3, "Untimed chunks of each framework before the timed ones (the "
                     "first compiles; the process heap takes a few steps to reach its size)")
flags.DEFINE_integer("batch_size", 256, "Batch size")
flags.DEFINE_string("factorize", "none", "none | head | all (layers of the benchmarked model)")
flags.DEFINE_bool("compare_torch", False, "Also time the same train step in PyTorch (CPU) in "
                  "the same run and print the ratio")
flags.DEFINE_bool("per_layer", False, "Also time each VGG16 conv's forward, input gradient and "
                  "kernel gradient alone (and PyTorch's with --compare_torch)")
cpu_flags.define_flags()


class Bench:
  """bfprune's train step for one model, ready to time chunk by chunk."""

  def __init__(self, name: str, steps: int, batch: int, factorize: str):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bfprune import data as data_lib
    from bfprune import train
    from bfprune.pruning import masks as masks_lib
    from experiments.config import RunConfig
    from experiments.pipeline import build_model, compiler_options

    self.dataset = "mnist" if name == "fc" else "cifar10"
    cfg = RunConfig(dataset=self.dataset, model=name, factorize=factorize).validate()
    model = build_model(cfg)
    self.shape = (28, 28, 1) if name == "fc" else (32, 32, 3)
    n = batch * steps
    rng = np.random.default_rng(0)
    self.x = rng.normal(size=(n,) + self.shape).astype(np.float32)
    self.y = rng.integers(0, 10, n).astype(np.int32)
    self.idx = np.arange(n).reshape(steps, batch)
    variables = model.init(jax.random.key(0), jnp.zeros((1,) + self.shape))
    masks = masks_lib.ones_like(variables["params"])
    tx = train.adam()
    self.trainer = train.Trainer(
        model, tx, train.make_mesh(),
        augment=data_lib.augment_cifar if self.dataset == "cifar10" else None,
        compiler_options=compiler_options(name, FLAGS.small_matmul_options))
    self.state = self.trainer.put(train.init_state(variables, masks, tx))
    self.xs, self.ys, self.masks = self.trainer.put(
        (jnp.asarray(self.x), jnp.asarray(self.y), masks))
    self.key = jax.random.key(0)

  def chunk(self, calls: int = 1) -> tuple[float, float]:
    """Runs ``calls`` jitted calls of steps; returns their (wall, process CPU) seconds."""
    import jax
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
      self.state, loss = self.trainer.train_steps(self.state, self.masks, self.xs, self.ys,
                                                  self.idx, self.key)
    jax.block_until_ready(loss)
    return time.perf_counter() - t0, time.process_time() - c0


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def torch_sequential(name: str):
  """The study's FC or VGG16 (no BatchNorm) as a plain ``torch.nn.Sequential`` (NCHW input)."""
  from torch import nn
  from bfprune import models
  layers: list = []
  if name == "fc":
    layers.append(nn.Flatten())
    d = 28 * 28
    for width in models.FC_HIDDEN:
      layers += [nn.Linear(d, width), nn.ReLU(), nn.Dropout(0.1)]
      d = width
    layers.append(nn.Linear(d, 10))
  else:
    c = 3
    for item in models.VGG16_PLAN:
      if item == "M":
        layers.append(nn.MaxPool2d(2))
        continue
      layers += [nn.Conv2d(c, int(item), 3, padding=1), nn.ReLU(), nn.Dropout(0.1)]
      c = int(item)
    layers += [nn.AvgPool2d(2), nn.Flatten(), nn.Linear(c, 10)]
  return nn.Sequential(*layers)


class TorchBench:
  """The same train step in PyTorch on the same batches (NHWC inputs transposed to NCHW once)."""

  def __init__(self, name: str, bench: Bench):
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    self.model = torch_sequential(name).train()
    self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
    x = torch.from_numpy(bench.x).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(bench.y).long()
    self.batches = [(x[i], y[i]) for i in (torch.from_numpy(r) for r in bench.idx)]

  def chunk(self, calls: int = 1) -> tuple[float, float]:
    import torch.nn.functional as F
    t0, c0 = time.perf_counter(), time.process_time()
    for x, y in self.batches * calls:
      self.opt.zero_grad(set_to_none=True)
      loss = F.cross_entropy(self.model(x), y)
      loss.backward()
      self.opt.step()
    loss.item()
    return time.perf_counter() - t0, time.process_time() - c0


def run(name: str, steps: int, repeats: int, batch: int, factorize: str,
        with_torch: bool, calls: int = 1, warmup: int = 1) -> dict:
  """Times bfprune (and PyTorch) alternately: ``warmup`` (>= 1) untimed chunks each, then
  ``repeats`` timed ones each, a chunk being ``calls`` jitted calls of ``steps`` steps (the same
  steps in PyTorch). ``first_chunk_s``: the first call (compile included)."""
  b = Bench(name, steps, batch, factorize)
  t = TorchBench(name, b) if with_torch else None
  first = b.chunk()[0]
  if t is not None:
    t.chunk()
  # Warm-up beyond the compile: with PyTorch in the same process, the heap grows over the first
  # VGG16 steps (0.8 GB of page faults in the first timed step, none from the fourth on).
  for _ in range(warmup - 1):
    b.chunk(calls)
    if t is not None:
      t.chunk(calls)
  jt, tt = [], []
  for _ in range(repeats):
    jt.append(b.chunk(calls))
    if t is not None:
      tt.append(t.chunk(calls))
  ms = lambda times, i: [1e3 * x[i] / (steps * calls) for x in times]
  r = {"model": f"{name}/{b.dataset}", "factorize": factorize, "batch": batch,
       "step_ms": statistics.median(ms(jt, 0)), "cpu_ms": statistics.median(ms(jt, 1)),
       "spread_ms": (min(ms(jt, 0)), max(ms(jt, 0))), "first_chunk_s": first}
  r["examples_per_s"] = 1e3 * batch / r["step_ms"]
  if t is not None:
    r["torch_ms"] = statistics.median(ms(tt, 0))
    r["torch_cpu_ms"] = statistics.median(ms(tt, 1))
    r["torch_spread_ms"] = (min(ms(tt, 0)), max(ms(tt, 0)))
    r["ratio"] = r["step_ms"] / r["torch_ms"]
  return r


def _median_ms(f, repeats: int) -> float:
  f()  # compiles / warms up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f()
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def per_layer(batch: int, repeats: int, with_torch: bool) -> list[dict]:
  """Forward / input-gradient / kernel-gradient ms of each VGG16 conv, bfprune's and PyTorch's."""
  import jax
  import numpy as np
  from bfprune import conv, models
  rows = []
  rng = np.random.default_rng(0)
  for i, (hw, cin, cout) in enumerate(models.vgg16_conv_shapes()):
    x = jax.numpy.asarray(rng.standard_normal((batch, hw, hw, cin), np.float32))
    k = jax.numpy.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) * 0.05)
    dy = jax.numpy.asarray(rng.standard_normal((batch, hw, hw, cout), np.float32))
    fwd = jax.jit(conv.conv3x3)
    dx = jax.jit(lambda x, k, dy: jax.vjp(conv.conv3x3, x, k)[1](dy)[0])
    dk = jax.jit(lambda x, k, dy: jax.vjp(conv.conv3x3, x, k)[1](dy)[1])
    r = {"layer": f"conv{i + 1}", "hw": hw, "cin": cin, "cout": cout,
         "fwd": _median_ms(lambda: jax.block_until_ready(fwd(x, k)), repeats),
         "dx": _median_ms(lambda: jax.block_until_ready(dx(x, k, dy)), repeats),
         "dk": _median_ms(lambda: jax.block_until_ready(dk(x, k, dy)), repeats)}
    if with_torch:
      import torch
      tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous().requires_grad_()
      tdy = torch.from_numpy(np.array(dy)).permute(0, 3, 1, 2).contiguous()
      layer = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False)  # conv3x3 has none
      r["torch_fwd"] = _median_ms(lambda: layer(tx), repeats)
      ty = layer(tx)
      r["torch_dx"] = _median_ms(
          lambda: torch.autograd.grad(ty, tx, tdy, retain_graph=True), repeats)
      r["torch_dk"] = _median_ms(
          lambda: torch.autograd.grad(ty, layer.weight, tdy, retain_graph=True), repeats)
    rows.append(r)
  return rows


def print_per_layer(rows: list[dict], batch: int, repeats: int) -> None:
  torch_cols = "torch_fwd" in rows[0]
  print(f"\nVGG16 convs alone, batch {batch}, median of {repeats} (ms): forward / input gradient "
        f"/ kernel gradient")
  head = f"{'layer':<8}{'HxW':>6}{'Cin':>5}{'Cout':>6}{'fwd':>9}{'dx':>9}{'dk':>9}{'sum':>9}"
  if torch_cols:
    head += f"{'torch fwd':>11}{'torch dx':>10}{'torch dk':>10}{'torch sum':>11}{'ratio':>7}"
  print(head)
  total = {}
  for r in rows + [None]:
    if r is None:
      r = dict(layer="total", hw=0, cin=0, cout=0, **total)
    else:
      for key in r:
        if key in ("fwd", "dx", "dk") or key.startswith("torch_"):
          total[key] = total.get(key, 0.0) + r[key]
    ours = r["fwd"] + r["dx"] + r["dk"]
    size = f"{r['hw']}^2" if r["hw"] else ""
    line = (f"{r['layer']:<8}{size:>6}{r['cin'] or '':>5}{r['cout'] or '':>6}{r['fwd']:>9.1f}"
            f"{r['dx']:>9.1f}{r['dk']:>9.1f}{ours:>9.1f}")
    if torch_cols:
      theirs = r["torch_fwd"] + r["torch_dx"] + r["torch_dk"]
      line += (f"{r['torch_fwd']:>11.1f}{r['torch_dx']:>10.1f}{r['torch_dk']:>10.1f}"
               f"{theirs:>11.1f}{ours / theirs:>7.2f}")
    print(line, flush=True)
  print("conv1's input gradient is not needed in training (XLA drops it from the step)")


def default_steps(name: str) -> int:
  from experiments.pipeline import chunk_steps
  return chunk_steps(name)


def default_calls(name: str) -> int:
  """Back-to-back calls per timed chunk: 4 x 64 FC steps (~one MNIST epoch), 1 VGG16 step."""
  return 4 if name == "fc" else 1


def main(argv):
  del argv
  kept = cpu_flags.apply_keep_freed_memory()  # before JAX's first use
  import jax
  names = [m.strip() for m in FLAGS.models.split(",") if m.strip()]
  for m in names:
    if m not in ("fc", "vgg16"):
      sys.exit(f"bench_train.py: error: --models item {m!r} is not fc or vgg16")
  if (FLAGS.steps < 0 or FLAGS.calls < 0 or FLAGS.repeats < 1 or FLAGS.warmup < 1
      or FLAGS.batch_size < 1):
    sys.exit("bench_train.py: error: --steps and --calls must be >= 0, --repeats, --warmup "
             "and --batch_size >= 1")
  with_torch = FLAGS.compare_torch and torch_available()
  load = os.getloadavg()[0]
  print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} cores, "
        f"load average {load:.1f}, keep_freed_memory {kept}")
  if FLAGS.compare_torch and not with_torch:
    print("--compare_torch: PyTorch is not installed (pip install -e .[bench]); "
          "bfprune's columns only")
  if with_torch:
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
  head = (f"{'model':<14}{'factorize':<10}{'batch':>6}{'step ms':>10}{'examples/s':>12}"
          f"{'1st call s':>12}{'steps':>8}{'min-max ms':>20}{'CPU ms':>10}")
  if with_torch:
    head += f"{'torch ms':>10}{'torch min-max':>20}{'torch CPU':>10}{'ratio':>7}"
  print(head)
  for m in names:
    steps = FLAGS.steps or default_steps(m)
    calls = FLAGS.calls or default_calls(m)
    r = run(m, steps, FLAGS.repeats, FLAGS.batch_size, FLAGS.factorize, with_torch, calls,
            FLAGS.warmup)
    line = (f"{r['model']:<14}{r['factorize']:<10}{r['batch']:>6}{r['step_ms']:>10.2f}"
            f"{r['examples_per_s']:>12.0f}{r['first_chunk_s']:>12.1f}{f'{steps}x{calls}':>8}"
            f"{'%.2f-%.2f' % r['spread_ms']:>20}{r['cpu_ms']:>10.1f}")
    if with_torch:
      line += (f"{r['torch_ms']:>10.2f}{'%.2f-%.2f' % r['torch_spread_ms']:>20}"
               f"{r['torch_cpu_ms']:>10.1f}{r['ratio']:>7.2f}")
    print(line, flush=True)
  print("step ms: median wall time per optimizer step; CPU ms: process CPU time per step "
        "(all threads); steps: steps per jitted call x calls back to back per timed chunk")
  if with_torch:
    print("ratio = bfprune step / PyTorch step (wall), both medians of chunks timed alternately "
          "in this run")
  if FLAGS.per_layer:
    print_per_layer(per_layer(FLAGS.batch_size, FLAGS.repeats, with_torch), FLAGS.batch_size,
                    FLAGS.repeats)


if __name__ == "__main__":
  app.run(main)
