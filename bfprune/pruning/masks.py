"""Mask pytrees: which weights are kept.

A mask pytree mirrors a Flax ``params`` pytree. A prunable leaf gets a boolean array of the
same shape (``True`` = kept); a leaf that is not prunable gets ``None``. Scores follow the
same convention with float leaves.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

PyTree = Any
Path = tuple[str, ...]
Predicate = Callable[[Path, jax.Array], bool]


def path_names(path: Sequence[Any]) -> Path:
  """Turns a ``jax.tree_util`` key path into a tuple of plain strings."""
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
    else:
      names.append(str(k))
  return tuple(names)


def is_kernel(path: Path, leaf: jax.Array) -> bool:
  """Default predicate: kernels of dense and conv layers (first and last layer included)."""
  del leaf
  return bool(path) and path[-1] == "kernel"


def is_kernel_or_twiddle(path: Path, leaf: jax.Array) -> bool:
  """Kernels plus butterfly / K-matrix twiddles (pruning inside the factors)."""
  del leaf
  return bool(path) and path[-1] in ("kernel", "twiddle")


def _none_leaf(x: Any) -> bool:
  return x is None


def ones_like(params: PyTree, is_prunable: Predicate = is_kernel) -> PyTree:
  """All-kept mask: ``True`` arrays on prunable leaves, ``None`` elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.ones(jnp.shape(x), bool) if is_prunable(path_names(p), x) else None,
      params)


def tree_map_masked(fn: Callable[..., Any], masks: PyTree, *trees: PyTree) -> PyTree:
  """``jax.tree.map`` over ``masks`` and trees mirroring it, ``None`` leaves passed as None.

  ``fn(mask_leaf, *leaves)`` is called for every leaf, including those whose mask is None.
  """
  return jax.tree.map(fn, masks, *trees, is_leaf=_none_leaf)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """``params ⊙ masks``: zeroes pruned weights; leaves with a ``None`` mask pass through."""
  return tree_map_masked(
      lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros_like(p)), masks, params)


def count_prunable(masks: PyTree) -> int:
  """Number of prunable weights (size of all non-None mask leaves)."""
  return int(sum(m.size for m in jax.tree.leaves(masks)))


def count_kept(masks: PyTree) -> int:
  """Number of kept prunable weights."""
  return int(sum(int(jnp.sum(m)) for m in jax.tree.leaves(masks)))


def density(masks: PyTree) -> float:
  """Fraction of prunable weights kept (1.0 when nothing is prunable)."""
  n = count_prunable(masks)
  return 1.0 if n == 0 else count_kept(masks) / n


def density_from_compression(compression: float) -> float:
  """Compression ``c`` means density ``10**-c`` (the SynFlow code base's convention)."""
  if compression < 0:
    raise ValueError(f"compression must be >= 0 (density = 10**-c <= 1), got {compression}")
  return float(10.0 ** (-compression))
