"""bfprune.conv (the VGG16 3x3 conv with a CPU-tuned VJP) and the CPU-cheap model pieces in
bfprune.models (hash dropout, reshape pools), each against an independent reference."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bfprune import conv, models

HIGHEST = lax.Precision.HIGHEST


def reference_conv(x, k):
  return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)


def _data(n, h, w, cin, cout, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (n, h, w, cin)), jax.random.normal(ks[1], (3, 3, cin, cout)),
          jax.random.normal(ks[2], (n, h, w, cout)))


def _loss(f, w):
  return lambda x, k: jnp.sum(jnp.tanh(f(x, k)) * w)


# (h, w) per CPU branch with 5 -> 4 channels (Winograd needs >= 16 input channels: tested
# below): 1x1 / 1x2 / 2x2 whole-image matmul forward and kernel gradient; 1x3 im2col forward +
# XLA kernel gradient; 4x4 XLA forward + chunked-im2col kernel gradient; 8x9 XLA forward +
# shifted-copies kernel gradient.
CASES = [("auto", (1, 1)), ("auto", (2, 2)), ("cpu", (1, 2)), ("auto", (1, 3)), ("auto", (4, 4)),
         ("auto", (8, 9)), ("cpu", (2, 3)), ("cpu", (8, 8)), ("generic", (4, 5))]


def _outputs_and_grads(f, w):
  """One jitted function: (f(x, k), d/dx and d/dk of sum(tanh(f(x, k)) * w))."""
  return jax.jit(lambda x, k: (f(x, k), jax.grad(_loss(f, w), (0, 1))(x, k)))


@pytest.mark.parametrize("impl, hw", CASES)
def test_conv3x3_matches_lax_conv_forward_and_both_gradients(impl, hw):
  x, k, w = _data(3, *hw, 5, 4)
  got = _outputs_and_grads(lambda x, k: conv.conv3x3(x, k, impl=impl, precision=HIGHEST), w)
  want = _outputs_and_grads(reference_conv, w)
  for g, r in zip(jax.tree.leaves(got(x, k)), jax.tree.leaves(want(x, k))):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_kernel_gradient_formulations_agree_with_the_transposed_conv():
  """Each kernel-gradient branch directly (whatever size kernel_grad would route it to)."""
  x, k, dy = _data(4, 4, 6, 3, 7)
  want = jax.vjp(lambda k: reference_conv(x, k), k)[1](dy)[0]
  fs = (conv._kernel_grad_shifted, conv._kernel_grad_im2col, conv._kernel_grad_xla,
        conv._kernel_grad_winograd)
  got = jax.jit(lambda x, dy: [f(x, dy, HIGHEST) for f in fs])(x, dy)
  for f, g in zip(fs, got):
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4, err_msg=f.__name__)


def test_chunked_kernel_gradient_with_scan_and_zero_padding(monkeypatch):
  """Chunk budgets of 8 images force the lax.scan over two chunks at 8x8 (shifted copies) and
  3x3 (im2col); n = 11 (prime) is zero-padded to 16."""
  assert conv._chunking(6, 2) == (2, 6) and conv._chunking(11, 8) == (8, 16)
  assert conv._chunking(7, 4) == (1, 7) and conv._chunking(3, 8) == (3, 3)
  n, cin, cout = 11, 2, 3
  monkeypatch.setattr(conv, "SHIFTED_CHUNK_BYTES", (8 + 2) * 8 * 3 * cout * 4 * 8)
  monkeypatch.setattr(conv, "IM2COL_CHUNK_BYTES", 3 * 3 * 9 * cin * 4 * 8)
  (x1, k1, w1), (x2, k2, w2) = _data(n, 8, 8, cin, cout, 1), _data(n, 3, 3, cin, cout, 2)
  ours = lambda x, k: conv.conv3x3(x, k, "cpu", HIGHEST)
  grads = lambda f: jax.jit(lambda: (jax.grad(_loss(f, w1), 1)(x1, k1),
                                     jax.grad(_loss(f, w2), 1)(x2, k2)))()
  text = jax.jit(jax.grad(_loss(ours, w1), 1)).lower(x1, k1).as_text()
  assert "stablehlo.while" in text  # the scan over chunks is there
  for g, r in zip(grads(ours), grads(reference_conv)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_winograd_conv_one_chunk_and_mapped_chunks_with_zero_padding(monkeypatch):
  """winograd_conv directly: one chunk, then a budget of 8 images that makes lax.map (and the
  kernel gradient's lax.scan) run over n = 11 (prime) zero-padded to 16; odd sizes refused."""
  n, cin, cout = 11, 16, 5
  x, k, _ = _data(n, 6, 8, cin, cout, 3)
  want = reference_conv(x, k)
  f = lambda: jax.jit(lambda x, k: conv.winograd_conv(x, k, HIGHEST))
  np.testing.assert_allclose(f()(x, k), want, rtol=1e-4, atol=1e-4)
  monkeypatch.setattr(conv, "WINOGRAD_CHUNK_BYTES", 4 * 6 * 8 * cin * 4 * 8)
  g = f()
  assert "stablehlo.while" in g.lower(x, k).as_text()
  np.testing.assert_allclose(g(x, k), want, rtol=1e-4, atol=1e-4)
  dy = jax.random.normal(jax.random.key(4), want.shape)  # kernel gradient: lax.scan over chunks
  dk = jax.jit(lambda x, dy: conv._kernel_grad_winograd(x, dy, HIGHEST))
  assert "stablehlo.while" in dk.lower(x, dy).as_text()
  np.testing.assert_allclose(dk(x, dy), jax.vjp(lambda k: reference_conv(x, k), k)[1](dy)[0],
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="even H and W"):
    conv.winograd_conv(x[:, :5], k)


def test_winograd_kernel_of_a_centre_tap_is_the_outer_product_of_gs_middle_column():
  """G e_1 = (0, 1/2, -1/2, 0): a centre-only kernel transforms to its outer product."""
  k = jnp.zeros((3, 3, 1, 1)).at[1, 1].set(1.0)
  col = np.array([0.0, 0.5, -0.5, 0.0])
  np.testing.assert_allclose(conv.winograd_kernel(k).reshape(4, 4), np.outer(col, col))


def test_whole_image_kernel_places_each_tap_between_its_pixel_pair():
  """At 2x2 input pixel (a, b) reaches output pixel (i, j) through tap (a - i + 1, b - j + 1):
  with kernel[p, q] = 10 p + q (one channel) the 4x4 matrix is known entry by entry."""
  k = (10.0 * jnp.arange(3)[:, None] + jnp.arange(3)[None, :]).reshape(3, 3, 1, 1)
  pixels = [(0, 0), (0, 1), (1, 0), (1, 1)]
  want = [[10 * (a - i + 1) + (b - j + 1) for (i, j) in pixels] for (a, b) in pixels]
  np.testing.assert_array_equal(conv.whole_image_kernel(k, 2, 2), np.array(want, np.float32))
  np.testing.assert_array_equal(conv.whole_image_kernel(k, 1, 1), [[11.0]])  # centre tap only
  x, k, dy = _data(3, 2, 2, 6, 5)  # the kernel gradient directly, against the transposed conv
  want = jax.vjp(lambda k: reference_conv(x, k), k)[1](dy)[0]
  np.testing.assert_allclose(conv._kernel_grad_whole_image(x, dy, HIGHEST), want, rtol=1e-5,
                             atol=1e-5)


def test_forward_formulation_choice():
  assert conv.uses_whole_image((256, 2, 2, 512)) and conv.uses_whole_image((8, 1, 2, 3))
  assert not conv.uses_whole_image((256, 1, 3, 512))
  assert not conv.uses_whole_image((256, 4, 4, 512))
  assert conv.uses_winograd((256, 4, 4, 512))
  assert conv.uses_winograd((256, 32, 32, 64))
  assert not conv.uses_winograd((256, 32, 32, 3))  # conv1: XLA's
  assert not conv.uses_winograd((256, 8, 9, 64))  # odd width
  assert not conv.uses_winograd((256, 2, 2, 512))  # too small (whole-image matmul there)
  assert not conv.uses_winograd((256, 4, 4, 512), jnp.bfloat16)


@pytest.mark.parametrize("hw", [(4, 4), (8, 6)])
def test_winograd_path_forward_and_both_gradients(hw):
  """16 channels in and out: forward and input gradient both by Winograd."""
  x, k, w = _data(3, *hw, 16, 16, 4)
  assert conv.uses_winograd(x.shape) and conv.uses_winograd(w.shape)
  got = _outputs_and_grads(lambda x, k: conv.conv3x3(x, k, impl="cpu", precision=HIGHEST), w)
  want = _outputs_and_grads(reference_conv, w)
  for g, r in zip(jax.tree.leaves(got(x, k)), jax.tree.leaves(want(x, k))):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw, c", [((2, 2), 4), ((8, 8), 4), ((4, 4), 16)])
def test_forward_over_reverse_hessian_product_matches_plain_conv(hw, c):
  """GraSP's H g = jvp(grad L)(θ; g) through two stacked convs with the custom VJP (c = 16:
  the second conv's forward, input gradient (16 output channels) and kernel gradient by
  Winograd, differentiated again)."""
  x, k1, _ = _data(2, *hw, 3, c)
  k2 = jax.random.normal(jax.random.key(9), (3, 3, c, c if c >= 16 else 2))
  y = jax.random.normal(jax.random.key(8), (2, *hw, k2.shape[-1]))

  def loss(f):
    return lambda ks: jnp.sum(jnp.tanh(f(jnp.tanh(f(x, ks[0])), ks[1])) * y)

  cpu = lambda x, k: conv.conv3x3(x, k, "cpu", HIGHEST)
  tangent = (jnp.ones_like(k1), -jnp.ones_like(k2))
  hg = lambda f: jax.jit(lambda ks, t: jax.jvp(jax.grad(loss(f)), (ks,), (t,))[1])
  got = hg(cpu)((k1, k2), tangent)
  want = hg(reference_conv)((k1, k2), tangent)
  for g, r in zip(got, want):  # float32 sums of differently ordered terms: atol by scale
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=max(1e-4, 1e-5 * float(np.abs(r).max())))


def test_conv3x3_rejects_bad_impl_and_shapes():
  x, k, _ = _data(1, 4, 4, 2, 3)
  with pytest.raises(ValueError, match="impl must be one of"):
    conv.conv3x3(x, k, impl="gpu")
  with pytest.raises(ValueError, match="kernel \\(3, 3, Cin, Cout\\)"):
    conv.conv3x3(x, k[:, :, :1])
  with pytest.raises(ValueError, match="Conv3x3 impl must be one of"):
    models.conv3x3(3, impl="fast").init(jax.random.key(0), x)


def _vgg_step(impl):
  """A small VGG-shaped train step (2 convs, pools, dropout, head) with Adam-like update."""
  model = models.VGG16(plan=(4, "M", 8), conv=lambda f, name: models.conv3x3(f, name=name,
                                                                           impl=impl))
  x = jnp.zeros((2, 8, 8, 3))
  params = model.init(jax.random.key(0), x)["params"]

  def step(params, x, y, key):
    def loss(p):
      logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
      return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1))
    g = jax.grad(loss)(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, g)

  args = (params, x, jnp.zeros((2,), jnp.int32), jax.random.key(1))
  return step, args


def case_ops(text):
  """The ``stablehlo.case`` ops of MLIR text (any number of branches)."""
  return text.count('"stablehlo.case"')


@pytest.mark.parametrize("platform", ["cuda", "cpu"])
def test_auto_conv_exports_one_implementation_per_platform_without_conditionals(platform):
  """impl="auto" lowered for one platform holds that platform's code only and no conditional:
  CUDA / TPU get XLA's convolutions (forward, input and kernel gradients of both layers but the
  first's input gradient: 5, as for impl="generic"), the CPU its kernel-gradient matmuls."""
  step, args = _vgg_step("auto")
  text = jax.export.export(jax.jit(step), platforms=[platform])(*args).mlir_module()
  generic, _ = _vgg_step("generic")
  gtext = jax.export.export(jax.jit(generic), platforms=[platform])(*args).mlir_module()
  assert case_ops(text) == case_ops(gtext) == 0
  convs = text.count("stablehlo.convolution")
  if platform == "cpu":
    assert convs < 5 and text.count("stablehlo.dot_general") > gtext.count("stablehlo.dot_general")
  else:
    assert convs == gtext.count("stablehlo.convolution") == 5


def test_auto_conv_multi_platform_export_and_vmap():
  """Lowered for CPU and CUDA at once JAX switches on the platform index; vmap batches both."""
  step, args = _vgg_step("auto")
  text = jax.export.export(jax.jit(step), platforms=["cpu", "cuda"])(*args).mlir_module()
  assert case_ops(text) > 0
  x, k, _ = _data(2, 4, 4, 2, 3)
  got = jax.vmap(lambda x: conv.conv3x3(x, k, "auto", HIGHEST))(x[:, None])
  np.testing.assert_allclose(got[:, 0], reference_conv(x, k), rtol=1e-5, atol=1e-5)
  with jax.disable_jit():
    np.testing.assert_allclose(conv.conv3x3(x, k, "auto", HIGHEST), reference_conv(x, k),
                               rtol=1e-5, atol=1e-5)


def test_auto_conv_train_step_equals_generic():
  step, args = _vgg_step("auto")
  generic, _ = _vgg_step("generic")
  for a, b in zip(jax.tree.leaves(jax.jit(step)(*args)), jax.tree.leaves(jax.jit(generic)(*args))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- hash dropout and pools --------------------------------------------------------------------


def _dropout(impl, rate, x, key, deterministic=False):
  return models.Dropout(rate, impl).apply({}, x, deterministic, rngs={"dropout": key})


def test_hash_dropout_keep_rate_scaling_and_determinism():
  x = jnp.ones((64, 32, 32))
  a = _dropout("hash", 0.1, x, jax.random.key(0))
  kept = np.asarray(a != 0)
  # 65,536 Bernoulli(0.9) draws: sd of the mean 0.0012; 5 sd.
  assert abs(kept.mean() - 0.9) < 0.006
  np.testing.assert_allclose(np.asarray(a)[kept], 1 / 0.9, rtol=1e-6)
  np.testing.assert_array_equal(a, _dropout("hash", 0.1, x, jax.random.key(0)))
  b = np.asarray(_dropout("hash", 0.1, x, jax.random.key(1)) != 0)
  # Independent masks agree on a fraction 0.9^2 + 0.1^2 = 0.82 of the elements.
  assert abs((kept == b).mean() - 0.82) < 0.01
  # No structure along any axis: per-slice keep rates (1,024 / 2,048 draws) within 5 sd.
  for axis in range(3):
    rates = kept.mean(axis=tuple(i for i in range(3) if i != axis))
    sd = np.sqrt(0.09 / (kept.size / kept.shape[axis]))
    assert np.all(np.abs(rates - 0.9) < 5 * sd), axis
  # Neighbouring elements are uncorrelated (lag-1 correlation of the flat mask).
  flat = kept.reshape(-1).astype(float)
  assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.02


def test_dropout_edge_cases_and_jax_impl_equals_nn_dropout():
  x = jax.random.normal(jax.random.key(2), (8, 16))
  key = jax.random.key(3)
  for impl in ("hash", "jax"):
    np.testing.assert_array_equal(_dropout(impl, 0.3, x, key, deterministic=True), x)
    np.testing.assert_array_equal(_dropout(impl, 0.0, x, key), x)
    np.testing.assert_array_equal(_dropout(impl, 1.0, x, key), jnp.zeros_like(x))
  want = nn.Dropout(0.3).apply({}, x, False, rngs={"dropout": key})
  np.testing.assert_array_equal(_dropout("jax", 0.3, x, key), want)
  with pytest.raises(ValueError, match="Dropout impl must be one of"):
    _dropout("philox", 0.1, x, key)


def test_hash_bits_accepts_raw_keys_and_differs_per_key_word():
  shape = (4, 5)
  typed = models.hash_bits(jax.random.key(7), shape)
  raw = models.hash_bits(jax.random.PRNGKey(7), shape)
  np.testing.assert_array_equal(typed, raw)
  data = jax.random.key_data(jax.random.key(7))
  for word in range(2):
    other = models.hash_bits(data.at[word].add(1), shape)
    assert np.mean(np.asarray(other) == np.asarray(typed)) < 0.2


@pytest.mark.parametrize("hw", [(5, 7)])
def test_pools_match_flax_pools_and_max_pool_gradient(hw):
  x = jax.random.normal(jax.random.key(4), (2, *hw, 3))  # no ties almost surely
  np.testing.assert_array_equal(models.max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
  np.testing.assert_allclose(models.avg_pool_2x2(x), nn.avg_pool(x, (2, 2), strides=(2, 2)),
                             rtol=1e-6)
  w = jax.random.normal(jax.random.key(5), (2, hw[0] // 2, hw[1] // 2, 3))
  g = jax.grad(lambda x: jnp.sum(models.max_pool_2x2(x) * w))(x)
  want = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2)) * w))(x)
  np.testing.assert_allclose(g, want, rtol=1e-6)
