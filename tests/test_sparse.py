"""Sparse inference (bfprune.sparse) checked against masked-dense ``model.apply`` and lax.conv."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import sparse as jsparse

from bfprune import models
from bfprune import sparse as sp
from bfprune.pruning import masks as M

SMALL_PLAN = (8, "M", 16, 16, "M", 12)


@pytest.fixture(autouse=True)
def _highest_precision():
  """Every matmul / conv in this module at full float32, references and code under test alike.

  These tests check index maps and layouts to rtol 1e-4, tighter than what a GPU's default TF32
  or a TPU's bfloat16 passes deliver (on CPU nothing changes: XLA:CPU multiplies in float32
  whatever the precision). Production precision is checked where it matters, by
  ``experiments.pipeline.sparse_inference``: default-precision sparse logits against a HIGHEST
  masked-dense reference to 1e-3.
  """
  with jax.default_matmul_precision("highest"):
    yield


def _init(model, x):
  """Random params for ``model`` on input ``x``, drawn with NumPy (no jax.random: its kernels
  compile slowly on CPU): kernels N(0, 1/fan_in), biases N(0, 0.1^2) (nonzero, so a missing
  bias add would show)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(0)
  def draw(path, leaf):
    if M.path_names(path)[-1] == "bias":
      return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), jnp.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _inputs(shape):
  return jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)


@pytest.fixture(scope="module")
def fc_setup():
  model = models.FC()
  x = _inputs((6, 28, 28, 1))
  ref = jax.jit(lambda p, v: model.apply({"params": p}, v, train=False))
  return _init(model, x), x, ref


@pytest.fixture(scope="module")
def vgg_setup():
  model = models.VGG16(plan=SMALL_PLAN)
  x = _inputs((3, 8, 8, 3))  # 8 -> 4 -> 2 -> avg pool 1x1
  ref = jax.jit(lambda p, v: model.apply({"params": p}, v, train=False))
  return _init(model, x), x, ref


def _random_masks(params, density, seed=2):
  """Exactly round(density * N) kept weights, uniformly at random (global)."""
  rng = np.random.default_rng(seed)
  scores = jax.tree_util.tree_map_with_path(
      lambda p, v: rng.random(v.shape) if M.path_names(p)[-1] == "kernel" else None, params)
  return M.masks_from_scores(scores, density, allow_empty=True)  # density 0: the empty net


def _close(out, ref):
  ref = np.asarray(ref)
  scale = float(np.max(np.abs(ref))) or 1.0
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5 * scale)


# --- conv patches ------------------------------------------------------------------------------


@pytest.mark.parametrize("ksize", [(3, 3), (2, 3)])
def test_conv_patches_entries_match_padded_windows(ksize):
  """Feature (i*kw + j)*C + c of the patch at (n, y, x) is x_padded[c, n, y+i, x+j]."""
  kh, kw = ksize
  c, n, h, w = 3, 2, 4, 5
  x = np.random.default_rng(0).standard_normal((c, n, h, w)).astype(np.float32)
  pad_h, pad_w = ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)  # lax 'SAME', stride 1
  xp = np.pad(x, ((0, 0), (0, 0), pad_h, pad_w))
  patches = np.asarray(sp.conv_patches(jnp.asarray(x), ksize))
  assert patches.shape == (kh * kw * c, n, h, w)
  for i in range(kh):
    for j in range(kw):
      for ch in range(c):
        np.testing.assert_array_equal(patches[(i * kw + j) * c + ch],
                                      xp[ch, :, i:i + h, j:j + w])
  rows = jnp.asarray([5, 0, kh * kw * c - 1, 7], jnp.int32)  # any subset, any order
  np.testing.assert_array_equal(np.asarray(sp.conv_patches(jnp.asarray(x), ksize, rows)),
                                patches[np.asarray(rows)])


@pytest.mark.parametrize("ksize", [(3, 3), (2, 3)])
def test_conv_patches_times_hwio_kernel_is_lax_conv(ksize):
  kh, kw = ksize
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 6, 5, 4)).astype(np.float32)  # NHWC
  k = rng.standard_normal((kh, kw, 4, 7)).astype(np.float32)  # HWIO
  ref = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=lax.Precision.HIGHEST)
  patches = sp.conv_patches(jnp.asarray(x.transpose(3, 0, 1, 2)), ksize)  # (kh*kw*C, N, H, W)
  out = jnp.einsum("fnhw,fo->nhwo", patches, k.reshape(-1, 7), precision="highest")
  _close(out, ref)
  # lax.conv_general_dilated_patches builds the same patches with channel-major features,
  # f' = c*kh*kw + i*kw + j: a permutation of ours.
  theirs = lax.conv_general_dilated_patches(  # a conv with a 0/1 kernel: HIGHEST copies exactly
      jnp.asarray(x), ksize, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST)
  c = x.shape[-1]
  perm = [ch * kh * kw + i * kw + j for i in range(kh) for j in range(kw) for ch in range(c)]
  np.testing.assert_allclose(np.asarray(theirs)[..., perm],
                             np.asarray(patches).transpose(1, 2, 3, 0), rtol=1e-6, atol=1e-6)


# --- sparsify --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sp.FORMATS)
def test_sparsify_stores_exactly_the_kept_weights(fmt, vgg_setup):
  params = dict(vgg_setup[0])
  masks = _random_masks(params, 0.2)
  # A kept weight that happens to be 0 is still stored (the count follows the mask).
  params["conv2"] = {**params["conv2"], "kernel": jnp.where(masks["conv2"]["kernel"], 0.0,
                                                             params["conv2"]["kernel"])}
  sparse = sp.sparsify(params, masks, fmt)
  assert sp.stored_entries(sparse) == M.count_kept(masks)
  cls = jsparse.BCSR if fmt == "bcsr" else jsparse.BCOO
  for name, layer in sparse.items():
    kern = layer["kernel"]
    assert isinstance(kern, sp.SparseKernel) and isinstance(kern.matrix, cls)
    assert kern.nse == int(jnp.sum(masks[name]["kernel"]))
    assert layer["bias"] is params[name]["bias"]  # unmasked leaves pass through
    used = np.flatnonzero(np.asarray(masks[name]["kernel"]).reshape(-1, kern.kernel_shape[-1])
                          .any(axis=1))
    if kern.rows is None:
      assert used.size == np.prod(kern.kernel_shape[:-1])
    else:
      np.testing.assert_array_equal(np.asarray(kern.rows), used)
  dense = jax.jit(sp.densify)(sparse)
  for name in params:
    np.testing.assert_array_equal(np.asarray(dense[name]["kernel"]),
                                  np.asarray(M.apply_masks(params, masks)[name]["kernel"]))


def test_sparsify_rejects_bad_input():
  params = {"fc1": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
            "t": {"twiddle": jnp.ones((1, 1, 2, 2, 2, 2))}}
  masks = {"fc1": {"kernel": jnp.ones((4, 3), bool), "bias": None}, "t": {"twiddle": None}}
  with pytest.raises(ValueError, match="fmt"):
    sp.sparsify(params, masks, "csr")
  with pytest.raises(ValueError, match="boolean"):
    sp.sparsify(params, {**masks, "fc1": {"kernel": jnp.ones((4, 3)), "bias": None}})
  with pytest.raises(ValueError, match="6-D"):
    sp.sparsify(params, {**masks, "t": {"twiddle": jnp.ones((1, 1, 2, 2, 2, 2), bool)}})
  with pytest.raises(ValueError, match="mirror"):
    sp.sparsify(params, {"fc1": masks["fc1"]})


# --- forward passes --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,density", [("bcsr", 1.0), ("bcsr", 0.05), ("bcoo", 0.05),
                                         ("bcsr", 0.002), ("bcsr", 0.0)])
def test_fc_sparse_equals_masked_dense(fmt, density, fc_setup):
  params, x, ref_fn = fc_setup
  masks = _random_masks(params, density)
  ref = ref_fn(M.apply_masks(params, masks), x)
  sparse = sp.sparsify(params, masks, fmt)
  assert sp.stored_entries(sparse) == M.count_kept(masks)
  _close(jax.jit(sp.fc_apply_sparse)(sparse, x), ref)
  # Plain masked params take the same-layout dense path.
  _close(jax.jit(sp.fc_apply_sparse)(M.apply_masks(params, masks), x.reshape(6, 784)), ref)


@pytest.mark.parametrize("fmt,density", [("bcsr", 1.0), ("bcsr", 0.05), ("bcoo", 0.05)])
def test_small_vgg_sparse_equals_masked_dense(fmt, density, vgg_setup):
  params, x, ref_fn = vgg_setup
  masks = _random_masks(params, density)
  ref = ref_fn(M.apply_masks(params, masks), x)
  sparse = sp.sparsify(params, masks, fmt)
  assert sp.stored_entries(sparse) == M.count_kept(masks)
  fwd = jax.jit(lambda p, v: sp.vgg16_apply_sparse(p, v, plan=SMALL_PLAN))
  _close(fwd(sparse, x), ref)
  _close(fwd(M.apply_masks(params, masks), x), ref)


def test_small_vgg_flatten_order_with_spatial_head_input():
  """A 16x16 input leaves 2x2 positions before the head: NHWC flatten order must be kept."""
  model = models.VGG16(plan=SMALL_PLAN)
  x = _inputs((2, 16, 16, 3))
  params = _init(model, x)
  assert params["head"]["kernel"].shape == (2 * 2 * 12, 10)
  masks = _random_masks(params, 0.5)
  ref = model.apply({"params": M.apply_masks(params, masks)}, x, train=False)
  _close(sp.vgg16_apply_sparse(sp.sparsify(params, masks), x, plan=SMALL_PLAN), ref)


def test_real_vgg16_sparse_equals_masked_dense():
  model = models.VGG16()
  x = _inputs((2, 32, 32, 3))
  params = _init(model, x[:1])
  scores = jax.tree_util.tree_map_with_path(  # magnitude pruning, global
      lambda p, v: np.abs(np.asarray(v)) if M.path_names(p)[-1] == "kernel" else None, params)
  masks = M.masks_from_scores(scores, 10 ** -1.5)
  ref = jax.jit(lambda p, v: model.apply({"params": p}, v, train=False))(
      M.apply_masks(params, masks), x)
  sparse = sp.sparsify(params, masks)
  assert sp.stored_entries(sparse) == M.count_kept(masks) == M.kept_count(10 ** -1.5, 14_715_584)
  _close(jax.jit(sp.vgg16_apply_sparse)(sparse, x), ref)


def test_forward_rejects_unsupported_models(vgg_setup, fc_setup):
  params, x, _ = vgg_setup
  with pytest.raises(ValueError, match="plan has"):
    sp.vgg16_apply_sparse(params, x, plan=(8, "M", 16))
  with pytest.raises(ValueError, match="NHWC"):
    sp.vgg16_apply_sparse(params, x[0], plan=SMALL_PLAN)
  bn = {**params, "bn1": {"scale": jnp.ones(8), "bias": jnp.zeros(8)}}  # BatchNorm's names
  with pytest.raises(ValueError, match="VGG16 without BatchNorm"):
    sp.vgg16_apply_sparse(bn, x, plan=SMALL_PLAN)
  fc = fc_setup[0]
  with pytest.raises(ValueError, match="head"):
    sp.fc_apply_sparse({k: v for k, v in fc.items() if k != "head"}, jnp.zeros((1, 784)))
  with pytest.raises(ValueError, match="input features"):
    sp.fc_apply_sparse(fc, jnp.zeros((1, 100)))


def test_bench_sparse_script_runs(tmp_path):
  """experiments/bench_sparse.py end to end on a tiny FC set: rows, kept counts, crossover."""
  import json
  import subprocess
  import sys
  from pathlib import Path
  out = tmp_path / "rows.json"
  script = Path(__file__).resolve().parents[1] / "experiments" / "bench_sparse.py"
  subprocess.run([sys.executable, str(script), "--models=fc", "--fc_examples=64", "--repeats=1",
                  "--compressions=1", "--sweep=2", "--fc_formats=bcsr", f"--out={out}"],
                 check=True, capture_output=True, text=True, timeout=600)
  rows = json.loads(out.read_text())
  assert [r["compression"] for r in rows] == [1.0, 2.0]
  for r in rows:
    assert r["kept"] == M.kept_count(10 ** -r["compression"], 119_400)
    assert r["dense"] > 0 and r["bcsr"] > 0 and r["empty_layers"] == []
    d = r["crossover_bcsr_vs_dense"]
    wins = [q["density"] for q in rows if q["bcsr"] < q["dense"]]
    assert (d is None) == (not wins)
    if wins:  # the crossover lies between the best losing and the largest winning density
      assert max(wins) <= d <= max(q["density"] for q in rows)


# --- native kernels per platform ---------------------------------------------------------------


def test_lower_native_per_platform(fc_setup):
  """CPU: every product is XLA:CPU's CSR kernel. TPU: no native kernel (generic fallback), so no
  timing. CUDA / ROCm from this install: cuSPARSE / hipSPARSE where the jaxlib has them, else a
  clear reason; without ``native_lowering`` a GPU lowering is the generic fallback."""
  params, x, _ = fc_setup
  sparse = sp.sparsify(params, _random_masks(params, 0.05))
  assert sp.sparse_products(sparse) == 6  # fc1..fc5 + head, none empty at this density
  for platform in (None, "cpu"):
    lowered, kernel = sp.lower_native(sp.fc_apply_sparse, sparse, x, platform=platform)
    assert kernel == "cpu_csr_sparse_dense_ffi"
    assert sp.native_kernel_calls(lowered.as_text()) == [kernel] * 6
  if jax.default_backend() == "cpu":  # the lowered program runs and is the forward
    got = lowered.compile()(sparse, x)
    _close(got, jax.jit(sp.fc_apply_sparse)(sparse, x))

  lowered, why = sp.lower_native(sp.fc_apply_sparse, sparse, x, platform="tpu")
  assert lowered is None and "generic gather + scatter-add on tpu (0 of 6" in why

  for platform, lib in (("cuda", "cusparse"), ("rocm", "hipsparse")):
    lowered, why = sp.lower_native(sp.fc_apply_sparse, sparse, x, platform=platform)
    if lowered is None:  # a jaxlib without that GPU plugin (e.g. this CPU-only CI)
      assert why.startswith(f"no native sparse kernel on {platform} in this jaxlib (lowering "
                            "failed: ") and "\n" not in why
    else:
      assert why == f"{lib}_csr_matmat_ffi"
      assert sp.native_kernel_calls(lowered.as_text()) == [why] * 6
    # JAX's default GPU lowering (flag off): the generic fallback, no native call.
    generic = jax.jit(sp.fc_apply_sparse).trace(sparse, x).lower(lowering_platforms=(platform,))
    assert sp.native_kernel_calls(generic.as_text()) == []
  assert not jax.config.jax_bcoo_cusparse_lowering  # the flag is restored


def test_lower_native_bcoo_and_empty(fc_setup):
  params, x, _ = fc_setup
  masks = _random_masks(params, 0.05)
  lowered, why = sp.lower_native(sp.fc_apply_sparse, sp.sparsify(params, masks, "bcoo"), x)
  assert lowered is None and "(0 of 6 use a native sparse kernel)" in why
  empty = sp.sparsify(params, _random_masks(params, 0.0))
  assert sp.sparse_products(empty) == 0
  lowered, why = sp.lower_native(sp.fc_apply_sparse, empty, x, platform="tpu")
  assert lowered is not None and why == "no sparse products"
