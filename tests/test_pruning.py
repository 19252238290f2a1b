"""Pruning scores, mask selection and schedules, each checked against an independent result."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import bfprune
from bfprune.pruning import masks as M
from bfprune.pruning import schedule as Sch
from bfprune.pruning import scores as S


def reference_top_k(scores, avail, k):
  """Top-k by a full stable sort: highest score first, ties to the lowest flat index."""
  s = np.concatenate([np.ravel(x) for x in scores])
  m = np.concatenate([np.ravel(x) for x in avail])
  idx = np.flatnonzero(m)
  order = idx[np.lexsort((idx, -s[idx]))][:k]
  out = np.zeros(s.size, bool)
  out[order] = True
  return out


def flat_masks(masks):
  return np.concatenate([np.ravel(np.asarray(m)) for m in jax.tree.leaves(masks)])


def toy_tree(rng, shapes=((6, 5), (5, 4), (4, 3))):
  """A params-like tree with kernels (prunable) and biases (not)."""
  return {f"l{i}": {"kernel": jnp.asarray(rng.standard_normal(s), jnp.float32),
                    "bias": jnp.zeros(s[-1])} for i, s in enumerate(shapes)}


class UserCNN(nn.Module):
  """A model defined only here: conv -> norm -> relu -> conv -> pool -> dense."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name="c1")(x)
    x = nn.LayerNorm(name="ln")(x)
    x = nn.relu(x)
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, name="c2")(x))
    x = x.mean(axis=(1, 2))
    return nn.Dense(3, name="out")(x)


# --- masks_from_scores -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["normal", "ties", "all_equal"])
@pytest.mark.parametrize("density", [0.0, 0.137, 0.5, 0.93, 1.0])
def test_exact_density_global_and_local(kind, density):
  rng = np.random.default_rng(0)
  params = toy_tree(rng)
  masks = M.ones_like(params)
  make = {"normal": lambda s: rng.standard_normal(s),
          "ties": lambda s: rng.integers(0, 3, s).astype(np.float32),
          "all_equal": lambda s: np.ones(s)}[kind]
  scores = M.tree_map_masked(lambda m, p: None if m is None else make(p.shape), masks, params)
  n = M.count_prunable(masks)
  g = M.masks_from_scores(scores, density, "global", allow_empty=True)
  assert M.count_kept(g) == round(density * n)
  want = reference_top_k(jax.tree.leaves(scores), jax.tree.leaves(masks), round(density * n))
  np.testing.assert_array_equal(flat_masks(g), want)
  assert g["l0"]["bias"] is None
  loc = M.masks_from_scores(scores, density, "local", allow_empty=True)
  for s, m in zip(jax.tree.leaves(scores), jax.tree.leaves(loc)):
    k = round(density * s.size)
    assert int(np.sum(m)) == k
    np.testing.assert_array_equal(np.ravel(m), reference_top_k([s], [np.ones(s.shape, bool)], k))


def test_large_selection_path_matches_sort(monkeypatch):
  # Force the sampled-bracket path on small arrays (tiny samples make the bracket miss often,
  # exercising both fallbacks) and compare with a full sort, ties and infinities included.
  rng = np.random.default_rng(1)
  for trial in range(60):
    monkeypatch.setattr(M, "_DIRECT_MAX", 8)
    monkeypatch.setattr(M, "_SAMPLE", int(rng.choice([4, 32, 512])))
    sizes = rng.integers(1, 800, size=rng.integers(1, 4))
    gen = [lambda n: rng.standard_normal(n),
           lambda n: rng.integers(0, 4, n).astype(np.float32),
           lambda n: np.where(rng.random(n) < 0.2, np.inf, rng.standard_normal(n))][trial % 3]
    scores = [gen(n) for n in sizes]
    avail = [rng.random(n) < 0.7 for n in sizes]
    k = int(rng.integers(0, sum(a.sum() for a in avail) + 1))
    got = np.concatenate(M._select_top_k(scores, avail, k, "t"))
    np.testing.assert_array_equal(got, reference_top_k(scores, avail, k))


def test_pruned_weights_stay_pruned():
  rng = np.random.default_rng(2)
  params = toy_tree(rng)
  masks = M.masks_from_scores(S.magnitude_scores(params, M.ones_like(params)), 0.5)
  # Pruned weights get the highest scores: they must still not come back.
  scores = M.tree_map_masked(lambda m, p: None if m is None else jnp.where(m, 0.0, 1e9),
                             masks, params)
  new = M.masks_from_scores(scores, 0.3, "global", masks)
  assert not np.any(flat_masks(new) & ~flat_masks(masks))
  assert M.count_kept(new) == round(0.3 * M.count_prunable(masks))
  with pytest.raises(ValueError, match="only"):
    M.masks_from_scores(scores, 0.6, "global", masks)


def test_bad_inputs_raise_value_error():
  params = toy_tree(np.random.default_rng(3))
  masks = M.ones_like(params)
  scores = S.magnitude_scores(params, masks)
  for bad in (-0.1, 1.5, float("nan"), "x"):
    with pytest.raises(ValueError, match="density"):
      M.masks_from_scores(scores, bad)
  with pytest.raises(ValueError, match="scope"):
    M.masks_from_scores(scores, 0.5, "per-layer")
  nan_scores = jax.tree.map(lambda s: s.at[0, 0].set(jnp.nan), scores)
  with pytest.raises(ValueError, match="NaN"):
    M.masks_from_scores(nan_scores, 0.5)
  with pytest.raises(ValueError, match="unknown pruner"):
    Sch.make_score_fn("obd", None)
  with pytest.raises(ValueError, match="needs batch"):
    Sch.make_score_fn("snip", lambda p, x: x)
  with pytest.raises(ValueError, match="rounds"):
    Sch.density_schedule(0.1, 0)
  with pytest.raises(ValueError, match="schedule"):
    Sch.density_schedule(0.1, 3, "cosine")


# --- Rand, determinism -----------------------------------------------------------------------


def test_rand_same_seed_same_masks_different_seed_different():
  params = toy_tree(np.random.default_rng(4))

  def run(seed, rounds):
    fn = Sch.make_score_fn("rand", key=jax.random.key(seed))
    return flat_masks(Sch.prune(fn, params, None, 0.2, rounds=rounds))

  for rounds in (1, 3):
    np.testing.assert_array_equal(run(0, rounds), run(0, rounds))
    assert not np.array_equal(run(0, rounds), run(1, rounds))


# --- SNIP ------------------------------------------------------------------------------------


def test_snip_equals_hand_derived_gradient():
  rng = np.random.default_rng(5)
  n, d, c = 7, 5, 3
  x = rng.standard_normal((n, d)).astype(np.float32)
  y = rng.integers(0, c, n)
  model = nn.Dense(c)
  params = model.init(jax.random.key(0), x)["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  masks = M.ones_like(params)
  masks["kernel"] = jnp.asarray(rng.random((d, c)) < 0.7)
  w = np.asarray(params["kernel"]) * np.asarray(masks["kernel"])
  b = np.asarray(params["bias"])
  # d/dW of mean CE(xW + b, y) = xᵀ(softmax - onehot) / n; through W⊙m it is multiplied by m.
  z = x @ w + b
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  grad = x.T @ (p - np.eye(c)[y]) / n * np.asarray(masks["kernel"])
  want = np.abs(w * grad)
  for chunk in (256, 3):  # one chunk, and padded chunks
    got = S.snip_scores(apply_fn, params, masks, (x, y), chunk_size=chunk)
    assert got["bias"] is None
    np.testing.assert_allclose(got["kernel"], want, rtol=1e-5, atol=1e-7)


# --- GraSP -----------------------------------------------------------------------------------


def test_grasp_hg_equals_explicit_hessian_times_g():
  rng = np.random.default_rng(6)
  n, t = 7, 3.0
  x = rng.standard_normal((n, 4)).astype(np.float32)
  y = rng.integers(0, 3, n)

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="b")(jnp.tanh(nn.Dense(5, name="a")(x)))

  model = Tiny()
  params = model.init(jax.random.key(1), x)["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  masks = M.ones_like(params)
  masks["a"]["kernel"] = jnp.asarray(rng.random((4, 5)) < 0.6)

  flat, unravel = ravel_pytree(params)
  mflat, _ = ravel_pytree(jax.tree.map(lambda p: jnp.ones_like(p), params) | {
      "a": {"kernel": masks["a"]["kernel"].astype(jnp.float32), "bias": jnp.ones(5)}})
  prunable, _ = ravel_pytree({"a": {"kernel": jnp.ones((4, 5)), "bias": jnp.zeros(5)},
                              "b": {"kernel": jnp.ones((5, 3)), "bias": jnp.zeros(3)}})

  def loss(theta):  # mean CE of the masked net at temperature t, written independently
    logits = apply_fn(unravel(theta * mflat), x) / t
    return jnp.mean(jax.nn.logsumexp(logits, 1) - logits[jnp.arange(n), y])

  g = jax.jit(jax.grad(loss))(flat) * prunable
  hg_want = jax.jit(jax.hessian(loss))(flat) @ g
  got = S.hessian_gradient_product(apply_fn, params, masks, (x, y), temperature=t, chunk_size=3)
  hg_got, _ = ravel_pytree(jax.tree.map(lambda h, p: jnp.zeros_like(p) if h is None else h,
                                        got, params, is_leaf=lambda v: v is None))
  sel = prunable > 0
  np.testing.assert_allclose(hg_got[sel], hg_want[sel], rtol=2e-4, atol=1e-7)
  scores = S.grasp_scores(apply_fn, params, masks, (x, y), temperature=t, chunk_size=3)
  s_flat, _ = ravel_pytree(jax.tree.map(lambda s, p: jnp.zeros_like(p) if s is None else s,
                                        scores, params, is_leaf=lambda v: v is None))
  np.testing.assert_allclose(s_flat[sel], (flat * mflat * hg_want)[sel], rtol=2e-4, atol=1e-7)


# --- SynFlow ---------------------------------------------------------------------------------


def test_synflow_conservation_bias_free_relu_mlp():
  widths = (6, 5, 4, 3)

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i, w in enumerate(widths):
        x = nn.Dense(w, use_bias=False, name=f"d{i}")(x)
        if i < len(widths) - 1:
          x = nn.relu(x)
      return x

  model = MLP()
  params = model.init(jax.random.key(2), jnp.ones((1, 7)))["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  rng = np.random.default_rng(7)
  masks = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape) < 0.8), params)
  scores = S.synflow_scores(apply_fn, params, masks, (7,))
  # Independent R: with |W|⊙m >= 0 every ReLU is the identity, so R = 1ᵀ Π(|W_l|⊙m_l) 1.
  r = np.ones(7)
  for i in range(len(widths)):
    r = r @ (np.abs(np.asarray(params[f"d{i}"]["kernel"], np.float64))
             * np.asarray(masks[f"d{i}"]["kernel"]))
  r = r.sum()
  sums = [float(np.sum(scores[f"d{i}"]["kernel"])) for i in range(len(widths))]
  np.testing.assert_allclose(sums, [r] * len(widths), rtol=1e-12)
  assert all(s.dtype == np.float64 for s in jax.tree.leaves(scores))


def test_synflow_non_finite_scores_raise():
  # A model that forces float32 compute overflows R here (1e30 weights over two layers), which
  # must raise instead of returning inf / NaN scores.
  class F32(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(4, dtype=jnp.float32, name="a")(x)
      return nn.Dense(2, dtype=jnp.float32, name="b")(x)

  model = F32()
  params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
  params = jax.tree.map(lambda p: jnp.full_like(p, 1e30), params)
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  with pytest.raises(FloatingPointError, match="non-finite"):
    S.synflow_scores(apply_fn, params, M.ones_like(params), (3,))


# All score terms are >= 0 (|θ|, all-ones input, ReLU of nonnegative sums), so float64 sums
# carry no cancellation: the relative error of a sum of n such terms is at most ~n * 1.1e-16.
# The largest sums here (a layer's 2.4M scores, 4608-term conv reductions through 14 layers)
# stay below 1e-9; float32 (rounding 6e-8) would not.
SYNFLOW_RTOL = 1e-9


def _kaiming_params(model, x, seed):
  """Params of ``model`` as initialised for SynFlow: kernels N(0, 2 / fan_in), biases exactly 0
  (VGG16's init, which tests/test_models.py checks; drawn with NumPy to skip compiling init)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    if M.path_names(path)[-1] == "kernel":
      std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.standard_normal(leaf.shape) * std, jnp.float32)
    return jnp.zeros(leaf.shape, jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _vgg16_synflow_r(params, masks, plan):
  """R = 1ᵀ f(1; |θ|⊙m) for VGG16 written out in NumPy float64 (biases are 0): 3x3 'same'
  convs as nine shifted matmuls, ReLU, 2x2 max-pools, the final 2x2 average pool, head."""
  w = lambda name: (np.abs(np.asarray(params[name]["kernel"], np.float64))
                    * np.asarray(masks[name]["kernel"]))
  x, i = np.ones((32, 32, 3)), 0
  for item in plan:
    h, wd, c = x.shape
    if item == "M":
      x = x.reshape(h // 2, 2, wd // 2, 2, c).max(axis=(1, 3))
      continue
    i += 1
    k, xp = w(f"conv{i}"), np.pad(x, ((1, 1), (1, 1), (0, 0)))
    x = np.maximum(sum(xp[a:a + h, b:b + wd] @ k[a, b] for a in range(3) for b in range(3)), 0)
  h, wd, c = x.shape
  x = x.reshape(h // 2, 2, wd // 2, 2, c).mean(axis=(1, 3))
  return float(np.sum(x.reshape(-1) @ w("head")))


def test_synflow_vgg16_conserves_the_score_in_every_layer():
  """SynFlow's conservation law on the real VGG16: with zero biases R is positively homogeneous
  of degree 1 in each layer's weights (ReLU and max-pool are, average pool and flatten are
  linear; dropout is off), so by Euler's theorem every layer's scores |θ ⊙ ∂R/∂θ| sum to R,
  here computed independently in NumPy. Checked at init and under a random mask."""
  from bfprune.models import VGG16, VGG16_PLAN
  model = VGG16()
  params = _kaiming_params(model, jnp.ones((1, 32, 32, 3)), seed=0)
  apply_fn = lambda p, x: model.apply({"params": p}, x, train=False)
  masks = M.ones_like(params)
  rng = np.random.default_rng(1)
  random_masks = M.masks_from_scores(jax.tree.map(lambda m: rng.random(m.shape), masks), 0.3,
                                     "local", masks)
  for m in (masks, random_masks):
    scores = S.synflow_scores(apply_fn, params, m, (32, 32, 3))
    names = [f"conv{i}" for i in range(1, 14)] + ["head"]
    assert sorted(scores) == sorted(names) and len(jax.tree.leaves(scores)) == 14
    r = _vgg16_synflow_r(params, m, VGG16_PLAN)
    assert r > 1e10  # far beyond float32's reach of exact sums, yet finite in float64
    sums = [float(np.sum(scores[n]["kernel"])) for n in names]
    np.testing.assert_allclose(sums, [r] * len(names), rtol=SYNFLOW_RTOL)
    for n in names:  # pruned weights score exactly 0
      assert np.all(scores[n]["kernel"][~np.asarray(m[n]["kernel"])] == 0)
  new = M.masks_from_scores(scores, 0.01, "global", random_masks)
  assert M.count_kept(new) == round(0.01 * M.count_prunable(masks))


def test_synflow_fc_conserves_the_score_in_every_layer():
  """The same law on the study's FC (zero-initialised biases, dropout off), with R =
  1ᵀ Π (|W_l|⊙m_l) 1 by NumPy: with nonnegative weights and input every ReLU is the identity."""
  from bfprune.models import FC
  model = FC()
  params = model.init(jax.random.key(3), jnp.ones((1, 28, 28, 1)))["params"]
  assert all(np.all(np.asarray(params[n]["bias"]) == 0) for n in params)
  apply_fn = lambda p, x: model.apply({"params": p}, x, train=False)
  rng = np.random.default_rng(4)
  masks = jax.tree.map(lambda m: jnp.asarray(rng.random(m.shape) < 0.5),
                       M.ones_like(params))
  scores = S.synflow_scores(apply_fn, params, masks, (28, 28, 1))
  names = ["fc1", "fc2", "fc3", "fc4", "fc5", "head"]
  r = np.ones(784)
  for n in names:
    r = r @ (np.abs(np.asarray(params[n]["kernel"], np.float64)) * np.asarray(masks[n]["kernel"]))
  sums = [float(np.sum(scores[n]["kernel"])) for n in names]
  np.testing.assert_allclose(sums, [r.sum()] * len(names), rtol=SYNFLOW_RTOL)


# --- schedules and prune ---------------------------------------------------------------------


def recording(score_fn, log):
  def fn(params, masks):
    log.append(M.count_kept(masks))
    return score_fn(params, masks)
  return fn


@pytest.mark.parametrize("kind", ["exponential", "linear"])
def test_schedule_round_by_round(kind):
  params = toy_tree(np.random.default_rng(8), shapes=((30, 20), (20, 10)))
  n = 30 * 20 + 20 * 10
  d, rounds = 0.05, 5
  want = [d ** (r / rounds) if kind == "exponential" else 1 - (1 - d) * r / rounds
          for r in range(1, rounds + 1)]
  sched = Sch.density_schedule(d, rounds, kind)
  np.testing.assert_allclose(sched, want, rtol=1e-12)
  assert sched[-1] == d
  log = []
  masks = Sch.prune(recording(S.magnitude_scores, log), params, None, d, rounds, kind)
  # Masks entering round r+1 are those produced by round r.
  assert log == [n] + [round(w * n) for w in want[:-1]]
  assert M.count_kept(masks) == round(d * n)
  # Magnitude is unchanged by masking, so iterating equals one shot (a self-consistency check).
  one_shot = Sch.prune(S.magnitude_scores, params, None, d)
  np.testing.assert_array_equal(flat_masks(masks), flat_masks(one_shot))


def test_all_pruners_on_user_defined_cnn():
  model = UserCNN()
  x = jax.random.normal(jax.random.key(3), (12, 8, 8, 2))
  y = jnp.arange(12) % 3
  params = model.init(jax.random.key(4), x)["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  n = M.count_prunable(M.ones_like(params))
  for name in Sch.PRUNERS:
    fn = Sch.make_score_fn(name, apply_fn, batch=(x, y), input_shape=(8, 8, 2),
                           key=jax.random.key(5))
    for scope in ("global", "local"):
      masks = Sch.prune(fn, params, None, 0.3, rounds=2 if name == "synflow" else 1,
                        scope=scope)
      assert masks["ln"]["scale"] is None and masks["c1"]["bias"] is None
      if scope == "global":
        assert M.count_kept(masks) == round(0.3 * n), name
      else:
        for m in jax.tree.leaves(masks):
          assert int(np.sum(m)) == round(0.3 * m.size), name
  assert Sch.default_rounds("synflow") == 100 and Sch.default_rounds("snip") == 1


# --- the None convention, empty networks, pruner names ----------------------------------------


def test_kept_per_layer_and_tree_map_masked_follow_the_none_convention():
  rng = np.random.default_rng(7)
  params = toy_tree(rng)
  masks = M.masks_from_scores(S.magnitude_scores(params, M.ones_like(params)), 0.4)
  got = M.kept_per_layer(masks)
  # Independent count: numpy over the kernels, biases (None masks) left out.
  want = {f"l{i}/kernel": (int(np.sum(np.asarray(masks[f"l{i}"]["kernel"]))),
                           int(params[f"l{i}"]["kernel"].size)) for i in range(3)}
  assert got == want
  assert sum(k for k, _ in got.values()) == M.count_kept(masks) == round(0.4 * (30 + 20 + 12))
  # tree_map_masked visits every params leaf, handing None for the unprunable ones.
  seen = M.tree_map_masked(lambda m, p: "none" if m is None else "mask", masks, params)
  assert seen == {f"l{i}": {"kernel": "mask", "bias": "none"} for i in range(3)}
  assert bfprune.kept_per_layer is M.kept_per_layer
  assert bfprune.tree_map_masked is M.tree_map_masked


def test_density_zero_needs_allow_empty():
  params = toy_tree(np.random.default_rng(8))
  scores = S.magnitude_scores(params, M.ones_like(params))
  for call in (lambda **kw: M.masks_from_scores(scores, 0.0, **kw),
               lambda **kw: M.masks_from_scores(scores, 0, "local", **kw),
               lambda **kw: Sch.prune(S.magnitude_scores, params, None, 0.0, rounds=2,
                                      schedule="linear", **kw)):
    with pytest.raises(ValueError, match="density 0 keeps no prunable weight.*allow_empty=True"):
      call()
    assert M.count_kept(call(allow_empty=True)) == 0
  # A tiny positive density is not refused, even when it rounds to no weight.
  assert M.count_kept(M.masks_from_scores(scores, 1e-6)) == 0


def test_pruner_aliases_and_the_names_in_the_error():
  params = toy_tree(np.random.default_rng(9))
  key = jax.random.key(0)
  for alias, name in (("random", "rand"), ("magnitude", "mag")):
    a = Sch.prune(Sch.make_score_fn(alias, key=key), params, None, 0.3)
    b = Sch.prune(Sch.make_score_fn(name, key=key), params, None, 0.3)
    np.testing.assert_array_equal(flat_masks(a), flat_masks(b))
    assert Sch.default_rounds(alias) == 1
  assert Sch.default_rounds("synflow") == 100
  with pytest.raises(ValueError, match=r"unknown pruner 'obd'; expected one of rand, mag, snip, "
                                       r"grasp, synflow \(aliases: random = rand, "
                                       r"magnitude = mag\)"):
    Sch.make_score_fn("obd")
