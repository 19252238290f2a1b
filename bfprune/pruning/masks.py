"""Mask pytrees: which weights are kept.

A mask pytree mirrors a Flax ``params`` pytree. A prunable leaf gets a boolean array of the
same shape (``True`` = kept); a leaf that is not prunable gets ``None``. Scores follow the
same convention with float leaves.

Mind the ``None`` leaves: JAX treats ``None`` as an empty subtree, so ``jax.tree.leaves(masks)``
lists the prunable leaves only and ``jax.tree.map(f, masks, params)`` fails (the trees differ).
Map with ``tree_map_masked`` (it hands ``None`` to ``f`` for unprunable leaves) and count with
``count_kept`` / ``count_prunable`` / ``kept_per_layer``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
  """Kernels plus the factors of structured layers: butterfly / K-matrix twiddles and Monarch
  blocks (pruning inside the factors)."""
  del leaf
  return bool(path) and path[-1] in ("kernel", "twiddle", "blocks1", "blocks2")


def is_none(x: Any) -> bool:
  """``is_leaf`` for mask trees: keeps their ``None`` leaves, which JAX's tree functions
  otherwise drop (``None`` is an empty subtree), e.g. ``jax.tree.leaves(masks, is_leaf=is_none)``
  has one entry per params leaf."""
  return x is None


def ones_like(params: PyTree, is_prunable: Predicate = is_kernel) -> PyTree:
  """All-kept mask: ``True`` arrays on prunable leaves, ``None`` elsewhere.

  ``is_prunable(path, leaf)`` picks the prunable leaves, ``path`` being the leaf's key path as
  strings, e.g. ``("Conv_0", "kernel")``; the default takes every ``kernel``. A ``None`` leaf
  marks a param that pruning never touches and that trains normally (biases, norms).
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.ones(jnp.shape(x), bool) if is_prunable(path_names(p), x) else None,
      params)


def tree_map_masked(fn: Callable[..., Any], masks: PyTree, *trees: PyTree) -> PyTree:
  """``jax.tree.map`` over ``masks`` and trees mirroring the params, ``None`` masks included.

  ``fn(mask_leaf, *leaves)`` is called once per params leaf: ``mask_leaf`` is the boolean mask,
  or ``None`` where the leaf is not prunable (plain ``jax.tree.map`` would skip those, ``None``
  being an empty subtree, and fail on the mismatch). Return ``None`` to build another mask-
  like tree, e.g. per-leaf scores:
  ``tree_map_masked(lambda m, p: None if m is None else jnp.abs(p), masks, params)``.
  """
  return jax.tree.map(fn, masks, *trees, is_leaf=is_none)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """``params ⊙ masks``: zeroes pruned weights; leaves with a ``None`` mask pass through."""
  return tree_map_masked(
      lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros_like(p)), masks, params)


def kept_per_layer(masks: PyTree) -> dict[str, tuple[int, int]]:
  """``{"Conv_0/kernel": (kept, total), ...}`` for every prunable leaf, in tree order.

  Keys are the leaves' key paths joined by ``/``; leaves with a ``None`` mask (not prunable)
  are left out.
  """
  return {"/".join(path_names(path)): (int(np.count_nonzero(np.asarray(m))), int(np.size(m)))
          for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]}


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


# --- scores -> masks -------------------------------------------------------------------------

SCOPES = ("global", "local")


def kept_count(density: float, n: int) -> int:
  """Number of weights kept out of ``n`` at ``density``: ``density * n`` rounded half up."""
  return int(np.floor(density * n + 0.5))


def _check_density(density: float) -> float:
  try:
    d = float(density)
  except (TypeError, ValueError):
    raise ValueError(f"density must be a number in [0, 1], got {density!r}") from None
  if not 0.0 <= d <= 1.0:  # also rejects NaN
    raise ValueError(f"density must be in [0, 1] (fraction of prunable weights kept), got {d}")
  return d


_SAMPLE = 1 << 16  # sample size used to bracket the threshold in large selections
_DIRECT_MAX = 1 << 17  # below this many weights, select directly with one np.partition


def _kth_largest(values: np.ndarray, k: int) -> float:
  """The k-th largest entry of a 1-D array (1 <= k <= size), by introselect (no sort)."""
  return values.dtype.type(np.partition(values, values.size - k)[values.size - k])


def _select_top_k(scores: Sequence[np.ndarray], avail: Sequence[np.ndarray], k: int,
                  what: str) -> list[np.ndarray]:
  """Exactly ``k`` True among the ``avail`` entries of the flat arrays, highest scores first.

  scores, avail: lists of 1-D arrays, read as one concatenated vector (never materialised).
  Ties at the threshold go to the lowest flat index. Exact for any input; the strategy only
  affects speed: a deterministic strided sample of 2**16 scores brackets the k-th largest score
  in [lo, hi], a counting pass checks the bracket (falling back to +-inf, i.e. exact but slower,
  if it missed), and only the scores inside the bracket (1-2% of them) are partitioned.
  So one selection is a handful of O(N) vectorised passes and no sort: on 14.7M weights this is
  several times faster than ``np.partition`` over everything.
  """
  n_avail = sum(int(np.count_nonzero(m)) for m in avail)
  if k > n_avail:
    raise ValueError(
        f"{what}: cannot keep {k} weights, only {n_avail} are unpruned (already-pruned weights "
        f"are never re-kept; ask for a density at most the current one)")
  for s, m in zip(scores, avail):
    if s.size and np.isnan(np.min(s)) and np.isnan(s[m]).any():  # min propagates NaN
      raise ValueError(f"{what}: scores of unpruned weights contain NaN")
  if k == 0:
    return [np.zeros(m.shape, bool) for m in avail]
  if k == n_avail:
    return [m.copy() for m in avail]

  total = sum(s.size for s in scores)
  hi, lo = np.inf, -np.inf
  if total > _DIRECT_MAX:
    stride = max(1, total // _SAMPLE)
    sample = np.sort(np.concatenate([s[::stride][m[::stride]] for s, m in zip(scores, avail)]))
    a = sample.size
    if a:
      q = k / n_avail  # fraction kept among the available weights
      pos = (1.0 - q) * a  # the threshold's position in the ascending sample
      slack = 4.0 * np.sqrt(a * q * (1.0 - q)) + 16.0  # ~4 sigma of the sample quantile
      if pos + slack < a:
        hi = sample[int(pos + slack)]
      if pos - slack >= 0:
        lo = sample[int(pos - slack)]
  # Weights strictly above the bracket are all kept; check the bracket holds the k-th largest.
  n_above = sum(int(np.count_nonzero((s > hi) & m)) for s, m in zip(scores, avail))
  if n_above >= k:  # bracket too low: widen upwards
    hi, n_above = np.inf, 0
  band_idx = [np.flatnonzero((s >= lo) & (s <= hi) & m) for s, m in zip(scores, avail)]
  if n_above + sum(b.size for b in band_idx) < k:  # bracket too high: widen downwards
    lo = -np.inf
    band_idx = [np.flatnonzero((s <= hi) & m) for s, m in zip(scores, avail)]
  band_vals = [s[b] for s, b in zip(scores, band_idx)]
  threshold = _kth_largest(np.concatenate(band_vals), k - n_above)
  keep = [(s > threshold) & m for s, m in zip(scores, avail)]  # includes `above`
  missing = k - sum(int(np.count_nonzero(x)) for x in keep)
  for x, b, v in zip(keep, band_idx, band_vals):  # ties: first `missing` in flat order
    if missing <= 0:
      break
    ties = b[v == threshold][:missing]
    x[ties] = True
    missing -= ties.size
  return keep


def check_not_empty(density: float, allow_empty: bool) -> float:
  """``density`` checked to lie in [0, 1], and to be > 0 unless ``allow_empty``."""
  d = _check_density(density)
  if d == 0.0 and not allow_empty:
    raise ValueError("density 0 keeps no prunable weight (an empty network); pass "
                     "allow_empty=True if that is intended")
  return d


def masks_from_scores(scores: PyTree, density: float, scope: str = "global",
                      masks: PyTree | None = None, allow_empty: bool = False) -> PyTree:
  """Keeps exactly ``round(density * N)`` highest-scoring prunable weights.

  Args:
    scores: pytree mirroring params; float arrays on prunable leaves, ``None`` on leaves that
      are not prunable (those get ``None`` masks and are never pruned).
    density: fraction of prunable weights to keep, in (0, 1] ([0, 1] with ``allow_empty``),
      counted over *all* prunable weights (pruned ones included), not over the ones still
      kept. A tiny positive density may still round to no weight at all.
    scope: ``"global"`` ranks every prunable weight together (N = all prunable weights);
      ``"local"`` ranks each tensor alone (N = that tensor's size).
    masks: current masks (``None`` = nothing pruned yet). Weights already pruned (False) are
      never re-kept, whatever their score; asking for more weights than remain unpruned
      raises ValueError.
    allow_empty: accept ``density=0`` (every prunable weight pruned).

  Returns:
    New masks (boolean jax arrays, ``None`` where scores are ``None``).

  Ties are broken deterministically: among equal scores the lowest flat index is kept
  (leaves in ``jax.tree`` order, each flattened in C order), so the count is always exact.
  The SynFlow reference instead drops every weight whose score is ``<=`` the k-th smallest
  score, which prunes all tied weights together and can overshoot the target sparsity (e.g.
  all-equal scores prune everything). Runs on host with NumPy in O(N) without a sort (see
  ``_select_top_k``); the result is copied back as jax arrays.
  """
  d = check_not_empty(density, allow_empty)
  if scope not in SCOPES:
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
  s_leaves, treedef = jax.tree.flatten(scores, is_leaf=is_none)
  if masks is None:
    m_leaves = [None if s is None else np.ones(np.shape(s), bool) for s in s_leaves]
  else:
    m_leaves, m_treedef = jax.tree.flatten(masks, is_leaf=is_none)
    if m_treedef != treedef:
      raise ValueError(f"scores and masks have different structures:\n{treedef}\nvs\n{m_treedef}")
  host_s, host_m, idx = [], [], []
  for i, (s, m) in enumerate(zip(s_leaves, m_leaves)):
    if (s is None) != (m is None):
      raise ValueError(f"leaf {i}: scores and masks disagree on prunability (one is None)")
    if s is None:
      continue
    s, m = np.asarray(s), np.asarray(m, bool)
    if s.shape != m.shape:
      raise ValueError(f"leaf {i}: score shape {s.shape} != mask shape {m.shape}")
    idx.append(i)
    host_s.append(s.ravel())
    host_m.append(m.ravel())
  new = list(m_leaves)
  if scope == "local":
    for i, s, m in zip(idx, host_s, host_m):
      keep, = _select_top_k([s], [m], kept_count(d, s.size), f"local scope, leaf {i}")
      new[i] = jnp.asarray(keep.reshape(np.shape(s_leaves[i])))
  elif idx:
    n = sum(s.size for s in host_s)
    keeps = _select_top_k(host_s, host_m, kept_count(d, n), "global scope")
    for i, keep in zip(idx, keeps):
      new[i] = jnp.asarray(keep.reshape(np.shape(s_leaves[i])))
  return jax.tree.unflatten(treedef, new)
