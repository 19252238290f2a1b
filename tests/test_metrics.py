"""Tests for bfprune.metrics: counts and FLOPs against the formulas, collapse against explicit
reachability, on the project's models and on models defined only here."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bfprune import metrics, models
from bfprune.pruning import masks as masks_lib

VGG_SHAPE = (32, 32, 3)
FC_SHAPE = (28, 28, 1)


def abstract_init(model, shape):
  """Parameter shapes only (metrics never need values): avoids initialising 14.7M weights."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1,) + shape)))


def zeros_init(model, shape):
  """Concrete (zero) variables of the right shapes, without running an initialiser."""
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_init(model, shape))


def random_masks(params, density_by_path, seed=0):
  """Bernoulli masks on kernels, density chosen per layer name."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(seed)
  out = []
  for p, x in flat:
    names = masks_lib.path_names(p)
    if names[-1] != "kernel":
      out.append(None)
    else:
      out.append(rng.random(x.shape, np.float32) < density_by_path(names))
  return jax.tree_util.tree_unflatten(treedef, out)


def fc_dims():
  return (784,) + tuple(models.FC_HIDDEN) + (10,)


def vgg_layers():
  """(name, Cin, Cout, H, W) of every VGG16 conv at 32x32 input, walked from the plan."""
  layers, cin, hw, i = [], 3, 32, 0
  for item in models.VGG16_PLAN:
    if item == "M":
      hw //= 2
      continue
    i += 1
    layers.append((f"conv{i}", cin, item, hw, hw))
    cin = item
  return layers


# ----------------------------------------------------------------------------- counts


def test_fc_weights_and_flops_match_formula():
  model = models.FC()
  v = abstract_init(model, FC_SHAPE)
  d = fc_dims()
  weights = sum(a * b for a, b in zip(d[:-1], d[1:]))
  biases = sum(d[1:])
  assert (weights, biases) == (119_400, 510)
  s = metrics.summary(model, v, masks_lib.ones_like(v["params"]), FC_SHAPE)
  assert s["prunable"] == s["kept"] == weights
  assert s["params"] == metrics.count_params(v["params"]) == weights + biases
  assert s["flops"] == weights + biases
  assert [r["name"] for r in s["layers"]] == ["fc1", "fc2", "fc3", "fc4", "fc5", "head"]
  for r, (a, b) in zip(s["layers"], zip(d[:-1], d[1:])):
    assert r["kind"] == "dense" and r["flops"] == a * b + b and r["input_shape"] == [a]
  assert s["flop_density"] == 1.0 and s["collapsed"] is False


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg16_weights_and_flops_match_formula(batch_norm):
  model = models.VGG16(batch_norm=batch_norm)
  v = abstract_init(model, VGG_SHAPE)
  convs = vgg_layers()
  w_flops = sum(ci * co * 9 * h * w for _, ci, co, h, w in convs) + 512 * 10
  b_flops = sum(co * h * w for _, _, co, h, w in convs) + 10
  weights = sum(ci * co * 9 for _, ci, co, _, _ in convs) + 512 * 10
  assert w_flops + b_flops == 313_478_154 and weights == 14_715_584
  table = metrics.layer_table(model, v, masks_lib.ones_like(v["params"]), VGG_SHAPE)
  assert sum(r.weights for r in table) == weights
  by_name = {r.name: r for r in table}
  for name, ci, co, h, w in convs:
    r = by_name[name]
    assert r.kind == "conv" and r.output_shape == (h, w, co)
    assert r.flops == ci * co * 9 * h * w + co * h * w
  norm_flops = sum(co * h * w for _, _, co, h, w in convs) if batch_norm else 0
  assert sum(r.kind == "norm" for r in table) == (13 if batch_norm else 0)
  assert sum(r.flops for r in table) == w_flops + b_flops + norm_flops


def test_count_params_matches_numpy():
  tree = {"a": {"kernel": np.zeros((3, 4)), "bias": np.zeros(4)}, "b": [np.zeros((2, 2, 2))]}
  assert metrics.count_params(tree) == 12 + 4 + 8


# ----------------------------------------------------------------------------- flop density


class SmallCNN(nn.Module):
  """Strided VALID conv, BatchNorm, grouped SAME conv, dense head: input (9, 9, 3)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=2, padding="VALID", name="c1")(x)  # -> 4x4x8
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.relu(x)
    x = nn.Conv(8, (3, 3), padding="SAME", feature_group_count=2, name="c2")(x)  # -> 4x4x8
    x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))  # 128
    return nn.Dense(5, name="out")(x)


CNN_SHAPE = (9, 9, 3)


def cnn_variables():
  return zeros_init(SmallCNN(), CNN_SHAPE)


def test_flop_density_of_hand_built_mask_on_user_cnn():
  v = cnn_variables()
  p = v["params"]
  m = masks_lib.ones_like(p)
  # Keep exactly 100 of 216 c1 weights, 50 of 288 c2 weights, all but 40 of 640 head weights.
  m["c1"]["kernel"] = np.arange(216).reshape(3, 3, 3, 8) < 100
  m["c2"]["kernel"] = np.arange(288).reshape(3, 3, 4, 8) % 288 >= 238
  m["out"]["kernel"] = np.arange(640).reshape(128, 5) >= 40
  hw = (9 - 3) // 2 + 1  # VALID, stride 2
  f_c1, f_b1 = 3 * 8 * 9 * hw * hw, 8 * hw * hw
  f_bn = 8 * hw * hw
  f_c2, f_b2 = (8 // 2) * 8 * 9 * hw * hw, 8 * hw * hw  # groups: Cin/2 per output
  f_out, f_b3 = 8 * hw * hw * 5, 5
  total = f_c1 + f_b1 + f_bn + f_c2 + f_b2 + f_out + f_b3
  kept = 100 / 216 * f_c1 + f_b1 + f_bn + 50 / 288 * f_c2 + f_b2 + 600 / 640 * f_out + f_b3
  s = metrics.summary(SmallCNN(), v, m, CNN_SHAPE)
  assert s["flops"] == total
  assert s["flop_density"] == pytest.approx(kept / total, rel=1e-12)
  assert (s["prunable"], s["kept"]) == (216 + 288 + 640, 100 + 50 + 600)
  assert [r["kind"] for r in s["layers"]] == ["conv", "norm", "conv", "dense"]
  json.loads(json.dumps(s))  # plain data only


def test_unmasked_kernel_counts_at_density_one():
  v = cnn_variables()
  m = masks_lib.ones_like(v["params"])
  m["c2"]["kernel"] = None  # user predicate leaves c2 unpruned
  m["c1"]["kernel"] = np.zeros((3, 3, 3, 8), bool)
  table = {r.name: r for r in metrics.layer_table(SmallCNN(), v, m, CNN_SHAPE)}
  assert table["c2"].weights == 0 and table["c2"].density == 1.0
  assert table["c2"].flops_kept == table["c2"].flops
  assert table["c1"].flops_kept == 8 * 4 * 4  # only the bias survives


def test_vgg16_flop_density_with_per_layer_densities():
  model = models.VGG16()
  v = abstract_init(model, VGG_SHAPE)
  dens = {f"conv{i}": 0.9 ** i for i in range(1, 14)} | {"head": 0.3}
  m = random_masks(v["params"], lambda names: dens[names[0]], seed=1)
  kept_w = {k: int(np.sum(m[k]["kernel"])) for k in dens}
  num, den = 0.0, 0
  for name, ci, co, h, w in vgg_layers():
    f = ci * co * 9 * h * w
    num += kept_w[name] / (ci * co * 9) * f + co * h * w
    den += f + co * h * w
  num += kept_w["head"] + 10
  den += 5120 + 10
  s = metrics.summary(model, v, m, VGG_SHAPE)
  assert s["flop_density"] == pytest.approx(num / den, rel=1e-9)
  assert s["kept"] == sum(kept_w.values())


# ----------------------------------------------------------------------------- collapse


def fc_setup():
  model = models.FC()
  v = abstract_init(model, FC_SHAPE)
  return model, v, masks_lib.ones_like(v["params"])


def test_empty_layer_is_collapse_and_named():
  model, v, m = fc_setup()
  m["fc3"]["kernel"] = np.zeros((100, 100), bool)
  assert metrics.detect_collapse(model, v["params"], m, FC_SHAPE) == (True, "fc3")
  s = metrics.summary(model, v, m, FC_SHAPE)
  assert s["collapsed"] is True and s["collapsed_layer"] == "fc3"


def test_empty_layer_reported_in_forward_order():
  model = models.VGG16()
  v = abstract_init(model, VGG_SHAPE)
  m = masks_lib.ones_like(v["params"])
  # "conv10" sorts before "conv2" in the params dict; the forward reaches conv2 first.
  m["conv10"]["kernel"] = np.zeros(m["conv10"]["kernel"].shape, bool)
  m["conv2"]["kernel"] = np.zeros(m["conv2"]["kernel"].shape, bool)
  assert metrics.detect_collapse(model, v, m, VGG_SHAPE) == (True, "conv2")


def test_disconnected_mask_without_empty_layer():
  model, v, m = fc_setup()
  k1 = np.zeros((784, 100), bool)
  k1[:, 0] = True  # layer 1 keeps only unit 0's outputs
  k2 = np.zeros((100, 100), bool)
  k2[1, :] = True  # layer 2 keeps only unit 1's inputs
  m["fc1"]["kernel"], m["fc2"]["kernel"] = k1, k2
  assert all(np.any(x) for x in jax.tree.leaves(m))
  assert metrics.detect_collapse(model, v["params"], m, FC_SHAPE) == (True, "fc2")
  # Same masks, one extra weight from unit 0 to unit 1: connected again.
  k2 = k2.copy()
  k2[0, 1] = True
  m["fc2"]["kernel"] = k2
  assert metrics.detect_collapse(model, v["params"], m, FC_SHAPE) == (False, None)


def test_healthy_mask_not_collapsed_with_apply_fn():
  model = models.FC()
  params = zeros_init(model, (784,))["params"]
  m = random_masks(params, lambda _: 0.5, seed=3)
  apply_fn = lambda p, x: model.apply({"params": p}, x, train=False)
  assert metrics.detect_collapse(apply_fn, params, m, (784,)) == (False, None)


class DeepMLP(nn.Module):
  depth: int
  width: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = nn.relu(nn.Dense(self.width, name=f"l{i}")(x))
    return nn.Dense(3, name="out")(x)


def reachable_until_dead(kernels):
  """Explicit reachability from every input unit: index of the first layer with no reachable
  output unit, or None if some output is reachable."""
  reach = np.ones(kernels[0].shape[0], bool)
  for i, k in enumerate(kernels):
    reach = np.any(k[reach], axis=0)
    if not reach.any():
      return i
  return None


def sparse_deep_masks(depth, width, density, seed):
  """Very sparse masks that keep one unit-0 chain plus random weights."""
  rng = np.random.default_rng(seed)
  ks = []
  for i in range(depth + 1):
    k = rng.random((width, width if i < depth else 3)) < density
    k[0, 0] = True
    ks.append(k)
  return ks


def as_masks(ks):
  return {**{f"l{i}": {"kernel": k, "bias": None} for i, k in enumerate(ks[:-1])},
          "out": {"kernel": ks[-1], "bias": None}}


def test_deep_sparse_connected_net_is_not_collapsed():
  depth, width = 40, 32
  model = DeepMLP(depth, width)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (1e-3 * rng.standard_normal(s.shape)).astype(s.dtype),
                        abstract_init(model, (width,))["params"])
  ks = sparse_deep_masks(depth, width, density=0.003, seed=0)
  assert reachable_until_dead(ks) is None
  # A |θ|-valued float32 forward would underflow here: weights ~1e-3, (1e-3)^41 << float32 tiny.
  assert metrics.detect_collapse(model, params, as_masks(ks), (width,)) == (False, None)
  # Cut the chain at layer 25 (drop every weight out of unit 0 there and anything reachable).
  ks[25] = np.zeros_like(ks[25])
  ks[25][5, 7] = True  # not empty, but unit 5 of layer 24 is unreachable
  dead = reachable_until_dead(ks)
  assert dead is not None
  assert metrics.detect_collapse(model, params, as_masks(ks), (width,)) == (True, f"l{dead}")


def test_deep_dense_net_does_not_overflow():
  # 40 layers of fan-in 128: raw path counts reach 128^40 ~ 1e84, far beyond float32 (the
  # per-layer rescaling keeps it finite even past float64's range).
  depth, width = 40, 128
  model = DeepMLP(depth, width)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, width))))["params"]
  m = masks_lib.ones_like(params)
  assert metrics.detect_collapse(model, params, m, (width,)) == (False, None)


def test_user_cnn_collapse_with_batchnorm_and_groups():
  v = cnn_variables()
  # Non-zero BN offsets would open paths by themselves; the detector must neutralise them.
  v["params"]["bn"]["bias"] = np.ones(8, np.float32)
  v["batch_stats"]["bn"]["mean"] = np.full(8, -3.0, np.float32)
  m = masks_lib.ones_like(v["params"])
  k1 = np.zeros((3, 3, 3, 8), bool)
  k1[..., :4] = True  # c1 feeds only channels 0-3, i.e. group 0 of c2
  k2 = np.zeros((3, 3, 4, 8), bool)
  k2[..., 4:] = True  # c2 keeps only group-1 outputs, which read channels 4-7
  m["c1"]["kernel"], m["c2"]["kernel"] = k1, k2
  assert metrics.detect_collapse(SmallCNN(), v, m, CNN_SHAPE) == (True, "c2")
  k2 = k2.copy()
  k2[1, 1, 0, 0] = True  # one group-0 weight reconnects
  m["c2"]["kernel"] = k2
  assert metrics.detect_collapse(SmallCNN(), v, m, CNN_SHAPE) == (False, None)
  healthy = random_masks(v["params"], lambda _: 0.5, seed=5)
  s = metrics.summary(SmallCNN(), v, healthy, CNN_SHAPE)
  assert (s["collapsed"], s["collapsed_layer"]) == (False, None)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_value_errors():
  model, v, m = fc_setup()
  bad = jax.tree.map(lambda x: x, m, is_leaf=lambda x: x is None)
  bad["fc2"]["kernel"] = np.ones((100, 99), bool)
  with pytest.raises(ValueError, match="fc2/kernel"):
    metrics.summary(model, v, bad, FC_SHAPE)
  with pytest.raises(ValueError, match="input of shape"):
    metrics.layer_table(models.VGG16(), abstract_init(models.VGG16(), VGG_SHAPE), None, (32, 32))
  with pytest.raises(ValueError, match="input_shape"):
    metrics.detect_collapse(model, v, m, (0, 28))


# ----------------------------------------------------------------------------- structured layers


def butterfly_fc():
  from bfprune.structured import layers
  return models.FC(head=layers.butterfly_dense())


def test_butterfly_head_flops_and_pruned_factors():
  model = butterfly_fc()
  v = abstract_init(model, FC_SHAPE)
  n, log_n = 128, 7  # 100 inputs padded to 128, one stack covers 10 outputs
  head_flops = log_n * 2 * n + 10
  default = metrics.layer_table(model, v, masks_lib.ones_like(v["params"]), FC_SHAPE)
  head = default[-1]
  assert (head.name, head.kind, head.flops) == ("head", "structured", head_flops)
  assert head.weights == 0 and head.flops_kept == head_flops  # twiddles unpruned by default
  m = masks_lib.ones_like(v["params"], masks_lib.is_kernel_or_twiddle)
  # Keep 3/4: drop entry [0, 1] of every 2x2 (the diagonal stays, so paths survive; dropping
  # [0, 0] instead would disconnect outputs 0-9 from the unpadded inputs 0-99).
  tw = np.arange(log_n * (n // 2) * 4).reshape(1, 1, log_n, n // 2, 2, 2) % 4 != 1
  m["head"]["twiddle"] = tw
  d = fc_dims()
  dense_flops = sum(a * b + b for a, b in zip(d[:-2], d[1:-1]))
  s = metrics.summary(model, v, m, FC_SHAPE)
  assert s["flops"] == dense_flops + head_flops
  assert s["flop_density"] == pytest.approx(
      (dense_flops + 0.75 * (head_flops - 10) + 10) / (dense_flops + head_flops), rel=1e-12)
  assert s["prunable"] == 119_400 - 1000 + tw.size and not s["collapsed"]


def test_butterfly_head_connectivity():
  model = butterfly_fc()
  v = abstract_init(model, FC_SHAPE)
  m = masks_lib.ones_like(v["params"], masks_lib.is_kernel_or_twiddle)
  ident = np.zeros(m["head"]["twiddle"].shape, bool)
  ident[..., 0, 0] = ident[..., 1, 1] = True  # every factor the identity: unit j -> output j
  m["head"]["twiddle"] = ident
  k5 = np.zeros((100, 100), bool)
  k5[:, 50] = True  # fc5 feeds only unit 50, which the identity head sends past output 9
  m["fc5"]["kernel"] = k5
  assert metrics.detect_collapse(model, v, m, FC_SHAPE) == (True, "head")
  k5 = np.zeros((100, 100), bool)
  k5[:, 3] = True
  m["fc5"]["kernel"] = k5
  assert metrics.detect_collapse(model, v, m, FC_SHAPE) == (False, None)
  m["head"]["twiddle"] = np.zeros_like(ident)
  assert metrics.detect_collapse(model, v, m, FC_SHAPE) == (True, "head")


class KopsNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    from bfprune.structured import layers
    x = nn.relu(layers.KOPS2D(8, name="kops")(x))
    return nn.Dense(3, name="out")(x.reshape((x.shape[0], -1)))


def test_kops2d_table_and_collapse():
  shape = (8, 8, 2)
  model = KopsNet()
  v = abstract_init(model, shape)
  m = masks_lib.ones_like(v["params"])
  k = np.zeros((3, 3, 2, 8), bool)
  k[..., 4:] = True  # KOPS2D produces only channels 4-7 (9 * 2 * 4 = 72 of 144 kept)
  m["kops"]["kernel"] = k
  head = np.zeros((8 * 8 * 8, 3), bool)
  head[0::8] = True  # the head reads only channel 0 of each pixel
  m["out"]["kernel"] = head
  row = metrics.layer_table(model, v, m, shape)[0]
  from bfprune.structured import layers
  f = layers.KOPS2D(8).flops_per_example(shape)
  bias = 8 * 8 * 8
  assert (row.name, row.kind, row.flops, row.density) == ("kops", "structured", f, 0.5)
  assert row.flops_kept == pytest.approx(0.5 * (f - bias) + bias, rel=1e-12)
  assert metrics.detect_collapse(model, v, m, shape) == (True, "out")
  head[4::8] = True  # now also channel 4
  assert metrics.detect_collapse(model, v, m, shape) == (False, None)
