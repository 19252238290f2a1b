"""Models: exact weight counts, output shapes, layers passed in without editing the models."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bfprune import models, train
from bfprune.pruning import masks as masks_lib


def _kernel_count(variables):
  return masks_lib.count_prunable(masks_lib.ones_like(variables["params"]))


def test_fc_weight_count_and_shape():
  model = models.FC()
  v = model.init(jax.random.key(0), jnp.zeros((3, 28, 28, 1)))
  # 784*100 + 4*100*100 + 100*10, written out independently of the model's loop.
  assert _kernel_count(v) == 784 * 100 + 4 * 100 * 100 + 100 * 10 == 119_400
  assert model.apply(v, jnp.zeros((3, 784))).shape == (3, 10)
  assert list(v["params"]) == ["fc1", "fc2", "fc3", "fc4", "fc5", "head"]


def test_vgg16_weight_count_and_shape():
  model = models.VGG16()
  v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
  convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
           (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
  expected = sum(9 * a * b for a, b in convs) + 512 * 10
  assert expected == 14_715_584
  assert sum(int(np.prod(l.shape)) for l in jax.tree.leaves(v["params"])
             if l.ndim > 1) == expected
  out = jax.eval_shape(model.apply, v, jnp.zeros((2, 32, 32, 3)))
  assert out.shape == (2, 10)


def test_vgg16_init_is_kaiming_normal_with_zero_bias():
  # VGG16's own init, jitted with only conv10's params as output: XLA drops the other layers'
  # draws and the forward pass, the same conv10 values at a fraction of the cost.
  model = models.VGG16()
  p = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)))["params"]["conv10"])(
      jax.random.key(0))
  k = np.asarray(p["kernel"])  # fan_in = 9 * 512
  assert k.shape == (3, 3, 512, 512)
  assert abs(k.std() - np.sqrt(2.0 / (9 * 512))) < 0.02 * np.sqrt(2.0 / (9 * 512))
  assert np.all(np.asarray(p["bias"]) == 0)


class _Scaled(nn.Module):
  """A user's own dense layer: a Dense whose output is doubled."""
  features: int

  @nn.compact
  def __call__(self, x):
    return 2.0 * nn.Dense(self.features, name="inner")(x)


def test_layers_are_passed_in_not_hard_coded():
  x = jax.random.normal(jax.random.key(1), (4, 784))
  base = models.FC(dropout_rate=0.0)
  swapped = models.FC(dropout_rate=0.0, dense=_Scaled, head=_Scaled)
  v = swapped.init(jax.random.key(0), x)
  assert set(v["params"]["fc1"]) == {"inner"}
  # Same weights through plain Dense layers, applied by hand with the doubling.
  h = x
  for name in ("fc1", "fc2", "fc3", "fc4", "fc5"):
    p = v["params"][name]["inner"]
    h = jax.nn.relu(2.0 * (h @ p["kernel"] + p["bias"]))
  p = v["params"]["head"]["inner"]
  np.testing.assert_allclose(swapped.apply(v, x), 2.0 * (h @ p["kernel"] + p["bias"]),
                             rtol=1e-5, atol=1e-5)
  del base


def test_vgg16_batchnorm_variant_trains_its_statistics():
  # Two convs (one on the XLA-conv path at 32x32, one on the im2col path at 2x2) keep the
  # train step's compile short; one step is enough to move the statistics.
  model = models.VGG16(batch_norm=True, plan=(8, "M", "M", "M", "M", 16))
  x = np.random.default_rng(0).normal(size=(32, 32, 32, 3)).astype(np.float32)
  y = np.arange(32, dtype=np.int32) % 10
  v = jax.jit(model.init)(jax.random.key(0), x[:1])
  assert sorted(v["batch_stats"]) == ["bn1", "bn2"]
  masks = masks_lib.ones_like(v["params"])
  tx = train.adam()
  trainer = train.Trainer(model, tx, train.make_mesh())
  state = train.init_state(v, masks, tx)
  state, hist = train.fit(trainer, state, masks, x, y, epochs=1, batch_size=32, seed=0, log=None,
                          chunk_steps=1)
  for bn in ("bn1", "bn2"):
    mean0 = np.asarray(v["batch_stats"][bn]["mean"])
    mean1 = np.asarray(state.batch_stats[bn]["mean"])
    assert np.all(mean0 == 0) and np.any(mean1 != 0), bn
  assert np.isfinite(hist[-1]["train_loss"])


def test_input_shape_rejects_unknown_dataset():
  with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
    models.input_shape("svhn")


@pytest.mark.parametrize("hw", [1, 2, 3, 4])
def test_conv3x3_im2col_equals_nn_conv_forward_and_gradient(hw):
  """Both paths of Conv3x3 (im2col at H*W <= 4, XLA conv above) equal nn.Conv with the same
  params: outputs and gradients w.r.t. params and input, zero padding at the borders."""
  x = jax.random.normal(jax.random.key(1), (3, hw, hw, 5))
  ref = nn.Conv(7, (3, 3), padding=1)
  v = ref.init(jax.random.key(2), x)
  v = jax.tree.map(lambda a: a + 0.1, v)  # a nonzero bias too
  ours = models.conv3x3(7)
  assert jax.tree.map(jnp.shape, jax.eval_shape(ours.init, jax.random.key(2), x)) == \
      jax.tree.map(jnp.shape, v)
  w = jax.random.normal(jax.random.key(3), (3, hw, hw, 7))
  loss = lambda m: lambda v, x: jnp.sum(jnp.tanh(m.apply(v, x)) * w)
  # One jitted program for both layers' outputs and gradients (eager dispatch costs more).
  both = jax.jit(lambda v, x: [(m.apply(v, x), jax.grad(loss(m), (0, 1))(v, x))
                               for m in (ours, ref)])
  (y_ours, g_ours), (y_ref, g_ref) = both(v, x)
  np.testing.assert_allclose(y_ours, y_ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_conv3x3_counts_like_nn_conv_and_rejects_other_geometries():
  from bfprune import metrics
  x = jnp.zeros((1, 2, 2, 4))
  ours, ref = models.conv3x3(6), nn.Conv(6, (3, 3), padding=1)
  a = metrics.layer_table(ours, ours.init(jax.random.key(0), x), None, (2, 2, 4))
  b = metrics.layer_table(ref, ref.init(jax.random.key(0), x), None, (2, 2, 4))
  assert [(r.kind, r.flops) for r in a] == [(r.kind, r.flops) for r in b] \
      == [("conv", 9 * 4 * 6 * 4 + 6 * 4)]
  with pytest.raises(ValueError, match="3x3 stride-1"):
    models.Conv3x3(6, (3, 3), strides=2, padding=1).init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))
