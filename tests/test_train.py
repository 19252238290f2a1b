"""Training: accuracy on real MNIST, masks kept exactly zero, sharding equivalence."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from bfprune import models, train
from bfprune.pruning import masks as masks_lib

from conftest import REPO


def _random_masks(params, density, seed):
  rng = np.random.default_rng(seed)
  return masks_lib.tree_map_masked(
      lambda m, p: None if m is None else jnp.asarray(rng.random(p.shape) < density),
      masks_lib.ones_like(params), params)


def test_dense_fc_reaches_95_percent_in_one_epoch(mnist):
  model = models.FC()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  masks = masks_lib.ones_like(variables["params"])
  tx = train.adam(1e-3)
  trainer = train.Trainer(model, tx, train.make_mesh())
  state = train.init_state(variables, masks, tx)
  state, history = train.fit(trainer, state, masks, mnist.train_x, mnist.train_y, epochs=1,
                             batch_size=256, seed=0, log=None,
                             eval_data=train.make_eval_data(mnist.test_x, mnist.test_y, 256))
  assert history[-1]["test_top1"] >= 95.0, history
  assert 99.0 <= history[-1]["test_top5"] <= 100.0
  # Evaluation counts every test example once: compare with a plain numpy computation.
  logits = model.apply({"params": state.params}, mnist.test_x)
  assert abs(100 * np.mean(np.argmax(logits, -1) == mnist.test_y) - history[-1]["test_top1"]) < 1e-3


def test_pruned_weights_stay_exactly_zero(mnist):
  model = models.FC()
  variables = model.init(jax.random.key(1), jnp.zeros((1, 784)))
  masks = _random_masks(variables["params"], 0.3, seed=0)
  tx = train.adam(1e-2)  # a large step makes any leak through Adam's moments visible
  trainer = train.Trainer(model, tx, train.make_mesh())
  # Start from a state whose Adam moments are non-zero everywhere (as after pre-training).
  ones = masks_lib.ones_like(variables["params"])
  state = train.init_state(variables, ones, tx)
  x, y = mnist.train_x[:2048], mnist.train_y[:2048]
  state, _ = train.fit(trainer, state, ones, x, y, epochs=1, batch_size=256, seed=0, log=None)
  before = state.params
  state = train.remask(state, masks)
  state, _ = train.fit(trainer, state, masks, x, y, epochs=2, batch_size=256, seed=0, log=None)
  changed = 0
  for m, p, p0 in zip(jax.tree.leaves(masks), jax.tree.leaves(
      masks_lib.tree_map_masked(lambda m, p: None if m is None else p, masks, state.params)),
      jax.tree.leaves(masks_lib.tree_map_masked(lambda m, p: None if m is None else p, masks, before))):
    m, p, p0 = map(np.asarray, (m, p, p0))
    assert np.all(p[~m] == 0.0)
    changed += int(np.sum(p[m] != p0[m]))
  assert changed > 0.9 * masks_lib.count_kept(masks)  # the kept weights did train


_SHARDING_SCRIPT = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np
    from bfprune import models, train
    from bfprune.pruning import masks as masks_lib
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 784)).astype(np.float32)
    y = rng.integers(0, 10, 1024).astype(np.int32)
    model = models.FC(dropout_rate=0.0)
    variables = model.init(jax.random.key(0), x[:1])
    masks = masks_lib.ones_like(variables['params'])
    out = {}
    for n in (1, 4):
      mesh = train.make_mesh(jax.devices()[:n])
      trainer = train.Trainer(model, train.adam(1e-3), mesh)
      state = trainer.put(train.init_state(variables, masks, trainer.tx))
      xs, ys, m = trainer.put((jnp.asarray(x), jnp.asarray(y), masks))
      idx = train.epoch_indices(len(x), 256, 0, 0)
      state, losses = trainer.train_steps(state, m, xs, ys, idx, jax.random.key(0))
      hlo = trainer._train_chunk.lower(state, m, xs, ys, jnp.asarray(idx), jax.random.key(0)
                                       ).compile().as_text()
      ev = trainer.evaluate(state, trainer.put(train.make_eval_data(x, y, 256)))
      out[n] = {'losses': np.asarray(losses).tolist(), 'eval': ev,
                'per_device_batch': 'f32[%d,784]' % (256 // n) in hlo}
    print(json.dumps(out))
""")


def test_four_devices_match_one_and_split_the_batch():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDING_SCRIPT], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  one, four = out["1"], out["4"]
  np.testing.assert_allclose(four["losses"], one["losses"], atol=1e-5, rtol=0)
  assert abs(four["eval"]["loss"] - one["eval"]["loss"]) < 1e-5
  assert four["per_device_batch"], "the compiled step does not split the batch over 4 devices"
  assert one["per_device_batch"]
