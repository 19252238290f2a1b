"""Butterfly multiply (pure JAX). REFERENCE VERSION: correct, not yet fast.

Layout (ports one-to-one from the established PyTorch implementation):
``twiddle``: (nstacks, nblocks, log2 n, n/2, 2, 2). Within one block, factor ``l`` (in the
order applied) has stride ``s = 2**l`` when the stride increases (``n / 2**(l+1)`` when it
decreases); positions ``i = 2*s*j + k`` and ``i + s`` (0 <= k < s) form pair ``p = j*s + k``
and ``[y_i, y_{i+s}] = twiddle[..., l, p] @ [x_i, x_{i+s}]``. Successive blocks alternate the
stride direction. Stacks are independent butterflies of the same input, concatenated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(twiddle: jax.Array, x: jax.Array) -> tuple[int, int, int, int]:
  if x.ndim != 2:
    raise ValueError(f"butterfly_multiply: x must be (batch, n), got shape {x.shape}")
  n = x.shape[1]
  if n < 2 or n & (n - 1):
    raise ValueError(f"butterfly_multiply: n = {n} must be a power of 2 >= 2")
  log_n = n.bit_length() - 1
  if twiddle.ndim != 6 or twiddle.shape[2:] != (log_n, n // 2, 2, 2):
    raise ValueError(
        "butterfly_multiply: twiddle must have shape (nstacks, nblocks, log2 n, n/2, 2, 2) = "
        f"(*, *, {log_n}, {n // 2}, 2, 2) for n = {n}, got {twiddle.shape}")
  return twiddle.shape[0], twiddle.shape[1], log_n, n


def butterfly_multiply(twiddle: jax.Array, x: jax.Array,
                       increasing_stride: bool = True) -> jax.Array:
  """Applies a butterfly matrix: x (batch, n) -> (batch, nstacks * n)."""
  nstacks, nblocks, log_n, n = _check(twiddle, x)
  dtype = jnp.result_type(twiddle.dtype, x.dtype)
  b = x.shape[0]
  y = jnp.broadcast_to(x.astype(dtype)[:, None, :], (b, nstacks, n))
  for blk in range(nblocks):
    inc = increasing_stride if blk % 2 == 0 else not increasing_stride
    for l in range(log_n):
      s = 2 ** l if inc else n // 2 ** (l + 1)
      t = twiddle[:, blk, l].astype(dtype).reshape(nstacks, n // (2 * s), s, 2, 2)
      yr = y.reshape(b, nstacks, n // (2 * s), 2, s)
      y = jnp.einsum("cjkot,bcjtk->bcjok", t, yr).reshape(b, nstacks, n)
  return y.reshape(b, nstacks * n)


def butterfly_to_dense(twiddle: jax.Array, increasing_stride: bool = True) -> jax.Array:
  """Materialises the butterfly as a (nstacks * n, n) matrix M with y = x @ M.T."""
  n = 2 * twiddle.shape[3]
  eye = jnp.eye(n, dtype=twiddle.dtype)
  return butterfly_multiply(twiddle, eye, increasing_stride).T
