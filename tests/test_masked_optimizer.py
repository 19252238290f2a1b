"""bfprune.masked_optimizer: pruned weights exactly zero in a plain optax loop, checked against a
NumPy Adam written out here, through chains, MultiSteps, inject_hyperparams, jit and checkpoints."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bfprune
from bfprune import checkpoint
from bfprune.optim import MaskedState


class TinyCNN(nn.Module):
  """A user's model: no ``train`` argument, no dropout."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


@pytest.fixture(scope="module")
def setup():
  """Model, data, params and SNIP masks (density 0.3) with at least one pruned weight per kernel."""
  model = TinyCNN()
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (24, 8, 8, 2))
  y = jax.random.randint(ky, (24,), 0, 3)
  params = model.init(kp, x)["params"]
  apply_fn = lambda p, v: model.apply({"params": p}, v)
  masks = bfprune.prune(bfprune.make_score_fn("snip", apply_fn, batch=(x, y)), params, None, 0.3)
  for name, (kept, total) in bfprune.kept_per_layer(masks).items():
    assert 0 < kept < total, name
  return model, x, y, params, masks


def _loss_fn(model):
  def loss(p, x, y):
    logits = model.apply({"params": p}, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  return loss


def _train(tx, params, model, x, y, steps):
  """A plain optax loop; returns (params, opt_state, losses)."""
  loss = _loss_fn(model)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    value, g = jax.value_and_grad(loss)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, value
  losses = []
  for _ in range(steps):
    params, state, value = step(params, state)
    losses.append(float(value))
  return params, state, losses


def _split(tree, masks):
  """(pruned entries, kept entries) of the prunable leaves, each one flat numpy array."""
  pairs = [(np.asarray(p), np.asarray(m)) for m, p in zip(
      jax.tree.leaves(masks), jax.tree.leaves(bfprune.tree_map_masked(
          lambda m, p: None if m is None else p, masks, tree)))]
  return (np.concatenate([p[~m] for p, m in pairs]), np.concatenate([p[m] for p, m in pairs]))


def _numpy_masked_adam(params, masks, grad_fn, steps, lr, b1=0.9, b2=0.999, eps=1e-8):
  """Adam written out in float64 NumPy on masked gradients, updates masked, params masked."""
  flat, treedef = jax.tree.flatten(params)
  mask_leaves = jax.tree.leaves(bfprune.tree_map_masked(
      lambda m, p: np.ones(p.shape, bool) if m is None else np.asarray(m), masks, params))
  p = [np.where(m, np.asarray(v, np.float64), 0.0) for v, m in zip(flat, mask_leaves)]
  mu = [np.zeros_like(v) for v in p]
  nu = [np.zeros_like(v) for v in p]
  for t in range(1, steps + 1):
    g = jax.tree.leaves(grad_fn(jax.tree.unflatten(treedef, [v.astype(np.float32) for v in p])))
    g = [np.where(m, np.asarray(gi, np.float64), 0.0) for gi, m in zip(g, mask_leaves)]
    mu = [b1 * a + (1 - b1) * gi for a, gi in zip(mu, g)]
    nu = [b2 * a + (1 - b2) * gi * gi for a, gi in zip(nu, g)]
    p = [v - np.where(m, lr * (a / (1 - b1 ** t)) / (np.sqrt(b / (1 - b2 ** t)) + eps), 0.0)
         for v, a, b, m in zip(p, mu, nu, mask_leaves)]
  return jax.tree.unflatten(treedef, p)


def test_plain_optax_loop_keeps_pruned_weights_exactly_zero(setup):
  model, x, y, params, masks = setup
  p0 = bfprune.apply_masks(params, masks)
  tx = bfprune.masked_optimizer(optax.adam(1e-2), masks)
  p, state, losses = _train(tx, p0, model, x, y, steps=8)
  pruned, kept = _split(p, masks)
  _, kept0 = _split(p0, masks)
  assert pruned.size > 0 and np.all(pruned == 0.0)
  assert np.mean(kept != kept0) > 0.95  # the kept weights trained
  assert losses[-1] < losses[0]
  assert isinstance(state, MaskedState)
  # An independent reference: Adam written out in NumPy on masked gradients.
  grad_fn = jax.jit(lambda q: jax.grad(_loss_fn(model))(q, x, y))
  ref = _numpy_masked_adam(params, masks, grad_fn, 8, 1e-2)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=2e-5)
  # Without the wrapper the same loop moves pruned weights (what the wrapper prevents).
  p_plain, _, _ = _train(optax.adam(1e-2), p0, model, x, y, steps=2)
  assert np.count_nonzero(_split(p_plain, masks)[0]) > 0


def test_updates_of_pruned_weights_are_zero_whatever_the_inner_optimizer_returns(setup):
  _, _, _, params, masks = setup
  p0 = bfprune.apply_masks(params, masks)
  seen = []

  def update(g, s, p=None):  # records the gradients it gets, returns non-zero everywhere
    seen.append(g)
    return jax.tree.map(lambda v: jnp.full_like(v, jnp.inf), g), s
  tx = bfprune.masked_optimizer(optax.GradientTransformation(lambda p: optax.EmptyState(), update),
                                masks)
  grads = jax.tree.map(jnp.ones_like, p0)
  u, _ = tx.update(grads, tx.init(p0), p0)
  pruned, kept = _split(u, masks)
  assert np.all(pruned == 0.0) and np.all(np.isinf(kept))
  g_pruned, g_kept = _split(seen[0], masks)  # the inner optimizer saw masked gradients
  assert np.all(g_pruned == 0.0) and np.all(g_kept == 1.0)
  # Unprunable leaves (None masks: biases) pass through untouched.
  assert np.all(np.isinf(np.asarray(u["Dense_0"]["bias"])))


def _add_constant(c: float) -> optax.GradientTransformation:
  """Adds ``c`` to every update, whatever the gradient (a stand-in for drift, noise, ...)."""
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (jax.tree.map(lambda u: u + c, updates), state))


def test_adamw_decay_and_chains_keep_zeros(setup):
  model, x, y, params, masks = setup
  p0 = bfprune.apply_masks(params, masks)
  variants = {
      "adamw": bfprune.masked_optimizer(optax.adamw(1e-2, weight_decay=0.5), masks),
      "chain(clip, masked)": optax.chain(optax.clip_by_global_norm(0.1),
                                         bfprune.masked_optimizer(optax.adam(1e-2), masks)),
      "masked(chain(clip, sgd))": bfprune.masked_optimizer(
          optax.chain(optax.clip_by_global_norm(0.1), optax.sgd(1e-1, momentum=0.9)), masks),
  }
  # An inner optimizer whose updates are non-zero at pruned weights even for the zero gradients
  # it sees there: only the wrapper's update mask keeps those weights at 0 (with adamw, decay
  # of a zero weight adds 0, so that variant cannot tell).
  drift = optax.chain(optax.adam(1e-2), _add_constant(0.1))
  variants["masked(chain(adam, +0.1))"] = bfprune.masked_optimizer(drift, masks)
  for name, tx in variants.items():
    p, _, _ = _train(tx, p0, model, x, y, steps=4)
    pruned, kept = _split(p, masks)
    assert np.all(pruned == 0.0), name
    assert np.mean(kept != _split(p0, masks)[1]) > 0.95, name
  # Masking the gradients alone would not do: the inner chain moves the pruned weights.
  g_masked = bfprune.apply_masks(jax.grad(_loss_fn(model))(p0, x, y), masks)
  u_inner, _ = drift.update(g_masked, drift.init(p0), p0)
  assert np.all(_split(u_inner, masks)[0] != 0.0)
  # masked(chain(clip, ...)): the clip sees masked gradients, so it measures the kept weights'
  # norm only. One SGD step checks it against a norm computed here.
  grads = jax.grad(_loss_fn(model))(p0, x, y)
  tx = bfprune.masked_optimizer(optax.chain(optax.clip_by_global_norm(0.1), optax.sgd(1.0)), masks)
  u, _ = tx.update(grads, tx.init(p0), p0)
  g_masked = bfprune.tree_map_masked(lambda m, g: g if m is None else jnp.where(m, g, 0.0),
                                     masks, grads)
  norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(g_masked)))
  assert norm > 0.1  # the clip is active
  for a, g in zip(jax.tree.leaves(u), jax.tree.leaves(g_masked)):
    np.testing.assert_allclose(np.asarray(a), -np.asarray(g) * 0.1 / norm, rtol=1e-5, atol=1e-8)


def test_multisteps_and_inject_hyperparams(setup):
  model, x, y, params, masks = setup
  p0 = bfprune.apply_masks(params, masks)
  # MultiSteps outside: one real step every 2 calls, zeros kept.
  tx = optax.MultiSteps(bfprune.masked_optimizer(optax.adam(1e-2), masks), every_k_schedule=2)
  p, _, _ = _train(tx, p0, model, x, y, steps=4)
  assert np.all(_split(p, masks)[0] == 0.0)
  assert np.mean(_split(p, masks)[1] != _split(p0, masks)[1]) > 0.95
  # Same result as accumulating by hand: the loss does not depend on the step within a pair,
  # so two MultiSteps calls equal one masked Adam step on the same gradient.
  p1, _, _ = _train(bfprune.masked_optimizer(optax.adam(1e-2), masks), p0, model, x, y, steps=2)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  # inject_hyperparams inside: the learning rate is reachable in the state and used; the
  # pruned weights, whose gradients are not zero, get zero updates.
  tx = bfprune.masked_optimizer(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2), masks)
  state = tx.init(p0)
  state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.05)
  grads = jax.grad(_loss_fn(model))(p0, x, y)
  u, state = jax.jit(tx.update)(grads, state, p0)
  g_pruned, g_kept = _split(grads, masks)
  assert np.count_nonzero(g_pruned) > 0.9 * g_pruned.size  # unmasked, they would move
  u_pruned, u_kept = _split(u, masks)
  assert np.all(u_pruned == 0.0)
  # Adam's first step is -lr * g / (|g| + eps): -0.05 * sign(g) where |g| >> eps = 1e-8.
  big = np.abs(g_kept) > 1e-5
  assert big.mean() > 0.9
  np.testing.assert_allclose(u_kept[big], -0.05 * np.sign(g_kept[big]), rtol=1e-3)


def test_masks_live_in_the_state_jit_reuses_the_step_and_checkpoints_restore(setup, tmp_path):
  model, x, y, params, masks = setup
  p0 = bfprune.apply_masks(params, masks)
  tx = bfprune.masked_optimizer(optax.adam(1e-2), masks)
  traces = []
  loss = _loss_fn(model)

  @jax.jit
  def step(p, s):
    traces.append(1)
    u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
    return optax.apply_updates(p, u), s
  p, s = step(p0, tx.init(p0))
  p, s = step(p, s)
  # Checkpoint and restore mid-run (orbax, None mask leaves included); continue both.
  ckpt = checkpoint.RunCheckpointer(tmp_path / "ckpt")
  ckpt.save(1, {"params": p, "opt_state": s}, {})
  restored, _ = ckpt.restore({"params": p, "opt_state": s})
  ckpt.close()
  assert isinstance(restored["opt_state"], MaskedState)
  a = step(p, s)
  b = step(restored["params"], restored["opt_state"])
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  # New masks (prune further) go into the state: same compiled step, zeros at the new mask.
  fewer = bfprune.masks_from_scores(bfprune.magnitude_scores(p, bfprune.get_masks(s)), 0.1,
                                    masks=bfprune.get_masks(s))
  s2 = bfprune.set_masks(s, fewer)
  p2 = bfprune.apply_masks(p, fewer)
  for _ in range(2):
    p2, s2 = step(p2, s2)
  assert len(traces) == 1  # masks are inputs, not constants baked into the program
  assert np.all(_split(p2, fewer)[0] == 0.0)
  # set_masks zeroed Adam's moments of the newly pruned weights; the step count is kept.
  adam_state = s.inner_state[0]
  s_new = bfprune.set_masks(s, fewer)
  for moments in (s_new.inner_state[0].mu, s_new.inner_state[0].nu):
    pruned, kept = _split(moments, fewer)
    assert np.all(pruned == 0.0) and np.any(kept != 0.0)
  assert np.any(_split(adam_state.mu, fewer)[0] != 0.0)  # they were not zero before
  assert int(s_new.inner_state[0].count) == int(adam_state.count) == 2


def test_bad_use_raises_one_clear_error(setup):
  _, _, _, params, masks = setup
  tx = bfprune.masked_optimizer(optax.adam(1e-3), masks)
  with pytest.raises(ValueError, match=r"pruned weights are not zero in .*kernel.*apply_masks"):
    tx.init(params)  # forgot to mask the params
  # Structure mismatches: one line naming the first key path that differs.
  with pytest.raises(ValueError, match="do not mirror the params pytree: the masks have "
                                       "Dense_0/bias, the params do not") as e:
    tx.init({k: v for k, v in params.items() if k != "Dense_0"})
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="the masks have Conv_0/bias, the params do not"):
    tx.init({"other": params})
  float_masks = jax.tree.map(lambda m: m.astype(jnp.float32), masks)
  with pytest.raises(ValueError, match="Conv_0/kernel .* dtype float32; masks are boolean"):
    bfprune.masked_optimizer(optax.adam(1e-3), float_masks)
  with pytest.raises(ValueError, match="holds no bfprune.masked_optimizer state"):
    bfprune.set_masks(optax.adam(1e-3).init(params), masks)
  state = tx.init(bfprune.apply_masks(params, masks))
  fewer = {k: v for k, v in masks.items() if k != "Dense_0"}
  with pytest.raises(ValueError, match="do not have the structure of the state's masks: the "
                                       "state's masks have Dense_0/bias, the new masks do not"
                     ) as e:
    bfprune.set_masks(state, fewer)
  assert "\n" not in str(e.value)
  unprunable = dict(masks, Dense_0=dict(masks["Dense_0"], kernel=None))
  with pytest.raises(ValueError, match=r"Dense_0/kernel is None \(not prunable\) in the new "
                                       r"masks, of shape \(\d+, 3\) in the state$"):
    bfprune.set_masks(state, unprunable)
  with pytest.raises(TypeError, match="MaskedState"):
    bfprune.optim.masked_update(optax.adam(1e-3), params, optax.adam(1e-3).init(params))


def test_is_none_keeps_the_none_mask_leaves(setup):
  _, _, _, params, masks = setup
  leaves = jax.tree.leaves(masks, is_leaf=bfprune.is_none)
  assert len(leaves) == len(jax.tree.leaves(params)) == len(jax.tree.leaves(masks)) + 3
  assert [l is None for l in leaves] == [True, False] * 3  # (bias, kernel) of 3 layers
