"""Monarch multiply and MonarchDense, checked against dense matrices built independently in NumPy."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bfprune import metrics
from bfprune.pruning import masks as M
from bfprune.pruning import scores as S
from bfprune.structured import monarch as mo

SHAPES = [(1, 4, 4), (2, 3, 5), (1, 1, 6), (3, 2, 1)]  # (nstacks, b, k)


def block_diag_loops(blocks: np.ndarray) -> np.ndarray:
  """(nb, s, s) -> the (nb*s, nb*s) block-diagonal matrix, filled entry by entry."""
  nb, s, _ = blocks.shape
  out = np.zeros((nb * s, nb * s), blocks.dtype)
  for q in range(nb):
    for r in range(s):
      for c in range(s):
        out[q * s + r, q * s + c] = blocks[q, r, c]
  return out


def shuffle_matrix(b: int, k: int) -> np.ndarray:
  """P with (P v)[i*b + j] = v[j*k + i]: the transpose of v viewed as a (b, k) grid."""
  p = np.zeros((b * k, b * k))
  for j in range(b):
    for i in range(k):
      p[i * b + j, j * k + i] = 1.0
  return p


def reference_dense(b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
  """(nstacks * n, n): every stack L2 P L1 from explicit block-diagonals, stacked."""
  nstacks, b, k, _ = b1.shape
  return np.concatenate([block_diag_loops(b2[c]) @ shuffle_matrix(b, k) @ block_diag_loops(b1[c])
                         for c in range(nstacks)])


def random_blocks(seed: int, nstacks: int, b: int, k: int):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((nstacks, b, k, k)), rng.standard_normal((nstacks, k, b, b))


@pytest.mark.parametrize("nstacks,b,k", SHAPES)
def test_multiply_and_to_dense_match_numpy_reference(nstacks, b, k):
  b1, b2 = random_blocks(0, nstacks, b, k)
  x = np.random.default_rng(1).standard_normal((7, b * k))
  ref = reference_dense(b1, b2)
  with jax.enable_x64(True):
    y = mo.monarch_multiply(jnp.asarray(b1), jnp.asarray(b2), jnp.asarray(x))
    dense = mo.monarch_to_dense(jnp.asarray(b1), jnp.asarray(b2))
    np.testing.assert_allclose(np.asarray(y), x @ ref.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dense), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("b,k", [(4, 4), (3, 5)])
def test_identity_blocks_give_the_transpose_permutation(b, k):
  e1 = jnp.broadcast_to(jnp.eye(k), (1, b, k, k))
  e2 = jnp.broadcast_to(jnp.eye(b), (1, k, b, b))
  dense = np.asarray(mo.monarch_to_dense(e1, e2))
  np.testing.assert_array_equal(dense, shuffle_matrix(b, k))
  # ... which is the transpose of the (b, k) grid, and a permutation.
  x = np.arange(b * k, dtype=np.float32)[None]
  y = np.asarray(mo.monarch_multiply(e1, e2, jnp.asarray(x)))
  np.testing.assert_array_equal(y[0], x[0].reshape(b, k).T.reshape(-1))
  assert sorted(y[0].tolist()) == x[0].tolist()
  np.testing.assert_array_equal(dense[mo.shuffle_permutation(b, k), np.arange(b * k)], 1)
  if b == k:  # the square shuffle is an involution
    np.testing.assert_array_equal(dense @ dense, np.eye(b * k))


@pytest.mark.parametrize("m", [4, 8])
def test_parameter_and_flop_count(m):
  n = m * m
  layer = mo.MonarchDense(n)
  params = layer.init(jax.random.key(0), jnp.ones((1, n)))["params"]
  blocks = params["blocks1"].size + params["blocks2"].size
  assert blocks == 2 * n * math.isqrt(n)
  assert layer.flops_per_example((n,)) == 2 * n * m + n
  assert layer.flops_per_example((3, n)) == 3 * (2 * n * m + n)
  assert mo.MonarchDense(n, use_bias=False).flops_per_example((n,)) == 2 * n * m
  row, = metrics.layer_table(layer, {"params": params}, None, (n,))
  assert (row.kind, row.params, row.flops) == ("structured", blocks + n, 2 * n * m + n)


@pytest.mark.parametrize("in_f,features,nblocks,lead,layout", [
    (50, 30, None, (4,), (64, 8, 8, 1)),          # pad 50 -> 8^2, cut 64 -> 30
    (16, 40, None, (3,), (16, 4, 4, 3)),          # 3 stacks, cut 48 -> 40
    (10, 7, 4, (2, 3), (12, 4, 3, 1)),            # b = 4 blocks of size 3, leading axes
    (784, 100, None, (2,), (784, 28, 28, 1)),     # MNIST input: no padding
])
def test_rectangular_layer_equals_padded_dense_product(in_f, features, nblocks, lead, layout):
  assert mo.monarch_layout(in_f, features, nblocks) == layout
  n, b, k, nstacks = layout
  layer = mo.MonarchDense(features, nblocks=nblocks,
                          bias_init=nn.initializers.normal(1.0))
  x = np.random.default_rng(2).standard_normal((*lead, in_f)).astype(np.float32)
  params = layer.init(jax.random.key(3), jnp.asarray(x))["params"]
  assert params["blocks1"].shape == (nstacks, b, k, k)
  assert params["blocks2"].shape == (nstacks, k, b, b)
  y = np.asarray(layer.apply({"params": params}, jnp.asarray(x)))
  dense = reference_dense(np.asarray(params["blocks1"], np.float64),
                          np.asarray(params["blocks2"], np.float64))
  x_pad = np.concatenate([x, np.zeros((*lead, n - in_f))], axis=-1)
  ref = (x_pad @ dense.T)[..., :features] + np.asarray(params["bias"])
  assert y.shape == (*lead, features)
  np.testing.assert_allclose(y, ref, rtol=2e-4, atol=2e-4)
  assert layer.flops_per_example(x.shape[1:]) == (
      math.prod(lead[1:]) * (nstacks * n * (b + k) + features))


def test_gradients_match_the_dense_product():
  b1, b2 = random_blocks(4, 2, 3, 4)
  x = np.random.default_rng(5).standard_normal((6, 12))
  with jax.enable_x64(True):
    args = (jnp.asarray(b1), jnp.asarray(b2), jnp.asarray(x))
    loss_fast = lambda p, q, v: jnp.sum(jnp.sin(mo.monarch_multiply(p, q, v)))
    loss_dense = lambda p, q, v: jnp.sum(jnp.sin(v @ mo.monarch_to_dense(p, q).T))
    for g1, g2 in zip(jax.grad(loss_fast, (0, 1, 2))(*args), jax.grad(loss_dense, (0, 1, 2))(*args)):
      np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-10, atol=1e-12)


def test_init_preserves_variance_and_is_deterministic():
  in_f, features = 50, 64  # padded to 64 = 8^2: the init must undo the padding
  layer = mo.MonarchDense(features, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (256, in_f))
  keys = jax.random.split(jax.random.key(1), 16)
  init = jax.vmap(lambda key: layer.init(key, x)["params"])
  params = init(keys)
  y = jax.vmap(lambda p: layer.apply({"params": p}, x))(params)
  ratio = float(jnp.mean(y ** 2) / jnp.mean(x ** 2))
  assert 0.9 < ratio < 1.1, ratio
  again = init(keys)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_shapes_raise_value_error():
  b1 = jnp.ones((1, 3, 4, 4))
  b2 = jnp.ones((1, 4, 3, 3))
  with pytest.raises(ValueError, match="x must be"):
    mo.monarch_multiply(b1, b2, jnp.ones((2, 13)))
  with pytest.raises(ValueError, match="x must be"):
    mo.monarch_multiply(b1, b2, jnp.ones(12))
  with pytest.raises(ValueError, match="blocks1 must be"):
    mo.monarch_multiply(jnp.ones((3, 4, 4)), b2, jnp.ones((2, 12)))
  with pytest.raises(ValueError, match="blocks1 must be"):
    mo.monarch_to_dense(jnp.ones((1, 3, 4, 5)), b2)
  with pytest.raises(ValueError, match="blocks2 must be"):
    mo.monarch_multiply(b1, jnp.ones((1, 3, 4, 4)), jnp.ones((2, 12)))
  with pytest.raises(ValueError, match="blocks2 must be"):
    mo.monarch_to_dense(b1, jnp.ones((2, 4, 3, 3)))
  with pytest.raises(ValueError, match="nblocks"):
    mo.MonarchDense(8, nblocks=0).init(jax.random.key(0), jnp.ones((1, 8)))
  with pytest.raises(ValueError, match="features"):
    mo.MonarchDense(0).init(jax.random.key(0), jnp.ones((1, 8)))
  with pytest.raises(ValueError, match="feature axis"):
    mo.MonarchDense(4).flops_per_example(())


class Chain(nn.Module):
  """Bias-free dense -> Monarch -> dense with ReLUs (linear on SynFlow's positive inputs)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(9, use_bias=False, name="inp")(x))
    x = nn.relu(mo.MonarchDense(20, use_bias=False, name="mon")(x))   # n = 9, 3 stacks
    return nn.Dense(3, use_bias=False, name="out")(x)


def test_synflow_conserves_score_through_both_monarch_factors():
  # R = 1^T f(1; |theta|) is homogeneous of degree 1 in each layer and in each Monarch factor
  # of each stack, so (Euler) every factor's score sum is R (a stack's factors only reach
  # that stack's outputs: summed over stacks).
  model = Chain()
  params = model.init(jax.random.key(0), jnp.ones((1, 5)))["params"]
  prunable = lambda path, leaf: path[-1] in ("kernel", "blocks1", "blocks2")
  masks = M.ones_like(params, prunable)
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  scores = S.synflow_scores(apply_fn, params, masks, (5,))
  with jax.enable_x64(True):
    r = float(jnp.sum(apply_fn(jax.tree.map(lambda p: jnp.abs(p.astype(jnp.float64)), params),
                               jnp.ones((1, 5), jnp.float64))))
  sums = [scores["inp"]["kernel"].sum(), scores["out"]["kernel"].sum(),
          scores["mon"]["blocks1"].sum(), scores["mon"]["blocks2"].sum()]
  np.testing.assert_allclose(sums, r, rtol=1e-10)
  assert scores["mon"]["blocks1"].shape == params["mon"]["blocks1"].shape == (3, 3, 3, 3)
