"""Butterfly multiply (pure JAX): a CPU-tuned path and a portable one, picked per platform.

``butterfly_multiply(..., impl=...)`` (static) selects the formulation:
* ``"cpu"``: the tuned passes described below (conditionals as fusion barriers, two
  chains, tiled transposes, hand-written VJP). These tricks exist for XLA:CPU only; on
  XLA:GPU every conditional would copy its predicate to the host and wait for the stream.
* ``"generic"``: the same radix passes, each one ``einsum`` (a batched ``dot_general``) of
  the pass matrix with the activations, differentiated by plain autodiff: no conditionals,
  no batch split, no tiled transposes, no custom VJP (so every order of AD, forward mode
  included, works). Each pass is materialised once by its dot, which XLA's fusion does not
  duplicate into the next pass (elementwise multiply-adds it would, recomputing elements
  2^m times: the trap the CPU path's conditionals avoid).
* ``"auto"`` (default): "cpu" where lowered for CPU, "generic" everywhere else, chosen
  when lowering by a primitive with per-platform lowering rules (``_platform_call``): a
  module lowered / exported for CUDA or TPU contains only the generic passes and no
  conditional at all (tests/test_export.py). Its custom VJP pairs each path's forward with
  its own backward; the residuals of the path not lowered are zeros that nothing reads.
  The generic path's speed on GPU / TPU is unmeasured (its values are checked on CPU, its
  lowering by export). A dense matmul of the materialised matrix, possibly faster on a GPU
  for small n, is left to callers (KOPS2D does it for n <= 64: ``materialize``).

Layout (ports one-to-one from the established PyTorch implementation):
``twiddle``: (nstacks, nblocks, log2 n, n/2, 2, 2). Within one block, factor ``l`` (in the
order applied) has stride ``s = 2**l`` when the stride increases (``n / 2**(l+1)`` when it
decreases); positions ``i = 2*s*j + k`` and ``i + s`` (0 <= k < s) form pair ``p = j*s + k``
and ``[y_i, y_{i+s}] = twiddle[..., l, p] @ [x_i, x_{i+s}]``. Successive blocks alternate the
stride direction. Stacks are independent butterflies of the same input, concatenated.

How the CPU version works (measured on a 2-core CPU, see experiments/bench_butterfly.py):
* Feature-major layout. x (batch, n) is transposed once to h (n, batch) (the batch is cut
  into tiles only above MAX_LANES; the transposes in and out go by 8 x 8 tiles, each in its
  own conditional, 2-3x faster than XLA's plain transpose of a slice); every factor then
  combines whole rows h[i] and h[i+s],
  contiguous vectors of the batch, so each step is a broadcast multiply-add along the
  contiguous axis whatever the stride (in batch-major layout the small strides shuffle
  inside SIMD vectors and cost several times more).
* Radix-8 passes. The row index is cut into bit groups (``radix_plan``: 3 bits, fewer for
  the remainder); the factors of one block on one group are multiplied into one
  (R x R) matrix per setting of the other row bits (tiny: n R entries, each a product of one
  twiddle per factor); one pass over h applies it with R multiply-adds per output element:
  the arithmetic of 3 radix-2 steps at 1/3 of the memory traffic.
* Row layouts. A pass writes its output with its group at the bottom of the row index when
  the block visits groups top-down, in place when bottom-up: either way the R outputs of
  one set of input rows are computed together, every input row is read once, and the rows
  are in natural order again at the end of every block (no permuting transposes). The
  current layout of every intermediate is tracked at trace time.
* Two chains. The batch is split in two halves that run as independent pass chains, which
  XLA's executor schedules on both cores (a single ~0.3 ms pass is too short for its
  intra-op split to wake the second thread in time).
* One conditional per pass. XLA's CPU fuser fuses a pass into the next one and recomputes
  every element of the first R times (the "2^L recompute" trap; optimization_barrier is
  removed before fusion on CPU); an XLA conditional is never fused, so each pass runs in
  ``lax.cond`` (both branches the same pass, so the predicate does not matter) and is
  materialised exactly once. No copy, unlike a scan over passes.
* ``jax.custom_vjp``: the input cotangent of a pass is the transposed pass (same structure,
  matrices transposed); the pass-matrix gradient is one fused batch reduction
  dM[.., o, u] = sum_b g[.., o, .., b] h[.., u, .., b]; the twiddle gradient follows from
  dM through the (tiny) matrix construction by ordinary autodiff. Activations are saved
  once per pass (not per factor). The backward is itself differentiable (reverse-over-
  reverse, and forward-over-reverse such as GraSP's H g); plain forward mode (``jax.jvp`` of
  the multiply itself) is not supported by custom_vjp.
* jaxlib 0.10.2 specifics: large single-operand sum-reduces go to YNNPACK, which gave wrong
  sums for some broadcast-product shapes, crashed on high-rank ones, and its worker threads
  slowed everything else on this busy 2-core machine; every reduce here is therefore a
  variadic (two-operand) reduce, which XLA emits itself, and the pass matrices are built
  without differentiated broadcasts. (Reverse-over-reverse still transposes broadcasts of
  the passes into plain reduces that XLA may hand to YNNPACK; checked correct up to n = 512.)
Complex numbers follow JAX's convention: cotangents are transposes, not adjoints, so the
result matches ``jax.grad`` of the straightforward implementation.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
from jax.interpreters import ad, batching, mlir

# Largest pass radix, as log2. Radix 8 (three factors per pass) measured fastest at batch 256:
# 8 multiply-adds per output element are still cheaper than a further pass over memory.
MAX_RADIX_LOG = 3
# Largest batch tile of the internal layout (see ``_lanes``).
MAX_LANES = 512
# Independent chains of passes (one per core) for batches of at least CHAINS * MIN_CHUNK.
CHAINS = 2
MIN_CHUNK = 64


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


def _expand_bits(t: jax.Array, src: list[str], dst: list[str], copies: bool) -> jax.Array:
  """Reorders the named axes of t to ``dst``; an axis of dst missing from src (always a
  size-2 bit) is a broadcast, or two stacked copies if ``copies``.

  Copies where the construction is differentiated: the VJP of a copy is slices and adds,
  whereas the VJP of a broadcast is a reduce, and jaxlib 0.10.2 sends such reduces to
  YNNPACK, which crashed on these high-rank shapes (upstream jax #39257). Broadcasts (one
  fused op instead of a chain of small ones) where it is not: the plain forward.
  """
  t = jnp.transpose(t, [src.index(a) for a in dst if a in src])
  for pos, a in enumerate(dst):
    if a not in src:
      t = jnp.stack([t, t], axis=pos) if copies else jnp.expand_dims(t, pos)
  return t if copies else jnp.broadcast_to(t, tuple(2 if a not in src else d for a, d in
                                                     zip(dst, t.shape)))


def _group_matrix(factors: list[jax.Array], sizes: list[int], j: int, inc: bool,
                  layout: tuple[int, ...], copies: bool) -> jax.Array:
  """Product of the factors on group j of one block, laid out as the pass reads it.

  factors: the block's log_n twiddle factors in application order, each (C, n/2, 2, 2);
  sizes: group sizes (group 0 = lowest bits); layout: the pass's input row layout.
  Returns M (C, *other groups in layout order, R_o, R_u): output / input bits of group j.

  Each entry is a product of one twiddle entry per factor (a butterfly has exactly one path
  from input u to output o): factor q (bit q of the group) maps bit q from u_q to o_q, and
  its pair index holds the group's other bits as they are when it is applied, i.e. the
  output bits of the factors applied before it and the input bits of those after it.
  """
  log_n = len(factors)
  c = factors[0].shape[0]
  m = sizes[j].bit_length() - 1
  lo = sum(sz.bit_length() - 1 for sz in sizes[:j])
  above = [f"G{a}" for a in range(len(sizes) - 1, j, -1)]   # natural order: most significant
  below = [f"G{a}" for a in range(j - 1, -1, -1)]
  obits = [f"o{b}" for b in reversed(range(m))]
  ubits = [f"u{b}" for b in reversed(range(m))]
  dst = ["c"] + [f"G{a}" for a in layout if a != j] + obits + ubits
  shape = {f"G{a}": sizes[a] for a in range(len(sizes))}
  mat = None
  for q in range(m):
    l = lo + q if inc else log_n - 1 - (lo + q)
    # Pair p = J * 2^(lo+q) + K with J = (groups above, bits above q) and
    # K = (bits below q, groups below): a pure reshape of the factor.
    hi = [("o" if not inc else "u") + str(b) for b in reversed(range(q + 1, m))]
    low = [("o" if inc else "u") + str(b) for b in reversed(range(q))]
    src = ["c"] + above + hi + low + below + [f"o{q}", f"u{q}"]
    t = factors[l].reshape((c,) + tuple(shape.get(a, 2) for a in src[1:]))
    a_q = _expand_bits(t, src, dst, copies)
    mat = a_q if mat is None else mat * a_q
  return mat.reshape(mat.shape[:len(dst) - 2 * m] + (2 ** m, 2 ** m))


def _groups(log_n: int) -> list[tuple[int, int]]:
  """Bit groups (lo, m) of the row index, group j = bits lo .. lo+m-1, j = 0 lowest."""
  out, lo = [], 0
  for m in radix_plan(log_n):
    out.append((lo, m))
    lo += m
  return out


def _plan(nblocks: int, log_n: int, increasing_stride: bool) -> list[tuple[int, int, bool]]:
  """Passes in application order: (block, group, increasing)."""
  npass = len(radix_plan(log_n))
  passes = []
  for blk in range(nblocks):
    inc = increasing_stride if blk % 2 == 0 else not increasing_stride
    order = range(npass) if inc else reversed(range(npass))
    passes += [(blk, j, inc) for j in order]
  return passes


def _natural(npass: int) -> tuple[int, ...]:
  """Row layout of natural order: groups from the most significant (top) down."""
  return tuple(reversed(range(npass)))


def _after(layout: tuple[int, ...], j: int, to_bottom: bool) -> tuple[int, ...]:
  """Row layout after a pass on group j: j moved to the bottom, or left in place."""
  if not to_bottom:
    return layout
  return tuple(g for g in layout if g != j) + (j,)


# Which passes move their group to the bottom of the row index. A pass iterates over its
# output rows in layout order and reads, per output row, the R rows of the input group: with
# the group at (or near) the bottom the R outputs of one set of input rows are computed
# together and every input row is read once. Passes that process groups top-down move them
# to the bottom (after a whole block the order is natural again: a full rotation); passes
# that process groups bottom-up leave them in place (the low groups already sit near the
# bottom; a rotation would end the block in reversed group order and need a high-rank
# transpose at the end, which XLA emits as a slow strided copy).
def _to_bottom(top_down: bool) -> bool:
  return top_down


def _layouts(plan, npass: int) -> list[tuple[int, ...]]:
  """Input row layout of every pass of the forward chain, plus the final one (natural)."""
  lays = [_natural(npass)]
  for _, j, inc in plan:
    lays.append(_after(lays[-1], j, _to_bottom(not inc)))
  return lays


def _factors(twiddle: jax.Array, mat_dtype) -> list[list[jax.Array]]:
  """twiddle -> [block][factor] arrays (C, n/2, 2, 2) in ``mat_dtype``."""
  tw = twiddle.astype(mat_dtype)
  return [[tw[:, blk, l] for l in range(tw.shape[2])] for blk in range(tw.shape[1])]


def _pass_matrices(factors: list[list[jax.Array]], increasing_stride: bool,
                   copies: bool = True) -> list[jax.Array]:
  """Per pass, its matrix laid out as the pass reads it: (C, *other groups, R_o, R_u), the
  other groups in the order of the pass's input layout (see ``_expand_bits`` for copies)."""
  log_n = len(factors[0])
  sizes = [2 ** m for _, m in _groups(log_n)]
  plan = _plan(len(factors), log_n, increasing_stride)
  return [_group_matrix(factors[blk], sizes, j, inc, lay, copies)
          for (blk, j, inc), lay in zip(plan, _layouts(plan, len(sizes)))]


# ------------------------------------------------------------------ passes over activations


# Activations inside the multiply are (nt, C, n, T): the batch is split into nt tiles of T
# lanes (usually one tile: T = batch) and every row i of a stack c is a contiguous vector of
# the T lanes of one tile ("feature-major"): each factor combines whole rows i and i + s,
# a broadcast multiply-add along the contiguous axis whatever the stride.


def _lanes(batch: int) -> int:
  """Lanes T per tile: the whole batch up to MAX_LANES, else the largest power of 2 <=
  MAX_LANES dividing it (if that is >= 16, else the whole batch). Long rows measured best
  (tiles of 16 lanes made the batch reductions of the backward 2x slower); tiling only
  keeps the transposes of very large batches to a bounded number of streams."""
  if batch <= MAX_LANES:
    return batch
  t = math.gcd(batch, MAX_LANES)
  return t if t >= 16 else batch


def _view(h: jax.Array, layout: tuple[int, ...], sizes: list[int]) -> jax.Array:
  """(nt, C, n, T) -> (nt, C, *group sizes in layout order, T)."""
  return h.reshape(h.shape[:2] + tuple(sizes[g] for g in layout) + h.shape[-1:])


def _apply_pass(mat: jax.Array, h: jax.Array, layout: tuple[int, ...], j: int,
                sizes: list[int], to_bottom: bool) -> jax.Array:
  """One pass on group j: h (nt, Ci, n, T) in ``layout`` -> (nt, C, n, T) in
  ``_after(layout, j, to_bottom)``. Ci in {1, C} (1: the input shared by the stacks).

  y[.., o, .., t] = sum_u M[.., o, u] h[.., u, .., t]: every output row is a broadcast
  multiply-add of R whole input rows (contiguous vectors of lanes).
  """
  hv = _view(h, layout, sizes)
  ax = 2 + layout.index(j)
  y = sum(mat[None, ..., u, None] * jax.lax.index_in_dim(hv, u, ax, keepdims=False)[..., None, :]
          for u in range(sizes[j]))                           # [nt, c, *others, o, t]
  if not to_bottom:
    y = jnp.moveaxis(y, -2, ax)
  return y.reshape(h.shape[0], mat.shape[0], -1, h.shape[-1])


def _apply_pass_t(mat: jax.Array, g: jax.Array, layout: tuple[int, ...], j: int,
                  sizes: list[int], ci: int, fwd_layout: tuple[int, ...],
                  to_bottom: bool) -> jax.Array:
  """Transpose of a pass (input cotangent): g (nt, C, n, T) in ``layout`` -> (nt, ci, n, T)
  in ``_after(layout, j, to_bottom)``. ``fwd_layout`` is the pass's forward input layout
  (the order of the other groups in ``mat``).

  For ci == 1 (input shared by the stacks) the stack sum is part of the same elementwise
  expression: no reduce op (see ``_pass_matrix_grad`` for why reduces are avoided).
  """
  c = mat.shape[0]
  others_fwd = [a for a in fwd_layout if a != j]
  others = [a for a in layout if a != j]
  nd = len(others)
  # mat [c, *others_fwd, o, u] -> [c, *others, o, u]
  mat = jnp.transpose(mat, [0] + [1 + others_fwd.index(a) for a in others] + [nd + 1, nd + 2])
  gv = _view(g, layout, sizes)
  ax = 1 + layout.index(j)                                     # in gv[:, k]
  stacks = [slice(None)] if ci == c else [slice(k, k + 1) for k in range(c)]
  d = sum(mat[None, k, ..., o, :, None]
          * jax.lax.index_in_dim(gv[:, k], o, ax + 1, keepdims=False)[..., None, :]
          for k in stacks for o in range(sizes[j]))           # [nt, c, *others, u, t]
  if not to_bottom:
    d = jnp.moveaxis(d, -2, ax + 1)
  return d.reshape(g.shape[0], ci, -1, g.shape[-1])


def _sum_pair(xs: tuple[jax.Array, jax.Array], axis: int) -> tuple[jax.Array, jax.Array]:
  """Sums two same-shape arrays over ``axis`` with one variadic XLA reduce.

  Why variadic: jaxlib 0.10.2 hands large single-operand sum-reduces to its YNNPACK
  fusion, which returned wrong sums for some broadcast-product shapes here (upstream
  XNNPACK #11243) and starves XLA's own threads on a busy 2-core machine; a reduce with
  two operands is always emitted by XLA itself.
  """
  zero = jnp.zeros((), xs[0].dtype)
  return jax.lax.reduce(xs, (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), (axis,))


def _pass_matrix_grad(g: jax.Array, h: jax.Array, g_layout: tuple[int, ...],
                      h_layout: tuple[int, ...], j: int, sizes: list[int]) -> jax.Array:
  """dM[c, .., o, u] = sum over the batch of g[.., c, ..(o).., t] h[.., c, ..(u).., t].

  g: (nt, C, n, T) cotangent of the pass output in ``g_layout``; h: (nt, Ci, n, T) the
  pass input (Ci in {1, C}) in ``h_layout`` (the pass's forward input layout, which also
  orders the other groups of the result, as in the pass matrix). First reduce: over the
  tiles, keeping the T lanes as the contiguous (SIMD) axis; second: over the lanes. (One
  reduce over a contiguous axis is a serial add chain without fast math: 3-5x slower.)
  The product is never materialised (fused into the reduce).
  """
  others = [a for a in h_layout if a != j]

  t = g.shape[-1]
  lanes = math.gcd(t, 16)

  def canon(v, layout):  # -> [c, *others, group j, tiles, t_hi, t_lo]
    v = _view(v, layout, sizes)
    v = jnp.transpose(v, [1] + [2 + layout.index(a) for a in others + [j]] + [0, v.ndim - 1])
    return v.reshape(v.shape[:-1] + (t // lanes, lanes))

  gv = canon(g, g_layout)[..., :, None, :, :, :]             # [c, .., o, 1, nt, t_hi, t_lo]
  hv = canon(h, h_layout)[..., None, :, :, :, :]             # [c, .., 1, u, nt, t_hi, t_lo]
  prod = gv * hv
  half = sizes[j] // 2                                        # the two reduce operands: o halves
  o_ax = prod.ndim - 5
  zero = jnp.zeros((), prod.dtype)
  parts = jax.lax.reduce((jax.lax.slice_in_dim(prod, 0, half, axis=o_ax),
                          jax.lax.slice_in_dim(prod, half, sizes[j], axis=o_ax)),
                         (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]),
                         (prod.ndim - 3, prod.ndim - 2))     # over tiles and t_hi
  parts = _sum_pair(parts, prod.ndim - 3)                     # over the lanes
  return jnp.concatenate(parts, axis=o_ax)


def _backward_step(mat, g, h, g_layout, h_layout, j, sizes, to_bottom):
  """(input cotangent, pass-matrix gradient) of one pass; g (nt, C, n, T), h (nt, Ci, n, T)."""
  return (_apply_pass_t(mat, g, g_layout, j, sizes, h.shape[1], h_layout, to_bottom),
          _pass_matrix_grad(g, h, g_layout, h_layout, j, sizes))


def _predicate(a: jax.Array) -> jax.Array:
  """A boolean XLA cannot evaluate at compile time (true unless a starts with a NaN)."""
  first = a.reshape(-1)[0]
  return first == first


def _barrier(fn, pred: jax.Array, *args):
  """fn(*args) inside an XLA conditional, so that its result is materialised exactly once.

  Both branches are ``fn``, so the predicate (``_predicate``, computed once per call)
  cannot change the result; it only has to be unknown at compile time. Without this XLA
  fuses a pass into the next one (recomputing elements 2^m times) and fuses the layout
  transposes into the batch reductions (strided reads, 20x slower).
  """
  return jax.lax.cond(pred, fn, fn, *args)


def _run_passes(mats, plan, sizes, hs0, pred):
  """Runs the pass chain on every batch chunk (independent chains, see ``_chunks``).
  Returns the final activations and, per pass, the inputs of every chunk."""
  hs, h = [], list(hs0)
  for mat, (_, j, inc), lay in zip(mats, plan, _layouts(plan, len(sizes))):
    hs.append(h)
    fn = functools.partial(_apply_pass, layout=lay, j=j, sizes=sizes,
                           to_bottom=_to_bottom(not inc))
    h = [_barrier(fn, pred, mat, hk) for hk in h]
  return h, hs


def _chunks(batch: int) -> list[tuple[int, int]]:
  """Batch ranges processed as independent chains of passes.

  XLA splits a loop fusion over the two cores, but at ~0.1 ms per half the second thread
  is rarely awake in time and the calling thread runs both halves (measured: wall time =
  CPU time for every pass). Two independent chains are scheduled concurrently by XLA's
  executor instead."""
  if batch < MIN_CHUNK * CHAINS:
    return [(0, batch)]
  step = -(-batch // CHAINS)
  return [(s, min(s + step, batch)) for s in range(0, batch, step)]


# ------------------------------------------------------------------ public API


def _dtypes(twiddle: jax.Array, x: jax.Array):
  dtype = jnp.result_type(twiddle.dtype, x.dtype)
  # Pass matrices stay real for a real twiddle (with the precision of the result).
  mat_dtype = jnp.result_type(twiddle.dtype, jnp.finfo(dtype).dtype)
  return dtype, mat_dtype


# Side of the square tiles of the layout transposes (batch-major <-> feature-major).
TRANSPOSE_TILE = 8


def _tiled_transpose(v: jax.Array, pred: jax.Array) -> jax.Array:
  """(..., R, S) -> (..., S, R), as 8 x 8 tiles, materialised once.

  XLA:CPU transposes a (128, 4096) float32 slice of a larger array at ~1.2 ms, but the same
  data as a materialised operand, viewed as (R/8, 8, S/8, 8) tiles, at ~0.4 ms (measured
  here, quiet machine); the conditional keeps the producing slice / pass out of the transpose's
  loop. Falls back to a plain transpose when R or S is not a multiple of the tile.
  """
  *lead, r, s = v.shape
  k = TRANSPOSE_TILE
  nl = len(lead)
  if r % k or s % k:
    return _barrier(lambda a: jnp.swapaxes(a, -1, -2), pred, v)

  def tr(a):
    a = a.reshape(*lead, r // k, k, s // k, k)
    perm = list(range(nl)) + [nl + 2, nl + 3, nl, nl + 1]
    return jnp.transpose(a, perm).reshape(*lead, s, r)
  return _barrier(tr, pred, v)


def _to_tiles(x: jax.Array, dtype, pred: jax.Array, c: int = 1) -> jax.Array:
  """x (B, C * n) -> (nt, C, n, T) in ``dtype``: per tile of T rows, one transpose."""
  b, cn = x.shape
  t = _lanes(b)
  h = _tiled_transpose(x.astype(dtype).reshape(b // t, t, cn), pred)  # (nt, C*n, T)
  return h.reshape(b // t, c, cn // c, t)


def _from_tiles(h: jax.Array, layout: tuple[int, ...], sizes: list[int],
                pred: jax.Array) -> jax.Array:
  """h (nt, C, n, T) with rows in ``layout`` -> (B, C * n) with rows in natural order."""
  nt, c, _, t = h.shape
  nat = _natural(len(sizes))
  if tuple(layout) != nat:
    v = _view(h, layout, sizes)
    v = jnp.transpose(v, [0, 1] + [2 + layout.index(a) for a in nat] + [v.ndim - 1])
    h = v.reshape(nt, c, -1, t)
  return _tiled_transpose(h.reshape(nt, -1, t), pred).reshape(nt * t, -1)


def _forward(twiddle, x, increasing_stride, copies):
  dtype, mat_dtype = _dtypes(twiddle, x)
  mats = _pass_matrices(_factors(twiddle, mat_dtype), increasing_stride, copies)
  plan = _plan(twiddle.shape[1], twiddle.shape[2], increasing_stride)
  sizes = [2 ** m for _, m in _groups(twiddle.shape[2])]
  pred = _predicate(twiddle)
  h0 = [_to_tiles(x[lo:hi], dtype, pred) for lo, hi in _chunks(x.shape[0])]  # (nt, 1, n, T)
  h, hs = _run_passes(mats, plan, sizes, h0, pred)
  final = _layouts(plan, len(sizes))[-1]
  return jnp.concatenate([_from_tiles(hk, final, sizes, pred) for hk in h], axis=0), hs


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _butterfly(twiddle, x, increasing_stride):
  return _forward(twiddle, x, increasing_stride, copies=False)[0]


def _butterfly_fwd(twiddle, x, increasing_stride):
  y, hs = _forward(twiddle, x, increasing_stride, copies=True)
  # The scalar only records x's dtype for the cotangent (keeps x itself out of residuals).
  return y, (twiddle, hs, jnp.zeros((), x.dtype))


def _cotangent(ct: jax.Array, dtype) -> jax.Array:
  """Cast a cotangent to its primal's dtype (real part for a real primal, as JAX does)."""
  if jnp.iscomplexobj(ct) and not jnp.issubdtype(dtype, jnp.complexfloating):
    ct = ct.real
  return ct.astype(dtype)


def _butterfly_bwd(increasing_stride, res, gy):
  twiddle, hs, x_witness = res
  dtype = hs[0][0].dtype
  c, log_n = twiddle.shape[0], twiddle.shape[2]
  b = gy.shape[0]
  plan = _plan(twiddle.shape[1], log_n, increasing_stride)
  sizes = [2 ** m for _, m in _groups(log_n)]
  fwd_layouts = _layouts(plan, len(sizes))
  _, mat_dtype = _dtypes(twiddle, x_witness)
  # Autodiff of the tiny matrix construction w.r.t. the individual factors; the twiddle
  # cotangent is then assembled by stacking (differentiating the slicing instead would
  # add one zero-padded twiddle-sized array per factor).
  mats, mats_vjp = jax.vjp(lambda f: _pass_matrices(f, increasing_stride),
                           _factors(twiddle, mat_dtype))
  # The cotangent chain has its own row layouts (each step writes its group at the bottom).
  g_layout = _natural(len(sizes))
  pred = _predicate(twiddle)
  g = [_to_tiles(gy[lo:hi], dtype, pred, c) for lo, hi in _chunks(b)]  # (nt, C, n, T)
  dmats = [None] * len(plan)
  for i in reversed(range(len(plan))):
    _, j, inc = plan[i]
    to_bottom = _to_bottom(inc)   # the backward visits a block's groups in reverse order
    # One conditional per step: both consumers of g (and of h) live inside it, so a
    # transposed layout XLA may pick for them is converted once, not read strided.
    step = functools.partial(_backward_step, g_layout=g_layout, h_layout=fwd_layouts[i],
                             j=j, sizes=sizes, to_bottom=to_bottom)
    outs = [_barrier(step, pred, mats[i], gk, hk) for gk, hk in zip(g, hs[i])]
    g = [o[0] for o in outs]
    g_layout = _after(g_layout, j, to_bottom)
    dmats[i] = _cotangent(functools.reduce(jnp.add, [o[1] for o in outs]), mat_dtype)
  (dfactors,) = mats_vjp(dmats)
  dtwiddle = _cotangent(jnp.stack([jnp.stack(df, axis=1) for df in dfactors], axis=1),
                        twiddle.dtype)
  dx = _cotangent(jnp.concatenate([_from_tiles(gk, g_layout, sizes, pred) for gk in g], axis=0),
                  x_witness.dtype)
  return dtwiddle, dx


_butterfly.defvjp(_butterfly_fwd, _butterfly_bwd)


# ------------------------------------------------------------------ generic (portable) path


def _generic_plan(log_n: int, nblocks: int, increasing_stride: bool):
  """Passes of the generic path: [(block, group, increasing, layout, einsum equation)].

  Activations are named axes: z (batch), s (stack), one capital letter per row bit group
  (A = lowest). The first pass reads x as (z, *groups) and the last writes (z, s, *groups)
  in natural order, so the layout changes live inside the contractions (no separate
  transposes); in between the activations are (s, *groups, z), batch lanes last, the order
  in which dot_general returns them (batch dims = stack and other groups, then the pass's
  output group, then the lanes), so every pass moves its group to the bottom.
  """
  sizes = [2 ** m for _, m in _groups(log_n)]
  plan = _plan(nblocks, log_n, increasing_stride)
  name = [chr(ord("A") + g) for g in range(len(sizes))]
  nat = _natural(len(sizes))
  lay = nat
  h_sub = "z" + "".join(name[g] for g in nat)
  out = []
  for i, (blk, j, inc) in enumerate(plan):
    others = "".join(name[g] for g in lay if g != j)
    if i == len(plan) - 1:
      out_sub = "zs" + "".join("o" if g == j else name[g] for g in nat)
    else:
      out_sub = "s" + others + "oz"
    out.append((blk, j, inc, lay, f"s{others}ou,{h_sub.replace(name[j], 'u')}->{out_sub}"))
    h_sub = out_sub.replace("o", name[j])
    lay = _after(lay, j, True)
  return sizes, out


def _generic_mats(twiddle: jax.Array, mat_dtype, sizes, passes) -> list[jax.Array]:
  """Pass matrices (C, *other groups in the pass's layout, R, R); copies=True because the
  construction is differentiated (see ``_expand_bits``)."""
  factors = _factors(twiddle, mat_dtype)
  return [_group_matrix(factors[blk], sizes, j, inc, lay, copies=True)
          for blk, j, inc, lay, _ in passes]


def _generic_pass(eq: str, mat: jax.Array, h: jax.Array, dtype) -> jax.Array:
  """One radix pass as one contraction (a batched dot_general). Float32 runs at HIGHEST
  precision: a pass contracts only R <= 8 terms, so it is memory bound, and the TF32 /
  bfloat16 dots that GPUs / TPUs use by default would lose accuracy over log2(n) passes
  that the CPU path does not lose."""
  return jnp.einsum(eq, mat, h, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=dtype)


def _generic_fwd(twiddle: jax.Array, x: jax.Array, increasing_stride: bool
                 ) -> tuple[jax.Array, list[jax.Array]]:
  """(y, the input of every pass)."""
  dtype, mat_dtype = _dtypes(twiddle, x)
  b = x.shape[0]
  sizes, passes = _generic_plan(twiddle.shape[2], twiddle.shape[1], increasing_stride)
  mats = _generic_mats(twiddle, mat_dtype, sizes, passes)
  h = x.astype(dtype).reshape((b,) + tuple(sizes[g] for g in _natural(len(sizes))))
  hs = []
  for mat, (*_, eq) in zip(mats, passes):
    hs.append(h)
    h = _generic_pass(eq, mat, h, dtype)
  return h.reshape(b, -1), hs


def _generic(twiddle: jax.Array, x: jax.Array, increasing_stride: bool) -> jax.Array:
  """The portable multiply; differentiated by plain autodiff (any order, forward mode too)."""
  return _generic_fwd(twiddle, x, increasing_stride)[0]


def _generic_bwd(twiddle: jax.Array, x_witness: jax.Array, hs: list[jax.Array],
                 gy: jax.Array, increasing_stride: bool) -> tuple[jax.Array, jax.Array]:
  """(dtwiddle, dx) from the saved pass inputs: what autodiff of ``_generic`` computes,
  written out so that ``impl="auto"`` can pair it with the CPU path's VJP."""
  dtype, mat_dtype = _dtypes(twiddle, x_witness)
  sizes, passes = _generic_plan(twiddle.shape[2], twiddle.shape[1], increasing_stride)
  mats, mats_vjp = jax.vjp(lambda t: _generic_mats(t, mat_dtype, sizes, passes), twiddle)
  b, c = gy.shape[0], twiddle.shape[0]
  g = gy.astype(dtype).reshape((b, c) + tuple(sizes[k] for k in _natural(len(sizes))))
  dmats = [None] * len(passes)
  for i in reversed(range(len(passes))):
    # The forward half of this vjp is dead code (its output is not used).
    _, pullback = jax.vjp(functools.partial(_generic_pass, passes[i][-1], dtype=dtype),
                          mats[i], hs[i])
    dmats[i], g = pullback(g)
  (dtwiddle,) = mats_vjp(dmats)
  return _cotangent(dtwiddle, twiddle.dtype), _cotangent(g.reshape(b, -1), x_witness.dtype)


# ------------------------------------------------------------------ platform switch
#
# ``jax.lax.platform_dependent`` lowers, even for a single platform, to a conditional that
# maps the (constant) platform index onto the kept branch, plus a one-branch conditional:
# compilers fold both, but the module still holds multi-branch ``stablehlo.case`` ops. The
# primitive below has per-platform lowering rules instead, so a module lowered for one
# platform holds exactly one implementation and no conditional (for several platforms at
# once JAX dispatches the rules on the platform index itself). Its differentiation rule
# falls back to ``platform_dependent``: first-order reverse mode never reaches it (the
# custom VJP of ``_auto`` calls the primitive separately for the forward and the backward),
# higher orders (e.g. GraSP's Hessian-gradient product) get the constant-index conditional.

_platform_call_p = jax.extend.core.Primitive("butterfly_platform_call")
_platform_call_p.multiple_results = True


def _platform_call(*args, cpu, default):
  """``cpu(*args)`` where lowered for CPU, ``default(*args)`` elsewhere; both branches must
  return the same pytree of arrays with the same shapes and dtypes, and must not close over
  arrays (they are traced to jaxprs of ``args`` alone)."""
  flat, in_tree = jax.tree.flatten(args)
  flat_fn = lambda fn: (lambda *leaves: fn(*jax.tree.unflatten(in_tree, leaves)))
  avals = [jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in flat]
  cj, c_out = jax.make_jaxpr(flat_fn(cpu), return_shape=True)(*avals)
  dj, d_out = jax.make_jaxpr(flat_fn(default), return_shape=True)(*avals)
  if jax.tree.structure(c_out) != jax.tree.structure(d_out) or [
      (o.shape, o.dtype) for o in jax.tree.leaves(c_out)] != [
      (o.shape, o.dtype) for o in jax.tree.leaves(d_out)]:
    raise TypeError(f"_platform_call: branches differ: {c_out} vs {d_out}")
  outs = _platform_call_p.bind(*flat, cpu=cj, default=dj)
  return jax.tree.unflatten(jax.tree.structure(c_out), outs)


def _platform_call_impl(*args, cpu, default):
  """Eager evaluation (outside jit, e.g. under ``jax.disable_jit``): by the arguments' devices."""
  platforms = {d.platform for a in args if isinstance(a, jax.Array) for d in a.devices()}
  use_cpu = platforms == {"cpu"} if platforms else jax.default_backend() == "cpu"
  return jax.extend.core.jaxpr_as_fun(cpu if use_cpu else default)(*args)


def _platform_call_lowering(ctx, *args, cpu, default, use_cpu: bool):
  fn = jax.extend.core.jaxpr_as_fun(cpu if use_cpu else default)
  return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)


def _platform_call_jvp(primals, tangents, *, cpu, default):
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  fn = lambda *a: jax.lax.platform_dependent(
      *a, cpu=jax.extend.core.jaxpr_as_fun(cpu), default=jax.extend.core.jaxpr_as_fun(default))
  return jax.jvp(fn, tuple(primals), tuple(tangents))


def _platform_call_batch(args, dims, *, cpu, default):
  vm = lambda j: jax.vmap(jax.extend.core.jaxpr_as_fun(j), in_axes=tuple(dims), out_axes=0)
  outs = _platform_call(*args, cpu=vm(cpu), default=vm(default))
  return outs, [0] * len(outs)


_platform_call_p.def_impl(_platform_call_impl)
_platform_call_p.def_abstract_eval(lambda *avals, cpu, default: cpu.out_avals)
mlir.register_lowering(_platform_call_p,
                       functools.partial(_platform_call_lowering, use_cpu=False))
mlir.register_lowering(_platform_call_p,
                       functools.partial(_platform_call_lowering, use_cpu=True), platform="cpu")
ad.primitive_jvps[_platform_call_p] = _platform_call_jvp
batching.primitive_batchers[_platform_call_p] = _platform_call_batch


def _with_zeros(fn, shapes_a, shapes_b, first: bool):
  """fn(*a) -> (y, res); returns (y, res, zeros like the other branch's res) or (y, zeros,
  res): the two branches of a platform call must return the same residual structure."""
  def wrapped(*args):
    y, res = fn(*args)
    other = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes_b if first else shapes_a)
    return (y, res, other) if first else (y, other, res)
  return wrapped


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _auto(twiddle, x, increasing_stride):
  return _platform_call(twiddle, x,
                        cpu=lambda t, v: _butterfly(t, v, increasing_stride),
                        default=lambda t, v: _generic(t, v, increasing_stride))


def _auto_fwd(twiddle, x, increasing_stride):
  cpu = lambda t, v: (lambda out: (out[0], out[1][1]))(_butterfly_fwd(t, v, increasing_stride))
  gen = lambda t, v: _generic_fwd(t, v, increasing_stride)
  res_cpu = jax.eval_shape(cpu, twiddle, x)[1]
  res_gen = jax.eval_shape(gen, twiddle, x)[1]
  y, hs_cpu, hs_gen = _platform_call(twiddle, x, cpu=_with_zeros(cpu, res_cpu, res_gen, True),
                                     default=_with_zeros(gen, res_cpu, res_gen, False))
  return y, (twiddle, hs_cpu, hs_gen, jnp.zeros((), x.dtype))


def _auto_bwd(increasing_stride, res, gy):
  twiddle, hs_cpu, hs_gen, x_witness = res
  cpu = lambda t, hc, hg, w, g: _butterfly_bwd(increasing_stride, (t, hc, w), g)
  gen = lambda t, hc, hg, w, g: _generic_bwd(t, w, hg, g, increasing_stride)
  return _platform_call(twiddle, hs_cpu, hs_gen, x_witness, gy, cpu=cpu, default=gen)


_auto.defvjp(_auto_fwd, _auto_bwd)


# ------------------------------------------------------------------ public API

IMPLS = ("auto", "cpu", "generic")


def check_impl(impl: str, who: str = "butterfly_multiply") -> str:
  """Returns ``impl`` if it names an implementation, else raises one clear ValueError."""
  if not isinstance(impl, str) or impl not in IMPLS:
    raise ValueError(f"{who}: impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
  return impl


@functools.partial(jax.jit, static_argnames=("increasing_stride", "impl"))
def butterfly_multiply(twiddle: jax.Array, x: jax.Array, increasing_stride: bool = True,
                       impl: str = "auto") -> jax.Array:
  """Applies a butterfly matrix: x (batch, n) -> (batch, nstacks * n).

  twiddle (nstacks, nblocks, log2 n, n/2, 2, 2), real or complex; x real or complex; the
  result has dtype ``result_type(twiddle, x)``. ``impl`` (static): "auto" (CPU-tuned passes
  when lowered for CPU, the generic ones elsewhere), "cpu" or "generic" (module docstring).
  Differentiable in reverse mode w.r.t. both arguments, to any order; forward mode
  (``jax.jvp`` of the multiply itself) only with impl="generic" (the other two have a
  custom VJP; forward-over-reverse, e.g. Hessian-vector products, works with every impl).
  Raises ValueError for a non-2-D x, n not a power of 2, a twiddle shape that does not match
  n, or an unknown impl.
  """
  check_impl(impl)
  _check(twiddle, x)
  inc = bool(increasing_stride)
  if impl == "cpu":
    return _butterfly(twiddle, x, inc)
  if impl == "generic":
    return _generic(twiddle, x, inc)
  return _auto(twiddle, x, inc)


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


def butterfly_to_dense(twiddle: jax.Array, increasing_stride: bool = True,
                       impl: str = "auto") -> jax.Array:
  """Materialises the butterfly as a (nstacks * n, n) matrix M with y = x @ M.T."""
  n = 2 * twiddle.shape[3]
  eye = jnp.eye(n, dtype=twiddle.dtype)
  return butterfly_multiply(twiddle, eye, increasing_stride, impl).T
