"""Pruning scores on the masked network θ⊙m: Rand, Mag, SNIP, GraSP, SynFlow.

Every function is pure and works with any ``flax.linen`` model through ``apply_fn(params, x) ->
logits``, the caller's *deterministic* forward (dropout off, norms in inference mode), e.g.
``lambda p, x: model.apply({'params': p}, x, train=False)``. Scores mirror ``params``: a float
array on each leaf whose mask is an array, ``None`` where the mask is ``None``. Higher scores
are kept (see ``masks.masks_from_scores``).

Scores are computed on the masked network: the forward pass sees ``params ⊙ masks``,
gradients are taken with respect to the raw ``params`` through that product (so a pruned
weight's gradient is 0), and the θ in every score is the masked θ, so pruned weights score 0
(they are never re-kept anyway). Non-prunable leaves (biases, norms) take part in every forward
pass unchanged (for SynFlow: as |θ|).

The data-driven losses are the *mean* softmax cross-entropy over the whole prune batch
``(x, y)`` (x: (n, ...), y: (n,) integer labels), i.e. per-example gradients summed then
divided by n. The SynFlow code base sums per-minibatch means instead and divides SNIP / GraSP
scores by their sum; both are positive rescalings of every score, so masks are identical.
Large batches are processed in chunks of ``chunk_size`` examples (padded, zero-weighted), one
jitted kernel call per chunk.

Jitted kernels take ``apply_fn`` as a static argument: pass the same function object across
calls (e.g. build it once, or use ``schedule.make_score_fn``) to compile once.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bfprune import float64
from bfprune.pruning.masks import PyTree, apply_masks, is_none, tree_map_masked

ApplyFn = Callable[[PyTree, jax.Array], jax.Array]
Batch = tuple[Any, Any]

DEFAULT_CHUNK = 256


def _check_masks(params: PyTree, masks: PyTree) -> None:
  p_def = jax.tree.structure(params)
  m_leaves, m_def = jax.tree.flatten(masks, is_leaf=is_none)
  if m_def.num_leaves != p_def.num_leaves:
    raise ValueError("masks must mirror params (same tree, None on non-prunable leaves); got "
                     f"{m_def.num_leaves} mask leaves for {p_def.num_leaves} params")
  try:
    jax.tree.map(lambda m, p: None, masks, params, is_leaf=is_none)
  except ValueError as e:
    raise ValueError(f"masks must mirror params: {e}") from None
  for m, p in zip(m_leaves, jax.tree.leaves(params)):
    if m is not None and np.shape(m) != np.shape(p):
      raise ValueError(f"mask shape {np.shape(m)} != param shape {np.shape(p)}")


def _masked(masks: PyTree, params: PyTree) -> PyTree:
  """θ⊙m on prunable leaves, ``None`` elsewhere (the θ factor of every score)."""
  return tree_map_masked(lambda m, p: None if m is None else jnp.where(m, p, 0), masks, params)


def _tree_add(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.add, a, b)


# --- data-free scores ------------------------------------------------------------------------


def random_scores(key: jax.Array, params: PyTree, masks: PyTree) -> PyTree:
  """I.i.d. standard-normal scores (float32), one independent key per prunable leaf.

  key: a ``jax.random`` key; the same key gives the same scores.
  """
  _check_masks(params, masks)
  leaves, treedef = jax.tree.flatten(masks, is_leaf=is_none)
  keys = jax.random.split(key, max(len(leaves), 1))
  out = [None if m is None else jax.random.normal(k, np.shape(m), jnp.float32)
         for k, m in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


def magnitude_scores(params: PyTree, masks: PyTree) -> PyTree:
  """|θ⊙m| (train the network first for the study's Mag pruner)."""
  _check_masks(params, masks)
  return tree_map_masked(lambda m, p: None if m is None else jnp.abs(jnp.where(m, p, 0)),
                         masks, params)


# --- data-driven scores ----------------------------------------------------------------------


def _chunks(batch: Batch, chunk_size: int) -> tuple[jax.Array, jax.Array, jax.Array, float]:
  """(x, y) -> x (c, chunk, ...), y (c, chunk), weights (c, chunk) (0 on padding), n."""
  if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
    raise ValueError("batch must be a pair (x, y): x (n, ...) inputs, y (n,) integer labels")
  x, y = jnp.asarray(batch[0]), jnp.asarray(batch[1])
  if y.ndim != 1 or not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f"labels y must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
  n = y.shape[0]
  if n == 0 or x.shape[0] != n:
    raise ValueError(f"batch must be non-empty with as many inputs as labels: x {x.shape}, "
                     f"y {y.shape}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  size = min(chunk_size, n)
  c = -(-n // size)
  pad = c * size - n
  w = jnp.concatenate([jnp.ones(n, jnp.float32), jnp.zeros(pad, jnp.float32)])
  x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
  y = jnp.concatenate([y, jnp.zeros(pad, y.dtype)])
  return (x.reshape((c, size) + x.shape[1:]), y.reshape(c, size), w.reshape(c, size), float(n))


def _loss(apply_fn: ApplyFn, params: PyTree, masks: PyTree, x: jax.Array, y: jax.Array,
          w: jax.Array, n: jax.Array, temperature: jax.Array | float = 1.0) -> jax.Array:
  """Σ_i w_i CE(apply_fn(θ⊙m, x_i) / T, y_i) / n: one chunk's share of the mean loss."""
  logits = apply_fn(apply_masks(params, masks), x) / temperature
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
  return jnp.sum(w * ce) / n


@functools.partial(jax.jit, static_argnums=0)
def _grad_chunk(apply_fn, params, masks, x, y, w, n, temperature):
  return jax.grad(_loss, argnums=1)(apply_fn, params, masks, x, y, w, n, temperature)


@functools.partial(jax.jit, static_argnums=0)
def _hg_chunk(apply_fn, params, masks, x, y, w, n, temperature, tangent):
  grad = lambda p: jax.grad(_loss, argnums=1)(apply_fn, p, masks, x, y, w, n, temperature)
  # Forward-over-reverse: the JVP of the gradient along g is H g, no Hessian materialised.
  return jax.jvp(grad, (params,), (tangent,))[1]


# Chunks are summed in a Python loop over one jitted per-chunk kernel rather than a lax.scan:
# XLA:CPU runs convolutions inside a while-loop body several times slower (measured ~8x on VGG16).
def _summed_grad(apply_fn, params, masks, chunks, temperature):
  """∂L/∂θ of the mean loss over all chunks."""
  xs, ys, ws, n = chunks
  g = None
  for i in range(xs.shape[0]):
    gi = _grad_chunk(apply_fn, params, masks, xs[i], ys[i], ws[i], n, temperature)
    g = gi if g is None else _tree_add(g, gi)
  return g


def snip_scores(apply_fn: ApplyFn, params: PyTree, masks: PyTree, batch: Batch,
                chunk_size: int = DEFAULT_CHUNK) -> PyTree:
  """SNIP connection sensitivity |θ ⊙ ∂L/∂θ| on the masked network.

  L is the mean cross-entropy over the prune batch (x (n, ...), y (n,) int labels); for
  an unpruned weight this equals |∂L/∂m|, the SNIP paper's definition.
  """
  _check_masks(params, masks)
  g = _summed_grad(apply_fn, params, masks, _chunks(batch, chunk_size), 1.0)
  return tree_map_masked(lambda m, p, gi: None if m is None else jnp.abs(jnp.where(m, p, 0) * gi),
                         masks, params, g)


def hessian_gradient_product(apply_fn: ApplyFn, params: PyTree, masks: PyTree, batch: Batch,
                             temperature: float = 200.0,
                             chunk_size: int = DEFAULT_CHUNK) -> PyTree:
  """GraSP's H g on prunable leaves (``None`` elsewhere).

  L(θ) = mean CE(apply_fn(θ⊙m, x) / T, y); g = ∂L/∂θ over the whole batch, held constant;
  H g = ∂/∂θ (g · ∂L/∂θ) with g restricted to the prunable weights, computed with ``jax.jvp``
  of ``jax.grad`` (forward-over-reverse).
  """
  _check_masks(params, masks)
  if not float(temperature) > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  chunks = _chunks(batch, chunk_size)
  t = jnp.float32(temperature)
  g = _summed_grad(apply_fn, params, masks, chunks, t)  # constant: no gradient flows into it
  # Direction: g on prunable leaves, 0 elsewhere (the reference's g·∇L runs over the
  # prunable weights only), so this is H restricted to that direction.
  tangent = tree_map_masked(lambda m, gi: jnp.zeros_like(gi) if m is None else gi, masks, g)
  xs, ys, ws, n = chunks
  hg = None
  for i in range(xs.shape[0]):
    hi = _hg_chunk(apply_fn, params, masks, xs[i], ys[i], ws[i], n, t, tangent)
    hg = hi if hg is None else _tree_add(hg, hi)
  return tree_map_masked(lambda m, h: None if m is None else h, masks, hg)


def grasp_scores(apply_fn: ApplyFn, params: PyTree, masks: PyTree, batch: Batch,
                 temperature: float = 200.0, chunk_size: int = DEFAULT_CHUNK) -> PyTree:
  """GraSP score θ ⊙ (H g) on the masked network; the highest scores are kept.

  Sign convention of the SynFlow code base: score = +θ⊙Hg and the weights with the *largest*
  scores are kept. This is the GraSP paper's rule (remove the weights with the largest
  -θ⊙Hg, those whose removal least reduces gradient flow) written as a keep-highest score.
  Logits are divided by ``temperature`` (T = 200 in the study). See
  ``hessian_gradient_product`` for H g.
  """
  hg = hessian_gradient_product(apply_fn, params, masks, batch, temperature, chunk_size)
  return tree_map_masked(lambda m, p, h: None if m is None else jnp.where(m, p, 0) * h,
                         masks, params, hg)


# --- SynFlow ---------------------------------------------------------------------------------


def _abs64(p: jax.Array) -> jax.Array:
  return jnp.abs(p.astype(jnp.float64)) if jnp.issubdtype(p.dtype, jnp.floating) else p


@functools.partial(jax.jit, static_argnums=(0, 3))
def _synflow_jit(apply_fn, params, masks, input_shape):
  abs_params = jax.tree.map(_abs64, params)  # traced under x64: the cast fuses into the pass

  def r(p):  # R = 1ᵀ f(1; |θ|⊙m)
    return jnp.sum(apply_fn(apply_masks(p, masks), jnp.ones((1,) + input_shape, jnp.float64)))

  big_r, g = jax.value_and_grad(r)(abs_params)
  scores = tree_map_masked(
      lambda m, p, gi: None if m is None else jnp.abs(jnp.where(m, p, 0) * gi),
      masks, abs_params, g)
  finite = [jnp.all(jnp.isfinite(s)) for s in jax.tree.leaves(scores)]
  return scores, finite, big_r


def synflow_scores(apply_fn: ApplyFn, params: PyTree, masks: PyTree,
                   input_shape: Sequence[int]) -> PyTree:
  """SynFlow (data-free) scores |θ ⊙ ∂R/∂θ|, R = Σ apply_fn(|θ|⊙m, 1) on one all-ones input.

  Every floating parameter is replaced by its absolute value, biases and norm parameters
  included (as the reference does with the whole state dict), and prunable ones are masked.
  R grows like the product of the layers' gains and overflows float32 on VGG16-sized nets,
  so the pass runs in float64 (x64 scoped to this call; params are cast), on
  ``bfprune.float64.float64_device()``: the default device on CPU / GPU, the host CPU where the
  default device has no float64 (TPU; inputs are copied there). The model must compute in its
  inputs' / params' dtype (flax's default ``dtype=None``).

  Args:
    input_shape: one example's shape, without batch, e.g. (32, 32, 3).

  Returns:
    Scores as float64 NumPy arrays (they may exceed the float32 range), ``None`` where the
    mask is ``None``.

  Raises:
    FloatingPointError: if R or a score is NaN or infinite (e.g. a model that forces float32).
  """
  _check_masks(params, masks)
  shape = tuple(int(s) for s in input_shape)
  if not shape or min(shape) < 1:
    raise ValueError(f"input_shape must be one example's positive shape, got {input_shape!r}")
  with float64.float64_scope() as device:  # x64 for this call only, on a float64 device
    params, masks = float64.place((params, masks), device)
    scores, finite, big_r = _synflow_jit(apply_fn, params, masks, shape)
    scores = jax.tree.map(np.asarray, scores)  # zero-copy on CPU; float64 survives the scope
    big_r = float(big_r)
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(scores)]
  bad = [k for k, ok in zip(paths, finite) if not bool(ok)]
  if bad or not np.isfinite(big_r):
    raise FloatingPointError(
        f"SynFlow produced non-finite values (R = {big_r}; non-finite scores in "
        f"{', '.join(bad) or 'none'}): R overflowed even in float64, or the model casts to a "
        "lower precision")
  return scores
