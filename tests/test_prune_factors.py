"""Pruning inside butterfly factors: twiddles scored and masked like kernels, with no special case.

Masks come from ``ones_like(params, is_kernel_or_twiddle)``. Checks against independent results:
an explicit product of per-factor n x n matrices assembled entry by entry from the documented
layout, a hand-written forward pass for SNIP and GraSP, Euler's theorem for SynFlow, and FLOP
counting. Scores that differentiate through the butterfly run for every implementation.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bfprune import metrics
from bfprune.pruning import masks as M
from bfprune.pruning import schedule as Sch
from bfprune.pruning import scores as S
from bfprune.structured.butterfly import butterfly_to_dense
from bfprune.structured.layers import ButterflyDense
from butterfly_reference import IMPLS

IN, HIDDEN, BF_OUT, CLASSES = 10, 12, 24, 3   # butterfly: 12 -> pad 16, 2 stacks cut to 24
NBLOCKS = 2


# ----------------------------------------------------------------------------- explicit factors


def stride(n: int, l: int, increasing: bool) -> int:
  return 2 ** l if increasing else n // 2 ** (l + 1)


def factor_entries(n: int, s: int):
  """(row, col, p, o, t): factor entry [row, col] of the n x n matrix is twiddle[p, o, t].

  Pair p = j*s + k joins positions i = 2*s*j + k and i + s; output o / input t index (i, i + s).
  """
  out = []
  for j in range(n // (2 * s)):
    for k in range(s):
      p, i = j * s + k, 2 * s * j + k
      pos = (i, i + s)
      for o in range(2):
        for t in range(2):
          out.append((pos[o], pos[t], p, o, t))
  return np.array(out)


def factor_matrix(tw_l: np.ndarray, n: int, s: int) -> np.ndarray:
  """The n x n matrix of one factor, tw_l (n/2, 2, 2)."""
  f = np.zeros((n, n), tw_l.dtype)
  for row, col, p, o, t in factor_entries(n, s):
    f[row, col] = tw_l[p, o, t]
  return f


def factors(tw: np.ndarray, c: int, increasing: bool) -> list[np.ndarray]:
  """Stack c's factors in the order applied (blocks alternate the stride direction)."""
  _, nblocks, log_n, half, _, _ = tw.shape
  n = 2 * half
  return [factor_matrix(tw[c, blk, l], n, stride(n, l, increasing == (blk % 2 == 0)))
          for blk in range(nblocks) for l in range(log_n)]


def chain(mats: list[np.ndarray], n: int) -> np.ndarray:
  out = np.eye(n)
  for f in mats:
    out = f @ out
  return out


def explicit_dense(tw: np.ndarray, increasing: bool = True) -> np.ndarray:
  n = 2 * tw.shape[3]
  return np.concatenate([chain(factors(tw, c, increasing), n) for c in range(tw.shape[0])])


def explicit_dense_jnp(tw: jax.Array, increasing: bool = True) -> jax.Array:
  """explicit_dense, differentiable: each factor scattered into a dense matrix, then multiplied."""
  nstacks, nblocks, log_n, half, _, _ = tw.shape
  n = 2 * half
  stacks = []
  for c in range(nstacks):
    mat = jnp.eye(n, dtype=tw.dtype)
    for blk in range(nblocks):
      for l in range(log_n):
        e = factor_entries(n, stride(n, l, increasing == (blk % 2 == 0)))
        f = jnp.zeros((n, n), tw.dtype).at[e[:, 0], e[:, 1]].set(tw[c, blk, l][e[:, 2], e[:, 3],
                                                                              e[:, 4]])
        mat = f @ mat
    stacks.append(mat)
  return jnp.concatenate(stacks)


# ----------------------------------------------------------------------------- model


class Net(nn.Module):
  """dense -> ReLU -> butterfly (2 stacks, 2 blocks) -> ReLU -> dense head."""
  use_bias: bool = True
  impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Dense(HIDDEN, use_bias=self.use_bias, name="inp")(x))
    x = nn.relu(ButterflyDense(BF_OUT, nblocks=NBLOCKS, use_bias=self.use_bias, impl=self.impl,
                               name="bf")(x))
    return nn.Dense(CLASSES, use_bias=self.use_bias, name="out")(x)


def init_net(use_bias: bool = True, impl: str = "auto"):
  model = Net(use_bias, impl)
  params = model.init(jax.random.key(0), jnp.ones((1, IN)))["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  return model, params, apply_fn


def prune_batch(n: int = 12):
  rng = np.random.default_rng(0)
  return (rng.standard_normal((n, IN)).astype(np.float32),
          rng.integers(0, CLASSES, n).astype(np.int32))


def hand_forward(params, x):
  """Net's forward written out by hand, the butterfly as its explicit factor product."""
  h = nn.relu(x @ params["inp"]["kernel"] + params["inp"]["bias"])
  h = jnp.pad(h, ((0, 0), (0, 16 - HIDDEN)))
  h = (h @ explicit_dense_jnp(params["bf"]["twiddle"]).T)[:, :BF_OUT] + params["bf"]["bias"]
  return nn.relu(h) @ params["out"]["kernel"] + params["out"]["bias"]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("entry", [(0, 0, 0, 0, 0, 0), (1, 1, 2, 5, 1, 0), (0, 1, 3, 6, 0, 1)])
def test_masked_twiddle_removes_exactly_its_connection(entry):
  c, blk, l, p, o, t = entry  # twiddle index: (stack, block, factor, pair, out, in)
  n = 16
  tw = np.random.default_rng(1).standard_normal((2, 2, 4, n // 2, 2, 2)).astype(np.float32)
  mask = np.ones(tw.shape, bool)
  mask[entry] = False
  masked = np.asarray(M.apply_masks({"bf": {"twiddle": jnp.asarray(tw)}},
                                    {"bf": {"twiddle": jnp.asarray(mask)}})["bf"]["twiddle"])
  # The masked factor lost exactly the matrix entry [row, col] that twiddle[entry] fills.
  s = stride(n, l, blk % 2 == 0)
  e = factor_entries(n, s)
  row, col = e[(e[:, 2] == p) & (e[:, 3] == o) & (e[:, 4] == t)][0, :2]
  before, after = factor_matrix(tw[c, blk, l], n, s), factor_matrix(masked[c, blk, l], n, s)
  assert before[row, col] == tw[entry] != 0 and after[row, col] == 0
  diff = before != after
  assert diff.sum() == 1 and diff[row, col]
  # The butterfly materialised from the masked twiddle is the product with the masked factor ...
  dense, dense_m = np.asarray(butterfly_to_dense(jnp.asarray(tw))), np.asarray(
      butterfly_to_dense(jnp.asarray(masked)))
  np.testing.assert_allclose(dense_m, explicit_dense(masked.astype(np.float64)), atol=1e-5)
  # ... so it changes by the rank-one term -w (factors after)[:, row] (factors before)[col, :],
  # in stack c only.
  fs = factors(tw.astype(np.float64), c, True)
  idx = blk * 4 + l
  expected = -float(tw[entry]) * np.outer(chain(fs[idx + 1:], n)[:, row], chain(fs[:idx], n)[col])
  delta = dense_m - dense
  np.testing.assert_allclose(delta[c * n:(c + 1) * n], expected, atol=1e-5)
  np.testing.assert_array_equal(np.delete(delta, np.s_[c * n:(c + 1) * n], axis=0), 0)
  assert np.abs(expected).max() > 1e-3  # the connection carried weight before


def test_masked_identity_factor_cuts_the_only_path():
  n, i = 8, 5
  tw = np.broadcast_to(np.eye(2, dtype=np.float32), (1, 1, 3, n // 2, 2, 2)).copy()
  mask = np.ones(tw.shape, bool)
  # Factor 1 has stride s = 2: i = 5 = 2s*1 + 1 is the first position (o = t = 0) of pair
  # p = 1*s + 1 = 3, so twiddle[0, 0, 1, 3, 0, 0] is the only path from input 5 to output 5.
  mask[0, 0, 1, 3, 0, 0] = False
  d = np.asarray(butterfly_to_dense(jnp.where(mask, tw, 0)))
  expected = np.eye(n)
  expected[i, i] = 0
  np.testing.assert_array_equal(d, expected)


@pytest.fixture(scope="module")
def nets():
  """impl -> one (model, params, apply_fn) shared by the tests below, so jitted scores
  compile once per implementation (same params for every impl)."""
  return {impl: init_net(impl=impl) for impl in IMPLS + ("auto",)}


# Every pruner with "auto" (the CPU path here); those that differentiate through the
# butterfly (rand and mag never call the network) also with the generic path.
PRUNER_CASES = [(p, "auto") for p in Sch.PRUNERS] + [
    (p, "generic") for p in ("snip", "grasp", "synflow")]


@pytest.mark.parametrize("pruner,impl", PRUNER_CASES)
def test_every_pruner_scores_and_masks_twiddles_like_kernels(nets, pruner, impl):
  _, params, apply_fn = nets[impl]
  masks0 = M.ones_like(params, M.is_kernel_or_twiddle)
  assert masks0["bf"]["twiddle"].shape == params["bf"]["twiddle"].shape
  assert masks0["bf"]["bias"] is None and masks0["inp"]["bias"] is None
  score_fn = Sch.make_score_fn(pruner, apply_fn, batch=prune_batch(), input_shape=(IN,),
                               key=jax.random.key(1))
  scores = score_fn(params, masks0)
  tw_scores = np.asarray(scores["bf"]["twiddle"])
  assert tw_scores.shape == params["bf"]["twiddle"].shape and np.isfinite(tw_scores).all()
  assert np.abs(tw_scores).max() > 0 and scores["bf"]["bias"] is None
  # One global ranking over kernels and twiddles together: exact count, and no pruned weight
  # (twiddle or kernel) outscores a kept one.
  density = 0.4
  masks = Sch.prune(lambda p, m: scores, params, masks0, density)
  n = M.count_prunable(masks0)
  assert M.count_kept(masks) == M.kept_count(density, n)
  flat_s = np.concatenate([np.ravel(np.asarray(s)) for s in jax.tree.leaves(scores)])
  flat_m = np.concatenate([np.ravel(np.asarray(m)) for m in jax.tree.leaves(masks)])
  assert flat_s[flat_m].min() >= flat_s[~flat_m].max()
  # Rescoring the masked network: pruned twiddle entries score 0 (their gradient is cut by
  # the mask), except rand, whose scores ignore the network.
  if pruner != "rand":
    kept = np.asarray(masks["bf"]["twiddle"])
    assert not kept.all()
    again = np.asarray(score_fn(params, masks)["bf"]["twiddle"])
    np.testing.assert_array_equal(again[~kept], 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_snip_twiddle_scores_equal_a_hand_written_network(nets, impl):
  _, params, apply_fn = nets[impl]
  params = jax.tree.map(lambda p: p + 0.1, params)  # nonzero biases too
  masks = M.ones_like(params, M.is_kernel_or_twiddle)
  rng = np.random.default_rng(2)
  keep = rng.random(params["bf"]["twiddle"].shape) > 0.3
  masks["bf"]["twiddle"] = jnp.asarray(keep)
  x, y = prune_batch()
  got = S.snip_scores(apply_fn, params, masks, (x, y))

  def loss(p):
    logits = hand_forward(M.apply_masks(p, masks), jnp.asarray(x))
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

  g = jax.jit(jax.grad(loss))(params)
  for layer, leaf in (("bf", "twiddle"), ("inp", "kernel"), ("out", "kernel")):
    ref = np.abs(np.where(np.asarray(masks[layer][leaf]), params[layer][leaf], 0)
                 * np.asarray(g[layer][leaf]))
    np.testing.assert_allclose(np.asarray(got[layer][leaf]), ref, rtol=2e-3,
                               atol=2e-5 * ref.max())
  assert np.asarray(got["bf"]["twiddle"])[~keep].max() == 0


@pytest.mark.parametrize("impl", ["auto", "generic"])
def test_grasp_twiddle_scores_equal_a_hand_written_network(nets, impl):
  # GraSP's H g (forward-over-reverse through the layer) against the same score of the
  # hand-written network, whose butterfly is the explicit factor product. "auto" is the
  # CPU path here, differentiated twice through the platform switch.
  _, params, apply_fn = nets[impl]
  params = jax.tree.map(lambda p: p + 0.1, params)
  masks = M.ones_like(params, M.is_kernel_or_twiddle)
  masks["bf"]["twiddle"] = jnp.asarray(np.random.default_rng(3).random(
      params["bf"]["twiddle"].shape) > 0.3)
  batch = prune_batch()
  got = S.grasp_scores(apply_fn, params, masks, batch)
  want = S.grasp_scores(hand_forward, params, masks, batch)
  for layer, leaf in (("bf", "twiddle"), ("inp", "kernel"), ("out", "kernel")):
    w = np.asarray(want[layer][leaf])
    assert np.abs(w).max() > 0
    np.testing.assert_allclose(np.asarray(got[layer][leaf]), w, rtol=2e-3,
                               atol=2e-4 * np.abs(w).max())


@pytest.fixture(scope="module", params=IMPLS)
def synflow_pruned(request):
  """Bias-free net, SynFlow with twiddles prunable: 2 rounds to density 0.3 (per impl)."""
  model, params, apply_fn = init_net(use_bias=False, impl=request.param)
  masks0 = M.ones_like(params, M.is_kernel_or_twiddle)
  score_fn = Sch.make_score_fn("synflow", apply_fn, input_shape=(IN,))
  masks = Sch.prune(score_fn, params, masks0, 0.3, rounds=2)
  return model, params, apply_fn, score_fn, masks0, masks


def synflow_r(apply_fn, params, masks) -> float:
  with jax.enable_x64(True):
    p = jax.tree.map(lambda q: jnp.abs(q.astype(jnp.float64)), params)
    return float(jnp.sum(apply_fn(M.apply_masks(p, masks), jnp.ones((1, IN), jnp.float64))))


@pytest.mark.parametrize("stage", ["dense", "pruned"])
def test_synflow_conservation_holds_across_butterfly_factors(synflow_pruned, stage):
  # R = 1^T f(1; |theta| * m) is, on this bias-free ReLU net with positive parameters,
  # homogeneous of degree 1 in each dense kernel and in each butterfly factor (stack c's
  # factors reach only stack c's outputs, so summed over stacks). By Euler's theorem every
  # kernel and every (block, factor) slice of the twiddle scores sums to R.
  _, params, apply_fn, score_fn, masks0, pruned = synflow_pruned
  masks = masks0 if stage == "dense" else pruned
  scores = score_fn(params, masks)
  r = synflow_r(apply_fn, params, masks)
  assert r > 0
  tw = scores["bf"]["twiddle"]  # (nstacks, nblocks, log2 n, n/2, 2, 2)
  per_factor = tw.sum(axis=(0, 3, 4, 5)).ravel()
  assert per_factor.size == NBLOCKS * 4
  sums = np.concatenate([per_factor, [scores["inp"]["kernel"].sum(),
                                      scores["out"]["kernel"].sum()]])
  np.testing.assert_allclose(sums, r, rtol=1e-9)
  if stage == "pruned":  # SynFlow really pruned inside the factors
    assert 0 < np.asarray(masks["bf"]["twiddle"]).mean() < 1


def test_butterfly_flop_density_follows_twiddle_density(synflow_pruned):
  model, params, _, _, _, masks = synflow_pruned
  rows = {r.name: r for r in metrics.layer_table(model, {"params": params}, masks, (IN,))}
  bf = rows["bf"]
  tw = np.asarray(masks["bf"]["twiddle"])
  assert bf.flops == tw.size  # one multiply-add per twiddle entry (real, bias-free)
  assert bf.kept == tw.sum() and bf.density == pytest.approx(tw.mean(), rel=1e-12)
  assert bf.flops_kept / bf.flops == pytest.approx(tw.mean(), rel=1e-12)
  # With a bias the bias FLOPs (one per output) stay: density d on the rest.
  model_b, params_b, _ = init_net(use_bias=True)
  masks_b = M.ones_like(params_b, M.is_kernel_or_twiddle)
  masks_b["bf"]["twiddle"] = jnp.asarray(tw)
  row = {r.name: r for r in metrics.layer_table(model_b, {"params": params_b}, masks_b,
                                                (IN,))}["bf"]
  assert row.flops == tw.size + BF_OUT
  assert row.flops_kept == pytest.approx(tw.mean() * tw.size + BF_OUT, rel=1e-12)
