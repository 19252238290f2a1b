"""Structured layers against independent references: the DFT matrix, lax convolution on a
wrap-padded input, butterfly factor products built in numpy from the paper's definitions
(``butterfly_reference``), analytic inits; for every butterfly implementation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bfprune.structured import inits
from bfprune.structured.layers import (ButterflyDense, FactorizedDense, KMatrixDense, KOPS2D,
                                       butterfly_dense, factorized_dense, kops2d)
from butterfly_reference import IMPLS, butterfly_matrix, padded_layer


def _init(module, x, seed=0):
  return jax.jit(module.init)(jax.random.key(seed), x)["params"]


def _apply(module, params, x):
  return jax.jit(module.apply)({"params": params}, x)


def _randomize_bias(params, seed=7):
  """Nonzero bias so the tests see that it is added."""
  p = dict(params)
  p["bias"] = jax.random.normal(jax.random.key(seed), params["bias"].shape)
  return p


# ----------------------------------------------------------------------------- DFT


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [16])
def test_fft_init_butterfly_dense_is_dft_matrix(n, impl):
  layer = ButterflyDense(n, twiddle_init="fft", use_bias=False, return_complex=True, impl=impl)
  eye = jnp.eye(n, dtype=jnp.float32)
  params = _init(layer, eye)
  # Row j of layer(I) is the layer applied to e_j, i.e. column j of the matrix.
  mat = np.asarray(_apply(layer, params, eye)).T
  np.testing.assert_allclose(mat, np.fft.fft(np.eye(n), axis=0), atol=1e-5 * n)


@pytest.mark.parametrize("impl", IMPLS)
def test_fft_init_rectangular_is_padded_dft_and_real_part_by_default(impl):
  x = jax.random.normal(jax.random.key(1), (3, 5))   # padded to 8, first 6 frequencies
  cplx = ButterflyDense(6, twiddle_init="fft", return_complex=True, impl=impl)
  params = _randomize_bias(_init(cplx, x))
  want = np.fft.fft(np.asarray(x), n=8, axis=-1)[:, :6] + np.asarray(params["bias"])
  np.testing.assert_allclose(_apply(cplx, params, x), want, atol=1e-5)
  real = ButterflyDense(6, twiddle_init="fft", impl=impl)
  y = _apply(real, params, x)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, want.real, atol=1e-5)


def test_fft_init_rejects_decreasing_stride():
  with pytest.raises(ValueError, match="increasing"):
    _init(ButterflyDense(8, twiddle_init="fft", increasing_stride=False), jnp.ones((1, 8)))


# ----------------------------------------------------------------------------- KOPS2D


def _circular_conv(x, kernel, bias):
  """Reference: 'same' cross-correlation with wrap-around padding (lo = (k-1)//2)."""
  kh, kw = kernel.shape[:2]
  pads = ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0))
  xp = jnp.pad(x, pads, mode="wrap")
  y = jax.lax.conv_general_dilated(xp, kernel, (1, 1), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  return y + bias


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("h,w,cin,cout,materialize", [
    (4, 4, 1, 3, False), (8, 16, 2, 5, True), (32, 32, 4, 6, None)])
def test_kops2d_fft_init_is_circular_conv(h, w, cin, cout, materialize, impl):
  x = jax.random.normal(jax.random.key(h + cin), (2, h, w, cin))
  layer = KOPS2D(cout, materialize=materialize, impl=impl)
  params = _randomize_bias(_init(layer, x))
  want = _circular_conv(x, params["kernel"], params["bias"])
  got = _apply(layer, params, x)
  assert got.shape == (2, h, w, cout) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("impl", IMPLS)
def test_kops2d_other_kernel_size_and_wrap_larger_than_image(impl):
  # 5x3 kernel on a 4x2 image: the padded kernel wraps onto itself (taps add up).
  x = jax.random.normal(jax.random.key(3), (2, 4, 2, 3))
  layer = KOPS2D(2, kernel_size=(5, 3), impl=impl)
  params = _randomize_bias(_init(layer, x))
  want = _circular_conv(jnp.tile(x, (1, 3, 3, 1)), params["kernel"], params["bias"])
  # Tiling three times makes the wrap of the reference valid for a kernel larger than the image.
  want = want[:, 4:8, 2:4]
  np.testing.assert_allclose(_apply(layer, params, x), want, atol=1e-4)


def test_kops2d_params_and_errors():
  x = jnp.ones((1, 8, 4, 3))
  params = _init(KOPS2D(5), x)
  assert params["kernel"].shape == (3, 3, 3, 5) and params["kernel"].dtype == jnp.float32
  assert params["bias"].shape == (5,)
  for name, n in [("input_h", 8), ("input_w", 4), ("kernel_h", 8), ("kernel_w", 4),
                  ("output_h", 8), ("output_w", 4)]:
    t = params[name]["twiddle"]
    assert t.shape == (1, 1, n.bit_length() - 1, n // 2, 2, 2)
    assert jnp.iscomplexobj(t)
  for shape in [(1, 6, 8, 3), (1, 8, 12, 3), (1, 1, 8, 3)]:
    with pytest.raises(ValueError, match="power of 2"):
      _init(KOPS2D(5), jnp.ones(shape))
  with pytest.raises(ValueError, match="NHWC"):
    _init(KOPS2D(5), jnp.ones((8, 8, 3)))
  with pytest.raises(ValueError, match="power of 2"):
    KOPS2D(5).flops_per_example((6, 6, 3))
  with pytest.raises(ValueError, match="KOPS2D: impl must be one of"):
    _init(KOPS2D(5, impl="cuda"), x)


# ----------------------------------------------------------------------------- dense layers


def _reference(params, x, features, increasing_stride):
  """The layer by hand in numpy: pad, butterfly factor product, cut, bias."""
  return padded_layer(np.asarray(params["twiddle"]), np.asarray(x), features,
                      increasing_stride, params["bias"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("din,dout", [(784, 100), (100, 10), (512, 10), (10, 40)])
def test_butterfly_dense_rectangular_padding(din, dout, impl):
  x = jax.random.normal(jax.random.key(din), (4, din))
  layer = ButterflyDense(dout, impl=impl)
  params = _randomize_bias(_init(layer, x))
  n = max(2, 1 << (din - 1).bit_length())
  assert params["twiddle"].shape == (-(-dout // n), 1, n.bit_length() - 1, n // 2, 2, 2)
  y = _apply(layer, params, x)
  assert y.shape == (4, dout)
  np.testing.assert_allclose(y, _reference(params, x, dout, True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_butterfly_dense_leading_dims_and_decreasing_stride(impl):
  x = jax.random.normal(jax.random.key(2), (2, 3, 12))
  layer = ButterflyDense(20, nblocks=2, increasing_stride=False, impl=impl)
  params = _randomize_bias(_init(layer, x))
  y = _apply(layer, params, x)
  assert y.shape == (2, 3, 20)
  want = _reference(params, x.reshape(6, 12), 20, False).reshape(2, 3, 20)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("din,dout,width", [(12, 12, 1), (12, 20, 2)])
def test_kmatrix_is_product_of_its_butterflies(din, dout, width, impl):
  x = jax.random.normal(jax.random.key(4), (3, din))
  layer = KMatrixDense(dout, width=width, impl=impl)
  params = _randomize_bias(_init(layer, x))
  tw = np.asarray(params["twiddle"], np.float64)
  assert tw.shape[:2] == (-(-dout // 16), 2 * width)
  # Block 0 decreasing stride, then alternating: per stack y = x @ (M_last ... M_0).T, each
  # block M_b a one-block butterfly matrix of its own direction (built separately here).
  n = 2 * tw.shape[3]
  stacks = []
  for c in range(tw.shape[0]):
    prod = np.eye(n)
    for blk in range(2 * width):
      prod = butterfly_matrix(tw[c:c + 1, blk:blk + 1], increasing=blk % 2 == 1) @ prod
    stacks.append(prod)
  xp = np.pad(np.asarray(x), ((0, 0), (0, n - din)))
  want = xp @ np.concatenate(stacks).T[:, :dout] + np.asarray(params["bias"])
  np.testing.assert_allclose(_apply(layer, params, x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls,din,dout,nblocks,increasing", [
    # The FC's real layers: 784 inputs padded to 1024, 100-wide layers padded to 128.
    (FactorizedDense, 784, 100, 1, True),     # rectangular: a butterfly
    (FactorizedDense, 100, 100, 2, False),    # square: a K-matrix (B B*-shaped)
    (FactorizedDense, 100, 10, 1, True),      # the head
    (KMatrixDense, 784, 100, 2, False),
])
def test_fc_sized_layers_match_numpy_factor_products(cls, din, dout, nblocks, increasing, impl):
  """Every FC layer shape, against the numpy factor product of the layout it must have
  (FactorizedDense: a K-matrix exactly when square, else a one-block butterfly)."""
  x = jax.random.normal(jax.random.key(din + dout), (5, din))
  layer = cls(dout, impl=impl)
  params = _randomize_bias(_init(layer, x))
  n = max(2, 1 << (din - 1).bit_length())
  assert params["twiddle"].shape == (1, nblocks, n.bit_length() - 1, n // 2, 2, 2)
  np.testing.assert_allclose(_apply(layer, params, x),
                             _reference(params, x, dout, increasing), rtol=1e-4, atol=1e-4)


def test_factorized_dense_picks_kmatrix_when_square():
  shapes = lambda layer: jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((1, 16)))["params"]
  sq, rect = shapes(FactorizedDense(16)), shapes(FactorizedDense(10))
  assert sq["twiddle"].shape == (1, 2, 4, 8, 2, 2)
  assert rect["twiddle"].shape == (1, 1, 4, 8, 2, 2)


@pytest.mark.parametrize("cls", [ButterflyDense, KMatrixDense, FactorizedDense])
def test_unknown_impl_raises(cls):
  with pytest.raises(ValueError, match=f"{cls.__name__}: impl must be one of 'auto', 'cpu'"):
    _init(cls(8, impl="gpu"), jnp.ones((1, 8)))


# ----------------------------------------------------------------------------- inits


_orthogonal = jax.jit(inits.orthogonal, static_argnums=(1, 2))


def test_orthogonal_init_is_orthogonal():
  # Real (2 stacks, 2 blocks) and complex (unitary) twiddles.
  for shape, dtype in [((2, 2, 5, 16, 2, 2), jnp.float32), ((1, 1, 3, 4, 2, 2), jnp.complex64)]:
    m = butterfly_matrix(np.asarray(_orthogonal(jax.random.key(0), shape, dtype)))
    n = 2 * shape[3]
    for s in range(shape[0]):
      q = m[n * s:n * (s + 1)]
      np.testing.assert_allclose(q @ q.conj().T, np.eye(n), atol=1e-5)
  # Both rotations and reflections occur (det of the 2x2 factors is +1 or -1).
  det = np.linalg.det(np.asarray(_orthogonal(jax.random.key(0), (2, 2, 5, 16, 2, 2),
                                             jnp.float32)))
  assert np.allclose(np.abs(det), 1, atol=1e-5) and (det > 0).any() and (det < 0).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_identity_init(impl):
  x = jax.random.normal(jax.random.key(8), (3, 12))
  for layer, want in [(ButterflyDense(5, twiddle_init="identity", use_bias=False, impl=impl),
                       x[:, :5]),
                      (KMatrixDense(12, twiddle_init="identity", use_bias=False, impl=impl), x)]:
    np.testing.assert_allclose(_apply(layer, _init(layer, x), x), want, atol=1e-6)


@pytest.mark.parametrize("layer,din", [(ButterflyDense(40, use_bias=False), 10),
                                       (KMatrixDense(12, use_bias=False), 12)])
def test_random_init_preserves_variance(layer, din):
  # For x with i.i.d. unit-variance entries, E[y_j^2] = sum_k M_eff[j, k]^2; its mean over
  # outputs, averaged over init draws, must be 1 (padding gain included). One draw's gain is
  # a product of random factors (heavy-tailed), hence 2000 draws and a loose bound.
  eye = jnp.eye(din)
  def gain(key):
    y = layer.apply(layer.init(key, eye), eye)   # rows: M_eff applied to e_k
    return jnp.sum(y ** 2) / layer.features
  gains = jax.jit(jax.vmap(gain))(jax.random.split(jax.random.key(10), 2000))
  assert 0.8 < float(jnp.mean(gains)) < 1.25, float(jnp.mean(gains))


def test_unknown_init_raises():
  with pytest.raises(ValueError, match="unknown twiddle init"):
    _init(ButterflyDense(8, twiddle_init="glorot"), jnp.ones((1, 8)))
  with pytest.raises(ValueError, match="complex"):
    inits.fft(None, (1, 1, 3, 4, 2, 2), jnp.float32)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("impl", IMPLS)
def test_complex_twiddle_gradient_is_descent_direction(impl):
  # For a real loss the gradient of a complex twiddle must be dL/dRe + i dL/dIm so that
  # stock optimizers descend (JAX's own convention gives its conjugate): check the
  # directional derivative by central differences. DFT twiddles: any point will do.
  x = jax.random.normal(jax.random.key(11), (4, 8))
  target = jax.random.normal(jax.random.key(12), (4, 6))
  layer = ButterflyDense(6, twiddle_init="fft", impl=impl)
  params = _init(layer, x)
  @jax.jit
  def loss(p):
    return jnp.mean((layer.apply({"params": p}, x) - target) ** 2)
  g = jax.jit(jax.grad(loss))(params)["twiddle"]
  t = params["twiddle"]
  d = jax.random.normal(jax.random.key(13), t.shape, jnp.complex64)
  eps = 1e-2
  fd = (loss({**params, "twiddle": t + eps * d}) - loss({**params, "twiddle": t - eps * d})) / (
      2 * eps)
  pred = jnp.sum(g.real * d.real + g.imag * d.imag)
  np.testing.assert_allclose(fd, pred, rtol=2e-2)


def test_factories_and_flops():
  assert isinstance(butterfly_dense(twiddle_init="orthogonal")(10, name="head"), ButterflyDense)
  assert butterfly_dense(impl="generic")(10).impl == "generic" and ButterflyDense(3).impl == "auto"
  assert factorized_dense()(100, name="fc2").features == 100
  assert kops2d()(64, name="conv1").kernel_size == (3, 3)
  # Hand-derived counts (FLOP convention in layers.py):
  # 784 -> 100: n = 1024, one stack, 10 factors of 2n, plus bias.
  assert ButterflyDense(100).flops_per_example((784,)) == 10 * 2 * 1024 + 100
  # 10 -> 40: n = 16, 3 stacks of 4 factors, plus bias.
  assert ButterflyDense(40).flops_per_example((10,)) == 3 * 4 * 2 * 16 + 40
  # Complex fft twiddles count 4 real multiply-adds each; no bias.
  assert ButterflyDense(8, twiddle_init="fft", use_bias=False).flops_per_example((8,)) == (
      4 * 3 * 2 * 8)
  # K-matrix 100 -> 100: n = 128, 2 blocks of 7 factors; leading dims multiply.
  assert KMatrixDense(100).flops_per_example((100,)) == 2 * 7 * 2 * 128 + 100
  assert KMatrixDense(100).flops_per_example((3, 100)) == 3 * (2 * 7 * 2 * 128 + 100)
  assert FactorizedDense(100).flops_per_example((100,)) == 2 * 7 * 2 * 128 + 100
  assert FactorizedDense(10).flops_per_example((100,)) == 7 * 2 * 128 + 10
  # KOPS2D 8x8x3 -> 5: transforms of 3 input and 5 output channels, each 2HW per factor over
  # log2 8 + log2 8 factors (x4 complex), per-frequency 3x5 complex product (x4), bias.
  want = 4 * 2 * 64 * 6 * (3 + 5) + 4 * 64 * 3 * 5 + 64 * 5
  assert KOPS2D(5).flops_per_example((8, 8, 3)) == want
