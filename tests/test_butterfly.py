"""butterfly_multiply against butterfly matrices built independently in numpy
(``butterfly_reference``: the paper's Definitions 1-3), for every implementation ("cpu",
"generic"; "auto" is checked to be the CPU path here and against the reference)."""
from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bfprune.structured import butterfly as bf
from butterfly_reference import IMPLS, block_sizes, butterfly_matrix, factor_matrix


# ----------------------------------------------------------------------------- reference


def dense_jnp(increasing: bool, shape: tuple[int, ...]):
  """Differentiable twiddle -> M with the same structure: the numpy builder applied to
  entry indices gives, for every non-zero of every factor, which twiddle entry it holds."""
  nstacks, nblocks, log_n, half = shape[:4]
  n = 2 * half
  idx = np.arange(1, int(np.prod(shape)) + 1).reshape(shape)
  plan = []
  for c in range(nstacks):
    for blk, ks in enumerate(block_sizes(n, nblocks, increasing)):
      for l, k in enumerate(ks):
        f = factor_matrix(idx[c, blk, l], k)
        rows, cols = np.nonzero(f)
        plan.append((c, rows, cols, f[rows, cols] - 1))

  def build(tw):
    flat = tw.reshape(-1)
    mats = [jnp.eye(n, dtype=tw.dtype) for _ in range(nstacks)]
    for c, rows, cols, src in plan:
      f = jnp.zeros((n, n), tw.dtype).at[rows, cols].set(flat[src])
      mats[c] = f @ mats[c]
    return jnp.concatenate(mats, axis=0)
  return build


KINDS = {  # (twiddle complex, x complex)
    "real": (False, False), "complex": (True, True),
    "complex_twiddle": (True, False), "complex_x": (False, True)}


def make(rng, n, nstacks, nblocks, kind, batch, dtype=np.float32):
  log_n = n.bit_length() - 1
  shape = (nstacks, nblocks, log_n, n // 2, 2, 2)
  ctw, cx = KINDS[kind]
  cdtype = np.result_type(dtype, np.complex64)
  tw = (rng.standard_normal(shape) / np.sqrt(2)).astype(dtype)
  x = rng.standard_normal((batch, n)).astype(dtype)
  if ctw:
    tw = (tw + 1j * rng.standard_normal(shape) / np.sqrt(2)).astype(cdtype)
  if cx:
    x = (x + 1j * rng.standard_normal(x.shape)).astype(cdtype)
  return tw, x


def rel_err(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


# ----------------------------------------------------------------------------- forward

# Every size and both stride orders; the layout variants rotate so that each nblocks,
# nstacks, kind and batch (odd, one vector, several tiles) appears at several sizes.
COMBOS = [(1, 1, "real", 5), (2, 2, "complex", 16), (3, 1, "complex_twiddle", 3),
          (1, 2, "complex_x", 48), (2, 1, "real", 7), (3, 2, "real", 32),
          (1, 1, "complex", 1)]
CASES = [(n, inc) + COMBOS[i % len(COMBOS)]
         for i, (n, inc) in enumerate(itertools.product([2, 4, 8, 16, 32, 64, 128, 256],
                                                        [True, False]))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,inc,nblocks,nstacks,kind,batch", CASES)
def test_matches_product_of_factor_matrices(n, inc, nblocks, nstacks, kind, batch, impl):
  rng = np.random.default_rng(n + 7 * nblocks + 13 * nstacks)
  tw, x = make(rng, n, nstacks, nblocks, kind, batch)
  y = bf.butterfly_multiply(tw, x, inc, impl)
  assert y.shape == (batch, nstacks * n)
  assert y.dtype == np.result_type(tw.dtype, x.dtype)
  want = x.astype(np.complex128) @ butterfly_matrix(tw.astype(np.complex128), inc).T
  if not np.iscomplexobj(y):
    want = want.real
  assert rel_err(y, want) < 2e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_large_batch_and_reference_einsum(impl):
  """A batch above MAX_LANES (the CPU path splits it into tiles); the einsum reference
  agrees too."""
  rng = np.random.default_rng(1)
  batch = 3 * bf.MAX_LANES
  tw, x = make(rng, 16, 2, 2, "real", batch)
  want = x @ butterfly_matrix(tw, False).T
  assert bf._lanes(batch) == bf.MAX_LANES
  assert rel_err(bf.butterfly_multiply(tw, x, False, impl), want) < 2e-5
  assert rel_err(bf.butterfly_multiply_reference(tw, x, False), want) < 2e-5


def _instructions(hlo: str) -> list[str]:
  """Optimized HLO reduced to its instructions without names and metadata."""
  out = []
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%\S+ = (.*)", line)
    if m:
      out.append(re.sub(r"%[\w.\-]+", "%", re.sub(r", metadata=\{[^}]*\}", "", m.group(1))))
  return out


def test_auto_is_the_cpu_path_here():
  """On CPU "auto" compiles to the CPU path, instruction for instruction (so it is as fast;
  the other path's residuals are dropped), with bit-identical values and gradients; both
  agree with the reference (a decreasing-stride complex case, 2 stacks, 2 blocks)."""
  rng = np.random.default_rng(8)
  tw, x = make(rng, 16, 2, 2, "complex", 5)
  want = x @ butterfly_matrix(tw.astype(np.complex128), False).T
  got = {impl: bf.butterfly_multiply(tw, x, False, impl) for impl in ("auto", "cpu")}
  np.testing.assert_array_equal(got["auto"], got["cpu"])
  assert rel_err(got["auto"], want) < 2e-5
  compiled = {impl: jax.jit(jax.grad(lambda t, v, impl=impl: jnp.sum(jnp.abs(
      bf.butterfly_multiply(t, v, False, impl)) ** 2), argnums=(0, 1))).lower(tw, x).compile()
              for impl in ("auto", "cpu")}
  assert _instructions(compiled["auto"].as_text()) == _instructions(compiled["cpu"].as_text())
  for a, b in zip(compiled["auto"](tw, x), compiled["cpu"](tw, x)):
    np.testing.assert_array_equal(a, b)


def test_auto_under_other_transformations():
  """The platform switch outside jit (disable_jit), under vmap (per-example gradients), and
  exported for CPU and CUDA at once, then run here (the CPU lowering is picked)."""
  rng = np.random.default_rng(10)
  tw, x = make(rng, 4, 2, 1, "real", 3)
  tw, x = jnp.asarray(tw), jnp.asarray(x)
  m = jnp.asarray(butterfly_matrix(np.asarray(tw)))
  with jax.disable_jit():
    np.testing.assert_allclose(bf.butterfly_multiply(tw, x), x @ m.T, rtol=1e-5, atol=1e-5)
  per_example = lambda f: jax.jit(lambda: jax.vmap(lambda v: jax.grad(
      lambda t: jnp.sum(f(t, v[None]) ** 2))(tw))(x))()
  build = dense_jnp(True, tw.shape)
  assert rel_err(per_example(bf.butterfly_multiply),
                 np.asarray(per_example(lambda t, v: v @ build(t).T))) < 1e-5
  exported = jax.export.export(bf.butterfly_multiply, platforms=["cpu", "cuda"])(tw, x)
  np.testing.assert_allclose(exported.call(tw, x), x @ m.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["real", "complex", "complex_x"])
def test_float64(kind, impl):
  # The generic path skips the largest case (its passes are the same at every size).
  sizes = [(4, True, 1), (64, False, 2), (256, True, 3)][:3 if impl == "cpu" else 2]
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    for n, inc, nblocks in sizes:
      tw, x = make(rng, n, 2, nblocks, kind, 9, dtype=np.float64)
      y = bf.butterfly_multiply(jnp.asarray(tw), jnp.asarray(x), inc, impl)
      assert y.dtype == (np.complex128 if kind != "real" else np.float64)
      want = x @ butterfly_matrix(tw.astype(np.complex128), inc).T
      if kind == "real":
        want = want.real
      assert rel_err(y, want) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_precision_promotes(impl):
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    tw, x = make(rng, 8, 1, 1, "real", 4)
    x64 = jnp.asarray(x, jnp.float64)
    y = bf.butterfly_multiply(jnp.asarray(tw, jnp.float32), x64, impl=impl)
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, x.astype(np.float64) @ butterfly_matrix(
        tw.astype(np.float64)).T, rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda t: jnp.sum(bf.butterfly_multiply(t, x64, impl=impl)))(
        jnp.asarray(tw, jnp.float32))
    assert g.dtype == jnp.float32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [2, 8, 32, 256])
@pytest.mark.parametrize("inc", [True, False])
def test_hadamard(n, inc, impl):
  """All twiddles [[1, 1], [1, -1]] give the Sylvester Hadamard matrix (either order)."""
  log_n = n.bit_length() - 1
  tw = np.broadcast_to(np.array([[1., 1.], [1., -1.]], np.float32),
                       (1, 1, log_n, n // 2, 2, 2))
  h = np.ones((1, 1))
  for _ in range(log_n):
    h = np.kron(h, np.array([[1., 1.], [1., -1.]]))
  np.testing.assert_allclose(bf.butterfly_to_dense(jnp.asarray(tw), inc, impl), h, atol=1e-5)
  x = np.random.default_rng(n).standard_normal((6, n)).astype(np.float32)
  np.testing.assert_allclose(bf.butterfly_multiply(jnp.asarray(tw), x, inc, impl), x @ h.T,
                             rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_to_dense_matches_reference(impl):
  rng = np.random.default_rng(4)
  tw, _ = make(rng, 32, 2, 2, "complex_twiddle", 1)
  np.testing.assert_allclose(bf.butterfly_to_dense(jnp.asarray(tw), False, impl),
                             butterfly_matrix(tw, False), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- gradients


def _loss_fns(tw, x, inc, rng, impl="cpu"):
  """Real losses of y = butterfly(tw, x): fast and dense-materialised reference."""
  out_shape = (x.shape[0], tw.shape[0] * x.shape[1])
  a = jnp.asarray(rng.standard_normal(out_shape).astype(np.float32))
  b = jnp.asarray(rng.standard_normal(out_shape).astype(np.float32))
  build = dense_jnp(inc, tw.shape)

  def reduce(y):
    return jnp.sum(jnp.real(y) * a) + (jnp.sum(jnp.imag(y) * b) if jnp.iscomplexobj(y) else 0)

  fast = lambda t, v: reduce(bf.butterfly_multiply(t, v, inc, impl))
  ref = lambda t, v: reduce(v @ build(t).T)
  return fast, ref


GRAD_CASES = [(16, True, 1, 1, "real"), (32, True, 3, 2, "real"), (8, False, 2, 1, "complex"),
              (16, True, 1, 2, "complex_twiddle"), (32, False, 2, 2, "complex_x"),
              (128, False, 1, 1, "complex")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,inc,nblocks,nstacks,kind", GRAD_CASES)
def test_gradients_match_dense_reference(n, inc, nblocks, nstacks, kind, impl):
  rng = np.random.default_rng(n * nblocks + nstacks)
  tw, x = make(rng, n, nstacks, nblocks, kind, 6)
  tw, x = jnp.asarray(tw), jnp.asarray(x)
  fast, ref = _loss_fns(tw, x, inc, rng, impl)
  got = jax.jit(jax.grad(fast, argnums=(0, 1)))(tw, x)
  want = jax.jit(jax.grad(ref, argnums=(0, 1)))(tw, x)
  for g, w, p in zip(got, want, (tw, x)):
    assert g.dtype == p.dtype and g.shape == p.shape
    assert rel_err(g, np.asarray(w)) < 1e-4


@pytest.mark.parametrize("impl,n,nstacks", [("cpu", 8, 2), ("generic", 8, 2), ("auto", 4, 1)])
def test_second_order_forward_over_reverse(impl, n, nstacks):
  """GraSP-style second derivatives match the dense reference: the jvp of the gradient
  (H v) and the gradient of a gradient norm, complex twiddle and input, 2 blocks ("auto",
  the CPU path through the platform switch, at a smaller size)."""
  rng = np.random.default_rng(5)
  tw, x = make(rng, n, nstacks, 2, "complex", 5)
  tw, x = jnp.asarray(tw), jnp.asarray(x)
  v = jnp.asarray((rng.standard_normal(tw.shape) + 1j * rng.standard_normal(tw.shape)
                   ).astype(np.complex64))
  fast, ref = _loss_fns(tw, x, False, rng, impl)
  hv = lambda f: jax.jvp(lambda t: jax.grad(f)(t, x), (tw,), (v,))[1]
  gg = lambda f: jax.grad(lambda t: jnp.sum(jnp.abs(jax.grad(f, argnums=1)(t, x)) ** 2))(tw)
  both = lambda f: jax.jit(lambda: (hv(f), gg(f)))()   # one compilation each
  for got, want in zip(both(fast), both(ref)):
    assert rel_err(got, np.asarray(want)) < 1e-4


def test_generic_forward_mode_and_no_conditionals():
  """The generic path is plain autodiff: forward mode works and matches the dense
  reference; neither its forward nor its gradient holds a conditional (the CPU path's
  gradient does: one per pass and transpose)."""
  rng = np.random.default_rng(9)
  tw, x = make(rng, 32, 2, 2, "complex_twiddle", 4)
  tw, x = jnp.asarray(tw), jnp.asarray(x)
  dtw = jnp.asarray(rng.standard_normal(tw.shape).astype(np.complex64))
  dx = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))
  build = dense_jnp(True, tw.shape)
  jvp = lambda f: jax.jit(lambda: jax.jvp(f, (tw, x), (dtw, dx))[1])()
  got = jvp(lambda t, v: bf.butterfly_multiply(t, v, True, "generic"))
  want = jvp(lambda t, v: v @ build(t).T)
  assert rel_err(got, np.asarray(want)) < 1e-4

  def conds(impl):
    loss = lambda t, v: jnp.sum(jnp.abs(bf.butterfly_multiply(t, v, True, impl)) ** 2)
    text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(tw, x))
    return text.count(" cond[")
  assert conds("generic") == 0
  assert conds("cpu") > 0


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("tw_shape,x_shape,match", [
    ((1, 1, 3, 4, 2, 2), (8,), "x must be"),
    ((1, 1, 3, 4, 2, 2), (2, 2, 8), "x must be"),
    ((1, 1, 3, 4, 2, 2), (2, 6), "power of 2"),
    ((1, 1, 1, 1, 2, 2), (2, 1), "power of 2"),
    ((1, 1, 2, 4, 2, 2), (2, 8), "twiddle must have shape"),
    ((1, 1, 3, 2, 2, 2), (2, 8), "twiddle must have shape"),
    ((1, 3, 4, 2, 2), (2, 8), "twiddle must have shape"),
    ((1, 1, 3, 4, 2, 3), (2, 8), "twiddle must have shape"),
    ((0, 1, 3, 4, 2, 2), (2, 8), "nstacks and nblocks"),
])
def test_bad_shapes_raise(tw_shape, x_shape, match):
  with pytest.raises(ValueError, match=match):
    bf.butterfly_multiply(jnp.zeros(tw_shape), jnp.zeros(x_shape))


@pytest.mark.parametrize("impl", ["gpu", "CPU", ""])
def test_unknown_impl_raises(impl):
  with pytest.raises(ValueError, match=r"impl must be one of 'auto', 'cpu', 'generic'"):
    bf.butterfly_multiply(jnp.zeros((1, 1, 3, 4, 2, 2)), jnp.zeros((2, 8)), impl=impl)
