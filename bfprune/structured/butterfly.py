"""Butterfly multiply (pure JAX), fast on CPU, with a hand-written VJP.

Layout (ports one-to-one from the established PyTorch implementation):
``twiddle``: (nstacks, nblocks, log2 n, n/2, 2, 2). Within one block, factor ``l`` (in the
order applied) has stride ``s = 2**l`` when the stride increases (``n / 2**(l+1)`` when it
decreases); positions ``i = 2*s*j + k`` and ``i + s`` (0 <= k < s) form pair ``p = j*s + k``
and ``[y_i, y_{i+s}] = twiddle[..., l, p] @ [x_i, x_{i+s}]``. Successive blocks alternate the
stride direction. Stacks are independent butterflies of the same input, concatenated.

How the fast version works (measured on a 2-core CPU, see experiments/bench_butterfly.py):
* Feature-major layout. x (batch, n) is transposed once to h (n, batch); every factor then
  combines whole rows h[i] and h[i + s], contiguous vectors of length batch, so each step is
  a broadcast multiply-add along the contiguous axis whatever the stride (in batch-major
  layout the small strides shuffle inside SIMD vectors and cost several times more).
* Radix-2^m passes. m consecutive factors of a block (bits lo .. lo+m-1 of the row index)
  are multiplied into one (2^m x 2^m) matrix per group of rows (tiny, built from the
  twiddles); one pass over h applies it with 2^m multiply-adds per output element. Same
  arithmetic as m radix-2 steps, 1/m of the memory traffic.
* Stockham ordering. A pass always mixes the lowest (increasing stride) or highest
  (decreasing stride) m bits of the *physical* row index and writes its outputs with those
  bits moved to the other end, so the next pass finds its bits in the same place; after a
  whole block the bit rotation is complete and the order is natural again.
* One conditional per pass. XLA's CPU fuser happily fuses a pass into the next one and then
  recomputes every element of the first 2^m times (the "2^L recompute" trap); an XLA
  conditional is never fused, so each pass runs inside ``lax.cond`` (both branches the same
  pass, so the predicate does not matter) and is materialised exactly once. This costs no
  copy, unlike a scan over passes.
* ``jax.custom_vjp``: the backward pass of a pass is the transposed pass (same structure,
  matrices transposed) for the input gradient, and one fused batch reduction
  dM[o, u, r] = sum_b g[o, r, b] h[u, r, b] for the pass matrix; the twiddle gradient
  follows from dM through the (tiny) matrix construction by ordinary autodiff. Activations
  are saved once per pass (not per factor). The backward is itself differentiable
  (reverse-over-reverse and forward-over-reverse, e.g. GraSP's H g, work); plain forward
  mode (``jax.jvp`` of the multiply itself) is not supported by custom_vjp.
Complex numbers follow JAX's convention: cotangents are transposes, not adjoints, so the
result matches ``jax.grad`` of the straightforward implementation.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Largest pass radix, as log2. Radix 8 (three factors per pass) measured fastest at batch 256:
# 8 multiply-adds per output element are still cheaper than a further pass over memory.
MAX_RADIX_LOG = 3


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
  if twiddle.shape[0] < 1 or twiddle.shape[1] < 1:
    raise ValueError(f"butterfly_multiply: nstacks and nblocks must be >= 1, got twiddle "
                     f"shape {twiddle.shape}")
  return twiddle.shape[0], twiddle.shape[1], log_n, n


def radix_plan(log_n: int, max_radix_log: int = MAX_RADIX_LOG) -> tuple[int, ...]:
  """Factors per pass for one block of log_n factors: as many max-radix passes as fit, the
  remainder spread so that no pass is radix 2 unless log_n == 1 (e.g. 13 -> 3,3,3,2,2)."""
  if log_n <= max_radix_log:
    return (log_n,)
  npass = -(-log_n // max_radix_log)
  base, extra = divmod(log_n, npass)
  return tuple(base + 1 if i < extra else base for i in range(npass))


# ------------------------------------------------------------------ pass matrices (tiny)


def _expand_bits(t: jax.Array, src: list[str], dst: list[str]) -> jax.Array:
  """Reorders the named axes of t to ``dst``; an axis of dst missing from src (always a
  size-2 bit) becomes two stacked copies.

  Stacking, not broadcasting: the VJP of a copy is slices and adds, whereas the VJP of a
  broadcast is a reduce, and jaxlib 0.10.2 sends such reduces to YNNPACK, which crashed on
  these high-rank shapes (upstream jax #39257).
  """
  t = jnp.transpose(t, [src.index(a) for a in dst if a in src])
  for pos, a in enumerate(dst):
    if a not in src:
      t = jnp.stack([t, t], axis=pos)
  return t


def _group_matrix(factors: list[jax.Array], lo: int, m: int, inc: bool) -> jax.Array:
  """Product of the factors on bits lo .. lo+m-1 of one block, per group of rows.

  factors: the block's log_n twiddle factors in application order, each (C, n/2, 2, 2).
  Returns M (C, R, R, N) indexed [c, o, u, r] (R = 2^m,
  N = n / R): output bits o, input bits u of the group, and r = k * G + g the remaining row
  bits in the order the Stockham pass sees them (k: the s = 2^lo bits below the group,
  g: the G = N / s bits above it).

  Each entry is a product of one twiddle entry per factor (a butterfly has exactly one path
  from input u to output o): factor q (bit q of the group) maps bit q from u_q to o_q, and
  its pair index holds the group's other bits as they are when it is applied, i.e. the
  output bits of the factors applied before it and the input bits of those after it.
  """
  log_n = len(factors)
  c = factors[0].shape[0]
  s = 2 ** lo
  g = (2 ** log_n) // (2 ** m * s)
  obits = [f"o{j}" for j in reversed(range(m))]     # most significant first
  ubits = [f"u{j}" for j in reversed(range(m))]
  dst = ["c", "g"] + obits + ubits + ["k"]
  mat = None
  for q in range(m):
    l = lo + q if inc else log_n - 1 - (lo + q)
    # Pair p = J * 2^(lo+q) + K with J = (g, bits above q) and K = (bits below q, k).
    t = factors[l].reshape((c, g) + (2,) * (m - 1) + (s, 2, 2))
    # Bits above q are outputs if applied before q (decreasing order), else inputs.
    above = [("o" if not inc else "u") + str(j) for j in reversed(range(q + 1, m))]
    below = [("o" if inc else "u") + str(j) for j in reversed(range(q))]
    src = ["c", "g"] + above + below + ["k", f"o{q}", f"u{q}"]
    a_q = _expand_bits(t, src, dst)
    mat = a_q if mat is None else mat * a_q
  mat = mat.reshape(c, g, 2 ** m, 2 ** m, s)
  # [c, g, o, u, k] -> [c, o, u, k, g] -> [c, o, u, r] with r = k * G + g.
  return jnp.transpose(mat, (0, 2, 3, 4, 1)).reshape(c, 2 ** m, 2 ** m, g * s)


def _plan(nblocks: int, log_n: int, increasing_stride: bool
          ) -> list[tuple[int, int, int, bool]]:
  """Passes in application order: (block, lo bit, m, increasing)."""
  passes = []
  for blk in range(nblocks):
    inc = increasing_stride if blk % 2 == 0 else not increasing_stride
    lo = 0
    groups = []
    for m in radix_plan(log_n):
      groups.append((lo, m))
      lo += m
    if not inc:  # a decreasing block starts at the top bits
      groups = [(log_n - lo_ - m, m) for lo_, m in groups]
    passes += [(blk, lo_, m, inc) for lo_, m in groups]
  return passes


def _factors(twiddle: jax.Array, mat_dtype) -> list[list[jax.Array]]:
  """twiddle -> [block][factor] arrays (C, n/2, 2, 2) in ``mat_dtype``."""
  tw = twiddle.astype(mat_dtype)
  return [[tw[:, blk, l] for l in range(tw.shape[2])] for blk in range(tw.shape[1])]


def _pass_matrices(factors: list[list[jax.Array]], increasing_stride: bool
                   ) -> list[jax.Array]:
  log_n = len(factors[0])
  return [_group_matrix(factors[blk], lo, m, inc)
          for blk, lo, m, inc in _plan(len(factors), log_n, increasing_stride)]


# ------------------------------------------------------------------ passes over activations


def _apply_pass(mat: jax.Array, h: jax.Array, inc: bool) -> jax.Array:
  """One Stockham pass: h (Ci, n, B) -> (C, n, B), Ci in {1, C} (1: input shared by stacks).

  inc: h rows viewed [r, u] (u = the lowest bits), output rows [o, r].
  dec: h rows viewed [u, r] (u = the highest bits), output rows [r, o].
  """
  c, r_, _, nn_ = mat.shape
  ci, n, b = h.shape
  if inc:
    h4 = h.reshape(ci, nn_, r_, b)
    mt = jnp.transpose(mat, (0, 2, 1, 3))                     # [c, u, o, r]
    y = sum(mt[:, u, :, :, None] * h4[:, None, :, u] for u in range(r_))       # [c, o, r, b]
  else:
    h4 = h.reshape(ci, r_, nn_, b)
    mt = jnp.transpose(mat, (0, 2, 3, 1))                     # [c, u, r, o]
    y = sum(mt[:, u, :, :, None] * h4[:, u, :, None] for u in range(r_))       # [c, r, o, b]
  return y.reshape(c, n, b)


def _apply_pass_t(mat: jax.Array, g: jax.Array, inc: bool, ci: int) -> jax.Array:
  """Transpose of ``_apply_pass`` (the input cotangent): g (C, n, B) -> (ci, n, B).

  For ci == 1 (input shared by the stacks) the stack sum is part of the same elementwise
  expression: no reduce op (see ``_pass_matrix_grad`` for why reduces are avoided).
  """
  c, r_, _, nn_ = mat.shape
  _, n, b = g.shape
  stacks = [slice(None)] if ci == c else [slice(k, k + 1) for k in range(c)]
  if inc:
    g4 = g.reshape(c, r_, nn_, b)                              # [c, o, r, b]
    mt = jnp.transpose(mat, (0, 1, 3, 2))                     # [c, o, r, u]
    d = sum(mt[k, o, :, :, None] * g4[k, o, :, None]
            for k in stacks for o in range(r_))               # [c, r, u, b]
  else:
    g4 = g.reshape(c, nn_, r_, b)                              # [c, r, o, b]
    d = sum(mat[k, o, :, :, None] * g4[k, None, :, o]
            for k in stacks for o in range(r_))               # [c, u, r, b]
  return d.reshape(ci, n, b)


def _sum_pair(xs: tuple[jax.Array, jax.Array], axis: int) -> tuple[jax.Array, jax.Array]:
  """Sums two same-shape arrays over ``axis`` with one variadic XLA reduce.

  Why variadic: jaxlib 0.10.2 hands large single-operand sum-reduces to its YNNPACK
  fusion, which returned wrong sums for some broadcast-product shapes here (upstream
  XNNPACK #11243) and starves XLA's own threads on a busy 2-core machine; a reduce with
  two operands is always emitted by XLA itself.
  """
  zero = jnp.zeros((), xs[0].dtype)
  return jax.lax.reduce(xs, (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), (axis,))


def _pass_matrix_grad(g: jax.Array, h: jax.Array, inc: bool, r_: int) -> jax.Array:
  """dM[c, o, u, r] = sum_b g[c, (o, r), b] h[c, (u, r), b]: a batch reduction per entry.

  g: (C, n, B) cotangent of the pass output, h: (Ci, n, B) pass input (Ci in {1, C}).
  The batch is split as b = (b_hi, b_lo) with b_lo <= 16 lanes: the first reduce sums over
  b_hi and keeps b_lo as the contiguous (SIMD) axis, the second sums the lanes; a single
  reduce over the contiguous axis is a serial add chain (no reassociation without fast
  math) and measured 3-5x slower. The product is never materialised (fused into the reduce).
  """
  c, n, b = g.shape
  ci = h.shape[0]
  nn_ = n // r_
  lanes = math.gcd(b, 16)
  if inc:
    g6 = g.reshape(c, r_, 1, nn_, b // lanes, lanes)
    h6 = jnp.transpose(h.reshape(ci, nn_, r_, b // lanes, lanes), (0, 2, 1, 3, 4))[:, None]
  else:
    g6 = jnp.transpose(g.reshape(c, nn_, r_, b // lanes, lanes), (0, 2, 1, 3, 4))[:, :, None]
    h6 = h.reshape(ci, 1, r_, nn_, b // lanes, lanes)
  prod = g6 * h6                                              # [c, o, u, r, b_hi, b_lo]
  half = r_ // 2                                              # the two reduce operands: o halves
  parts = _sum_pair((prod[:, :half], prod[:, half:]), 4)
  parts = _sum_pair(parts, 4)
  return jnp.concatenate(parts, axis=1)


def _backward_step(mat, g, h, inc):
  """(input cotangent, pass-matrix gradient) of one pass; g (C, n, B), h (Ci, n, B)."""
  return (_apply_pass_t(mat, g, inc, h.shape[0]),
          _pass_matrix_grad(g, h, inc, mat.shape[1]))


def _barrier(fn, *args):
  """fn(*args) inside an XLA conditional, so that its result is materialised exactly once.

  Both branches are ``fn``: the predicate (true unless args[0] starts with a NaN) cannot
  change the result, it only has to be unknown at compile time. Without it XLA fuses a
  pass into the next one (recomputing elements 2^m times) and fuses the layout transposes
  into the batch reductions (strided reads, 20x slower).
  """
  first = args[0].reshape(-1)[0]
  return jax.lax.cond(first == first, fn, fn, *args)


def _run_passes(mats, plan, h):
  hs = []
  for mat, (_, _, _, inc) in zip(mats, plan):
    hs.append(h)
    h = _barrier(functools.partial(_apply_pass, inc=inc), mat, h)
  return h, hs


# ------------------------------------------------------------------ public API


def _dtypes(twiddle: jax.Array, x: jax.Array):
  dtype = jnp.result_type(twiddle.dtype, x.dtype)
  # Pass matrices stay real for a real twiddle (with the precision of the result).
  mat_dtype = jnp.result_type(twiddle.dtype, jnp.finfo(dtype).dtype)
  return dtype, mat_dtype


def _to_feature_major(x: jax.Array, dtype) -> jax.Array:
  """x (B, n) -> (1, n, B) in ``dtype``."""
  return x.T.astype(dtype)[None]


def _to_out(h: jax.Array) -> jax.Array:
  """h (C, n, B) -> (B, C * n)."""
  c, n, b = h.shape
  return jnp.transpose(h, (2, 0, 1)).reshape(b, c * n)


def _forward(twiddle, x, increasing_stride):
  dtype, mat_dtype = _dtypes(twiddle, x)
  mats = _pass_matrices(_factors(twiddle, mat_dtype), increasing_stride)
  plan = _plan(twiddle.shape[1], twiddle.shape[2], increasing_stride)
  h0 = _to_feature_major(x, dtype)                              # (1, n, B)
  h, hs = _run_passes(mats, plan, h0)
  return _to_out(h), hs


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _butterfly(twiddle, x, increasing_stride):
  return _forward(twiddle, x, increasing_stride)[0]


def _butterfly_fwd(twiddle, x, increasing_stride):
  y, hs = _forward(twiddle, x, increasing_stride)
  # The scalar only records x's dtype for the cotangent (keeps x itself out of residuals).
  return y, (twiddle, hs, jnp.zeros((), x.dtype))


def _cotangent(ct: jax.Array, dtype) -> jax.Array:
  """Cast a cotangent to its primal's dtype (real part for a real primal, as JAX does)."""
  if jnp.iscomplexobj(ct) and not jnp.issubdtype(dtype, jnp.complexfloating):
    ct = ct.real
  return ct.astype(dtype)


def _butterfly_bwd(increasing_stride, res, gy):
  twiddle, hs, x_witness = res
  dtype = hs[0].dtype
  c = twiddle.shape[0]
  b = gy.shape[0]
  n = hs[0].shape[1]
  plan = _plan(twiddle.shape[1], twiddle.shape[2], increasing_stride)
  _, mat_dtype = _dtypes(twiddle, x_witness)
  # Autodiff of the tiny matrix construction w.r.t. the individual factors; the twiddle
  # cotangent is then assembled by stacking (differentiating the slicing instead would
  # add one zero-padded twiddle-sized array per factor).
  mats, mats_vjp = jax.vjp(lambda f: _pass_matrices(f, increasing_stride),
                           _factors(twiddle, mat_dtype))
  g = jnp.transpose(gy.astype(dtype).reshape(b, c, n), (1, 2, 0))  # (C, n, B)
  dmats = [None] * len(plan)
  for i in reversed(range(len(plan))):
    inc = plan[i][3]
    mat, h = mats[i], hs[i]
    # One conditional per step: both consumers of g (and of h) live inside it, so a
    # transposed layout XLA may pick for them is converted once, not read strided.
    g, dm = _barrier(functools.partial(_backward_step, inc=inc), mat, g, h)
    dmats[i] = _cotangent(dm, mat_dtype)
  (dfactors,) = mats_vjp(dmats)
  dtwiddle = _cotangent(jnp.stack([jnp.stack(df, axis=1) for df in dfactors], axis=1),
                        twiddle.dtype)
  dx = _cotangent(g[0].T, x_witness.dtype)
  return dtwiddle, dx


_butterfly.defvjp(_butterfly_fwd, _butterfly_bwd)


@functools.partial(jax.jit, static_argnames=("increasing_stride",))
def butterfly_multiply(twiddle: jax.Array, x: jax.Array,
                       increasing_stride: bool = True) -> jax.Array:
  """Applies a butterfly matrix: x (batch, n) -> (batch, nstacks * n).

  twiddle (nstacks, nblocks, log2 n, n/2, 2, 2), real or complex; x real or complex; the
  result has dtype ``result_type(twiddle, x)``. Differentiable in reverse mode (custom VJP)
  w.r.t. both arguments. Raises ValueError for a non-2-D x, n not a power of 2, or a twiddle
  shape that does not match n.
  """
  _check(twiddle, x)
  return _butterfly(twiddle, x, bool(increasing_stride))


def butterfly_multiply_reference(twiddle: jax.Array, x: jax.Array,
                                 increasing_stride: bool = True) -> jax.Array:
  """Slow, obviously-correct version (one einsum per factor); same contract, for checks."""
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
