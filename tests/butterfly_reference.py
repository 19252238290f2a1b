"""Butterfly matrices built in numpy from the paper's definitions, independent of bfprune.

Reference (Dao et al., Definitions 1-3): a butterfly factor of size k is [[D11, D12],
[D21, D22]] with k/2 x k/2 diagonal blocks; a butterfly factor matrix of block size k is
block-diagonal with n/k such factors; a butterfly matrix is the product B_n ... B_4 B_2 (an
increasing-stride block applies B_2 first; a decreasing one B_n first). Twiddle
(nstacks, nblocks, log2 n, n/2, 2, 2): factor l (applied l-th) has stride s = k/2, and
twiddle[c, blk, l, j*s + i] holds entry i of the four diagonals of diagonal block j.
Successive blocks alternate the stride direction; stacks are concatenated outputs.
"""
from __future__ import annotations

import numpy as np

IMPLS = ("cpu", "generic")   # every correctness check runs for both; "auto" = "cpu" on CPU


def factor_matrix(t: np.ndarray, k: int) -> np.ndarray:
  """Butterfly factor matrix B_k^(n) from t (n/2, 2, 2) (Definitions 1 and 2)."""
  n, s = 2 * t.shape[0], k // 2
  f = np.zeros((n, n), t.dtype)
  for j in range(n // k):
    d = t[j * s:(j + 1) * s]
    f[j * k:(j + 1) * k, j * k:(j + 1) * k] = np.block(
        [[np.diag(d[:, 0, 0]), np.diag(d[:, 0, 1])],
         [np.diag(d[:, 1, 0]), np.diag(d[:, 1, 1])]])
  return f


def block_sizes(n: int, nblocks: int, increasing: bool) -> list[list[int]]:
  """Block size k of every factor in application order, per block (directions alternate)."""
  log_n = n.bit_length() - 1
  out = []
  for blk in range(nblocks):
    inc = increasing if blk % 2 == 0 else not increasing
    out.append([2 ** (l + 1) if inc else n // 2 ** l for l in range(log_n)])
  return out


def butterfly_matrix(tw: np.ndarray, increasing: bool = True) -> np.ndarray:
  """(nstacks * n, n) matrix M of the whole layout; the multiply computes x @ M.T."""
  nstacks, nblocks, _, half = tw.shape[:4]
  n = 2 * half
  stacks = []
  for c in range(nstacks):
    m = np.eye(n, dtype=tw.dtype)
    for blk, ks in enumerate(block_sizes(n, nblocks, increasing)):
      for l, k in enumerate(ks):
        m = factor_matrix(tw[c, blk, l], k) @ m
    stacks.append(m)
  return np.concatenate(stacks, axis=0)


def apply_butterfly(tw: np.ndarray, x: np.ndarray, increasing: bool = True) -> np.ndarray:
  """x (batch, n) -> (batch, nstacks * n) = x @ butterfly_matrix(tw).T, one factor matrix at
  a time (cheap for large n and a small batch: no n x n product of factors)."""
  nstacks, nblocks, _, half = tw.shape[:4]
  n = 2 * half
  dtype = np.result_type(tw.dtype, x.dtype, np.float64)
  outs = []
  for c in range(nstacks):
    h = np.asarray(x, dtype).T
    for blk, ks in enumerate(block_sizes(n, nblocks, increasing)):
      for l, k in enumerate(ks):
        h = factor_matrix(np.asarray(tw[c, blk, l], dtype), k) @ h
    outs.append(h.T)
  return np.concatenate(outs, axis=1)


def padded_layer(tw: np.ndarray, x: np.ndarray, features: int, increasing: bool,
                 bias: np.ndarray | None = None) -> np.ndarray:
  """A butterfly dense layer by hand: zero-pad x (batch, in) to n, apply, cut, add bias."""
  n = 2 * tw.shape[3]
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, n - x.shape[1])))
  y = apply_butterfly(np.asarray(tw), xp, increasing)[:, :features]
  return y if bias is None else y + np.asarray(bias, np.float64)
