"""Masked optimizers: pruned weights stay exactly zero in any optax training loop.

``masked_optimizer(tx, masks)`` wraps any optax ``GradientTransformation``: the gradients it
passes to ``tx`` are zero on pruned weights (so ``tx``'s state, e.g. Adam's moments, only ever
sees the kept weights) and the updates it returns are zero there too (so nothing ``tx`` adds,
such as decoupled weight decay or momentum left over from before pruning, can move a pruned
weight). With params masked once at init (``bfprune.apply_masks(params, masks)``), every pruned
weight is then exactly 0.0 after any number of ``optax.apply_updates``.

The masks live in the optimizer state (``MaskedState.masks``), not in a closure:

* jit: they are ordinary array inputs of the jitted step, not constants baked into the
  compiled program (a VGG16's 15M mask entries would bloat and slow compilation), and new
  masks (``set_masks``, e.g. after pruning a pre-trained network) reuse the compiled step;
* checkpoints: saving and restoring the optimizer state saves and restores the masks with it,
  so a resumed run cannot pair its moments with the wrong masks.

The ``masks`` given to ``masked_optimizer`` are only read by ``init``; ``update`` reads the
state's. Masks follow the library's convention: a boolean array (``True`` = kept) on every
prunable leaf of the params pytree and ``None`` on the others (biases, norms), which are
trained normally. ``None`` is an empty pytree node for JAX, so the state holds only the
prunable leaves' masks.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bfprune.pruning.masks import apply_masks, is_none, path_names

PyTree = Any


class MaskedState(NamedTuple):
  """State of ``masked_optimizer``: the wrapped optimizer's state and the masks it keeps."""
  inner_state: optax.OptState
  masks: PyTree  # bool arrays on prunable leaves, None elsewhere (mirrors the params)


def _is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def _checked_masks(masks: PyTree, what: str) -> PyTree:
  """``masks`` as jax bool arrays (fresh copies), or ValueError naming the bad leaf."""
  def check(path, m):
    dtype = getattr(m, "dtype", None)
    if dtype is None or np.dtype(dtype) != np.bool_:
      raise ValueError(f"{what}: mask leaf {'/'.join(path_names(path)) or '<root>'} is "
                       f"{type(m).__name__} of dtype {dtype}; masks are boolean arrays "
                       "(True = kept) or None (not prunable)")
    # A copy: a caller's jitted step may donate the optimizer state, which must not delete
    # the caller's own masks.
    return jnp.array(m, dtype=bool)
  return jax.tree_util.tree_map_with_path(check, masks)


def _leaf_names(tree: PyTree) -> list[str]:
  """Each leaf's key path as 'a/b/kernel' ('<root>' for a bare leaf), ``None`` leaves kept."""
  return ["/".join(path_names(path)) or "<root>"
          for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)[0]]


def _first_difference(a: PyTree, b: PyTree, a_name: str, b_name: str) -> str:
  """Where two pytrees' structures first differ, as one phrase naming a key path."""
  names_a, names_b = _leaf_names(a), _leaf_names(b)
  set_a, set_b = set(names_a), set(names_b)
  for i in range(max(len(names_a), len(names_b))):
    x = names_a[i] if i < len(names_a) else None
    y = names_b[i] if i < len(names_b) else None
    if x == y:
      continue
    if x is not None and x not in set_b:
      return f"{a_name} have {x}, {b_name} do not"
    if y is not None and y not in set_a:
      return f"{b_name} have {y}, {a_name} do not"
    return f"{a_name} and {b_name} order their leaves differently (at {x} / {y})"
  return (f"the same key paths in different containers ({type(a).__name__} / "
          f"{type(b).__name__} at the top)")


def _what_mask(m: Any) -> str:
  return "None (not prunable)" if m is None else f"of shape {tuple(np.shape(m))}"


def _check_mirrors(masks: PyTree, params: PyTree, what: str) -> None:
  """ValueError unless ``masks`` (None leaves included) has the structure and shapes of
  ``params``; and, for concrete params, unless every pruned weight is already zero."""
  m_leaves, m_def = jax.tree.flatten(masks, is_leaf=is_none)
  p_paths, p_def = jax.tree_util.tree_flatten_with_path(params)
  if m_def != p_def:
    raise ValueError(f"{what}: the masks do not mirror the params pytree: "
                     f"{_first_difference(masks, params, 'the masks', 'the params')} (build "
                     "them with bfprune.ones_like(params) or the pruners)")
  nonzero = []
  for m, (path, p) in zip(m_leaves, p_paths):
    if m is None:
      continue
    name = "/".join(path_names(path))
    if tuple(np.shape(m)) != tuple(np.shape(p)):
      raise ValueError(f"{what}: mask {name} has shape {tuple(np.shape(m))}, the param "
                       f"{tuple(np.shape(p))}")
    if not (_is_tracer(p) or _is_tracer(m)):
      n = int(np.count_nonzero(np.asarray(p)[~np.asarray(m)]))
      if n:
        nonzero.append(f"{name} ({n})")
  if nonzero:
    raise ValueError(f"{what}: pruned weights are not zero in {', '.join(nonzero)}; mask the "
                     "params first: params = bfprune.apply_masks(params, masks)")


def _mask_tree(tree: PyTree, masks: PyTree, what: str) -> PyTree:
  """``tree`` with pruned entries set to 0 (``jnp.where``: exact, even for inf / NaN)."""
  try:
    return apply_masks(tree, masks)
  except ValueError as e:  # structure mismatch, from deep inside jax.tree.map
    raise ValueError(f"{what} do not mirror the masks: {e}") from None


def masked_update(tx: optax.GradientTransformation, updates: PyTree, state: MaskedState,
                  params: PyTree | None = None, **extra_args: Any
                  ) -> tuple[PyTree, MaskedState]:
  """One masked step of ``tx``: mask the gradients, run ``tx.update``, mask its updates.

  The ``update`` of ``masked_optimizer(tx, ...)``, usable on its own when the state was built
  by it (``bfprune.train.Trainer`` does, so that its optimizer can be created before pruning).
  """
  if not isinstance(state, MaskedState):
    raise TypeError(f"expected the state of bfprune.masked_optimizer (MaskedState), got "
                    f"{type(state).__name__}: initialise with masked_optimizer(tx, masks).init")
  masks = state.masks
  grads = _mask_tree(updates, masks, "masked_optimizer: the gradients")
  tx = optax.with_extra_args_support(tx)
  new_updates, inner = tx.update(grads, state.inner_state, params, **extra_args)
  return _mask_tree(new_updates, masks, "masked_optimizer: the updates"), MaskedState(inner, masks)


def masked_optimizer(tx: optax.GradientTransformation, masks: PyTree
                     ) -> optax.GradientTransformationExtraArgs:
  """Wraps ``tx`` so that pruned weights stay exactly zero.

  Args:
    tx: any optax optimizer (a chain, ``inject_hyperparams``, ``MultiSteps``, ...).
    masks: pytree mirroring the params: a bool array (True = kept) on each prunable leaf,
      ``None`` on leaves that are not prunable (trained normally), as returned by
      ``bfprune.ones_like`` / ``bfprune.prune`` / ``bfprune.masks_from_scores``.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is ``MaskedState(inner_state, masks)``
    (a plain pytree of arrays: jit-able and checkpointable as is). ``update`` zeroes the
    gradients of pruned weights before ``tx`` sees them and the updates ``tx`` returns for
    them; extra keyword arguments (e.g. ``value=``) are passed on to ``tx``.

  The caller masks the params once, before ``init``: ``params = apply_masks(params, masks)``.
  ``init`` checks it (for concrete params, i.e. outside ``jit``) and raises ValueError naming
  the leaves with non-zero pruned weights, or a mask whose structure / shape does not mirror
  the params.

  Put the wrapper outermost, ``masked_optimizer(optax.chain(...), masks)``: then every
  transformation of the chain sees masked gradients (e.g. ``clip_by_global_norm`` measures
  the kept weights' norm only). Inside a chain, ``chain(clip, masked_optimizer(adam, masks))``,
  pruned weights also stay zero, but the transformations before it see raw gradients.
  To change the masks later (after pruning a trained network) use ``set_masks``.
  """
  masks = _checked_masks(masks, "masked_optimizer")
  inner = optax.with_extra_args_support(tx)

  def init_fn(params: PyTree) -> MaskedState:
    _check_mirrors(masks, params, "masked_optimizer.init")
    return MaskedState(inner.init(params), jax.tree.map(jnp.array, masks))

  def update_fn(updates, state, params=None, **extra_args):
    return masked_update(inner, updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _mirrors_masks(masks: PyTree):
  """Predicate: does a subtree have the params' structure and the masks' shapes?"""
  m_leaves, m_def = jax.tree.flatten(masks, is_leaf=is_none)

  def mirrors(sub: Any) -> bool:
    if isinstance(sub, MaskedState):
      return False
    leaves, d = jax.tree.flatten(sub)
    return d == m_def and all(
        m is None or tuple(np.shape(x)) == tuple(np.shape(m)) for m, x in zip(m_leaves, leaves))
  return mirrors


def set_masks(opt_state: PyTree, masks: PyTree) -> PyTree:
  """``opt_state`` with new masks in every ``MaskedState`` it contains (pure, jit-able).

  Also zeroes, at the newly pruned positions, the wrapped optimizer's state subtrees that
  mirror the params (Adam's ``mu`` and ``nu``, momentum traces, ...), so that the state again
  describes only kept weights; counters and other leaves are kept. The caller re-masks the
  params with the same masks (``bfprune.train.remask`` does both). ``masks`` must have the
  structure (same prunable leaves, same shapes) of the masks the state was built with.
  """
  masks = _checked_masks(masks, "set_masks")
  _, new_def = jax.tree.flatten(masks, is_leaf=is_none)
  mirrors = _mirrors_masks(masks)
  found = []

  def replace(node):
    if not isinstance(node, MaskedState):
      return node
    old_leaves, old_def = jax.tree.flatten(node.masks, is_leaf=is_none)
    bad = "set_masks: the new masks do not have the structure of the state's masks"
    if old_def != new_def:
      where = _first_difference(masks, node.masks, "the new masks", "the state's masks")
      raise ValueError(f"{bad}: {where}")
    for name, a, b in zip(_leaf_names(masks), jax.tree.leaves(masks, is_leaf=is_none),
                          old_leaves):
      if (a is None) != (b is None) or np.shape(a) != np.shape(b):
        raise ValueError(f"{bad}: {name} is {_what_mask(a)} in the new masks, {_what_mask(b)} "
                         "in the state")
    found.append(True)
    inner = jax.tree.map(replace, node.inner_state, is_leaf=lambda n: isinstance(n, MaskedState))
    inner = jax.tree.map(lambda s: apply_masks(s, masks) if mirrors(s) else s, inner,
                         is_leaf=mirrors)
    return MaskedState(inner, jax.tree.map(jnp.array, masks))

  out = jax.tree.map(replace, opt_state, is_leaf=lambda n: isinstance(n, MaskedState))
  if not found:
    raise ValueError("set_masks: the optimizer state holds no bfprune.masked_optimizer state")
  return out


def get_masks(opt_state: PyTree) -> PyTree:
  """The masks of the outermost ``MaskedState`` in ``opt_state`` (ValueError if none)."""
  found = []
  jax.tree.map(lambda n: found.append(n) if isinstance(n, MaskedState) else None, opt_state,
               is_leaf=lambda n: isinstance(n, MaskedState))
  if not found:
    raise ValueError("get_masks: the optimizer state holds no bfprune.masked_optimizer state")
  return found[0].masks
