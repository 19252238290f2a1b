"""Monarch matrices (Dao et al. 2022): two block-diagonal factors with a fixed permutation between.

Layout. For ``n = b * k`` (``b`` blocks of size ``k``; the square Monarch has ``b = k = sqrt n``):

* ``blocks1``: (nstacks, b, k, k). Block ``j`` maps input chunk ``j`` (positions ``j*k .. j*k+k-1``):
  ``u[j, i] = sum_t blocks1[c, j, i, t] x[j*k + t]``.
* ``P``: the transpose of the (b, k) grid ("perfect shuffle"): entry ``u[j, i]`` (position
  ``j*k + i``) moves to position ``i*b + j``. For ``b = k`` it is an involution.
* ``blocks2``: (nstacks, k, b, b). Block ``i`` maps the ``i``-th chunk of size ``b`` after the
  shuffle: ``y[i*b + o] = sum_j blocks2[c, i, o, j] u[j, i]``.

So each stack is ``M = L2 P L1`` (L1, L2 block-diagonal), with ``n * (k + b)`` parameters
(``2 n sqrt n`` when square) and as many multiply-adds per vector. Dao et al. write
``M = P L P^T R``: the same class up to the fixed output permutation ``P``, which a layer does not
need (the next layer absorbs it); without it, identity blocks give exactly ``P``. Stacks are
independent Monarchs of the same input, concatenated (as the butterfly stacks).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]


def _check(blocks1: jax.Array, blocks2: jax.Array, who: str) -> tuple[int, int, int]:
  """Validates the two factors; returns (nstacks, b, k)."""
  if blocks1.ndim != 4 or blocks1.shape[2] != blocks1.shape[3]:
    raise ValueError(f"{who}: blocks1 must be (nstacks, b, k, k), got shape {blocks1.shape}")
  nstacks, b, k, _ = blocks1.shape
  if min(nstacks, b, k) < 1:
    raise ValueError(f"{who}: blocks1 shape {blocks1.shape} has an empty axis")
  if blocks2.shape != (nstacks, k, b, b):
    raise ValueError(f"{who}: blocks2 must be (nstacks, k, b, b) = {(nstacks, k, b, b)} to match "
                     f"blocks1 {blocks1.shape}, got {blocks2.shape}")
  return nstacks, b, k


def monarch_multiply(blocks1: jax.Array, blocks2: jax.Array, x: jax.Array) -> jax.Array:
  """Applies the Monarch matrix: x (batch, n) -> (batch, nstacks * n), n = b * k.

  blocks1: (nstacks, b, k, k); blocks2: (nstacks, k, b, b) (see the module docstring).
  Two batched matmuls; the shuffle is a free change of which axis is batched.
  """
  nstacks, b, k = _check(blocks1, blocks2, "monarch_multiply")
  if x.ndim != 2 or x.shape[1] != b * k:
    raise ValueError(f"monarch_multiply: x must be (batch, n) with n = b * k = {b * k}, got shape "
                     f"{x.shape}")
  dtype = jnp.result_type(blocks1.dtype, blocks2.dtype, x.dtype)
  batch = x.shape[0]
  xr = x.astype(dtype).reshape(batch, b, k)
  u = jnp.einsum("cjit,zjt->zcij", blocks1.astype(dtype), xr)       # (batch, c, k, b): shuffled
  y = jnp.einsum("ciot,zcit->zcio", blocks2.astype(dtype), u)       # (batch, c, k, b)
  return y.reshape(batch, nstacks * b * k)


def shuffle_permutation(b: int, k: int) -> np.ndarray:
  """``perm`` with ``(P v)[perm[p]] = v[p]``: position ``j*k + i`` -> ``i*b + j`` (grid transpose)."""
  if b < 1 or k < 1:
    raise ValueError(f"shuffle_permutation: need b, k >= 1, got {b}, {k}")
  return np.arange(b * k).reshape(b, k).T.reshape(-1).argsort()


def monarch_to_dense(blocks1: jax.Array, blocks2: jax.Array) -> jax.Array:
  """Materialises the Monarch as a (nstacks * n, n) matrix M with y = x @ M.T.

  Built as L2 @ P @ L1 per stack from explicit block-diagonal matrices (not via the multiply).
  """
  nstacks, b, k = _check(blocks1, blocks2, "monarch_to_dense")
  n = b * k
  perm = shuffle_permutation(b, k)
  pmat = jnp.zeros((n, n), blocks1.dtype).at[perm, np.arange(n)].set(1)
  mats = [jax.scipy.linalg.block_diag(*blocks2[c]) @ pmat @ jax.scipy.linalg.block_diag(*blocks1[c])
          for c in range(nstacks)]
  return jnp.concatenate(mats, axis=0)


def monarch_layout(in_features: int, features: int,
                   nblocks: Optional[int] = None) -> tuple[int, int, int, int]:
  """(n, b, k, nstacks) of a Monarch dense layer in_features -> features.

  Padding rule: ``nblocks=None`` -> the square Monarch with ``b = k = ceil(sqrt(in))``, i.e. n is
  the smallest perfect square >= in (784 -> 28^2, no padding; 512 -> 23^2 = 529). ``nblocks=b``
  -> ``k = ceil(in / b)``, n = b * k (smallest multiple of b >= in; 512 with b = 16 -> 16 x 32).
  ``features > n`` -> ``ceil(features / n)`` stacks, outputs cut to ``features``.
  """
  if in_features < 1:
    raise ValueError(f"MonarchDense: input size must be >= 1, got {in_features}")
  if features < 1:
    raise ValueError(f"MonarchDense: features must be >= 1, got {features}")
  if nblocks is None:
    b = k = math.isqrt(in_features - 1) + 1
  else:
    if isinstance(nblocks, bool) or not isinstance(nblocks, (int, np.integer)) or nblocks < 1:
      raise ValueError(f"MonarchDense: nblocks must be an integer >= 1 or None, got {nblocks!r}")
    b = int(nblocks)
    k = -(-in_features // b)
  n = b * k
  return n, b, k, -(-features // n)


def _normal_init(std: float) -> Initializer:
  def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
    return (jax.random.normal(key, shape, dtype) * std).astype(dtype)
  return init


class MonarchDense(nn.Module):
  """Dense layer with a Monarch weight: (..., in) -> (..., features), any in and features.

  The input is zero-padded to n (``monarch_layout``), multiplied by ``ceil(features / n)`` stacked
  Monarchs (params ``blocks1`` (nstacks, b, k, k), ``blocks2`` (nstacks, k, b, b)), cut to
  ``features``, plus ``bias`` (features,): ``y = x_pad @ monarch_to_dense(blocks1, blocks2).T
  [:, :features] + bias``.

  Init: i.i.d. normal, Var(blocks1) = b / in, Var(blocks2) = 1 / b, so every output (and every
  intermediate entry) has E y^2 = ||x||^2 / in, the gain of a LeCun dense layer
  (Var(W) = 1 / fan_in); the b / in instead of 1 / k undoes the zero padding.

  Attributes:
    nblocks: number of blocks b of the first factor; None = the square Monarch (b = k).
  """
  features: int
  nblocks: Optional[int] = None
  use_bias: bool = True
  param_dtype: Dtype = jnp.float32
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim < 1:
      raise ValueError("MonarchDense: input must have a feature axis, got a scalar")
    in_features = x.shape[-1]
    n, b, k, nstacks = monarch_layout(in_features, self.features, self.nblocks)
    blocks1 = self.param("blocks1", _normal_init(math.sqrt(b / in_features)), (nstacks, b, k, k),
                         self.param_dtype)
    blocks2 = self.param("blocks2", _normal_init(math.sqrt(1.0 / b)), (nstacks, k, b, b),
                         self.param_dtype)
    lead = x.shape[:-1]
    x2 = x.reshape((-1, in_features))
    if n != in_features:
      x2 = jnp.pad(x2, ((0, 0), (0, n - in_features)))
    y = monarch_multiply(blocks1, blocks2, x2)[:, :self.features]
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    return y.reshape((*lead, self.features))

  def flops_per_example(self, input_shape: Sequence[int]) -> int:
    """Multiply-adds for one example of shape ``input_shape`` (..., in): per vector
    ``nstacks * n * (k + b)`` (= 2 n sqrt n per stack when square) plus ``features`` for the bias."""
    if len(input_shape) < 1:
      raise ValueError("MonarchDense: input_shape must end with the feature axis, got ()")
    n, b, k, nstacks = monarch_layout(int(input_shape[-1]), self.features, self.nblocks)
    per_vector = nstacks * n * (k + b) + (self.features if self.use_bias else 0)
    return int(math.prod(input_shape[:-1])) * per_vector


def monarch_dense(**kw: Any) -> Callable[..., nn.Module]:
  """Layer constructor ``(features, name=None) -> MonarchDense(features, **kw)``."""
  return functools.partial(MonarchDense, **kw)
