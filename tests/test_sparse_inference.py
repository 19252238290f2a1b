"""pipeline.sparse_inference per backend: timed on a native sparse kernel (CPU CSR here; cuSPARSE
on a GPU jaxlib), else None with the reason in the row, never a crash; its masked-dense
reference at HIGHEST matmul precision. Other backends are simulated by lowering for them
(``bfprune.sparse.lower_native(..., platform=...)``) from this CPU-only install."""
import functools
import sys

import jax
import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from experiments import pipeline  # noqa: E402
from experiments.config import RunConfig  # noqa: E402

from bfprune import sparse as sparse_lib  # noqa: E402
from bfprune.pruning import masks as M  # noqa: E402

CFG = RunConfig(post_epochs=0, batch_size=64)


@pytest.fixture(scope="module")
def setup():
  """A masked FC (density 0.1) and 100 random MNIST-shaped test inputs."""
  model = pipeline.build_model(CFG)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((100, 28, 28, 1)).astype(np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x[:1])["params"]  # NumPy init: jax.random
  params = jax.tree.map(  # kernels compile slowly on CPU
      lambda v: (rng.standard_normal(v.shape) / np.sqrt(v.shape[0])).astype(np.float32), shapes)
  scores = jax.tree_util.tree_map_with_path(
      lambda p, v: rng.random(v.shape) if M.path_names(p)[-1] == "kernel" else None, params)
  masks = jax.device_get(M.masks_from_scores(scores, 0.1))
  return model, params, masks, x


def test_timed_on_the_native_cpu_kernel(setup):
  model, params, masks, x = setup
  lines = []
  got = pipeline.sparse_inference(CFG, params, masks, x, model=model, repeats=1,
                                  log=lines.append)
  assert isinstance(got.seconds, float) and got.seconds > 0
  assert got.note == "BCSR via cpu_csr_sparse_dense_ffi"
  assert "(BCSR via cpu_csr_sparse_dense_ffi, 11940 stored weights;" in lines[-1]
  assert pipeline.timed_sparse_inference(CFG, params, masks, x, model=model, repeats=1,
                                         log=lines.append) > 0


@pytest.mark.parametrize("platform,reason", [
    ("tpu", "sparse products lower to XLA's generic gather + scatter-add on tpu (0 of 6 use a "
            "native sparse kernel): not sparse inference"),
    ("cuda", "no native sparse kernel on cuda in this jaxlib (lowering failed: "),
])
def test_backend_without_native_kernel_records_none_and_why(platform, reason, setup,
                                                           monkeypatch):
  """What a TPU, or a GPU whose jaxlib lacks cuSPARSE, gets: no timing, the reason, no error."""
  model, params, masks, x = setup
  probe = sparse_lib.lower_native(sparse_lib.fc_apply_sparse, sparse_lib.sparsify(params, masks),
                                  x[:64], platform=platform)
  if probe[0] is not None:  # a jaxlib with the GPU plugin: cuSPARSE it is (cannot run here)
    assert platform == "cuda" and probe[1] == "cusparse_csr_matmat_ffi"
    return
  monkeypatch.setattr(pipeline.sparse_lib, "lower_native",
                      functools.partial(sparse_lib.lower_native, platform=platform))
  lines = []
  got = pipeline.sparse_inference(CFG, params, masks, x, model=model, log=lines.append)
  assert got.seconds is None and got.note.startswith(reason)
  assert lines == [f"sparse inference: not timed ({got.note})"]


def test_unsupported_model_records_why(setup):
  cfg = RunConfig(factorize="head", post_epochs=0)
  got = pipeline.sparse_inference(cfg, {}, {}, setup[3], log=lambda _: None)
  assert got == (None, pipeline.sparse_unsupported(cfg)) and got.note.startswith("--factorize")


def test_reference_is_computed_at_highest_precision(setup):
  """The masked-dense reference of the logit check is traced under HIGHEST matmul precision, so
  TF32 (GPU) / bfloat16 (TPU) defaults cannot push its own error past the 1e-3 tolerance."""
  model, params, masks, x = setup
  seen = []

  class Spy:
    def apply(self, variables, inputs, **kwargs):
      seen.append(jax.config.jax_default_matmul_precision)
      return model.apply(variables, inputs, **kwargs)

  pipeline.sparse_inference(CFG, params, masks, x, model=Spy(), repeats=1, log=lambda _: None)
  assert seen == ["highest"]
  assert jax.config.jax_default_matmul_precision is None  # scoped to the check


def test_batches_smaller_than_the_checked_examples(setup):
  """With batch 8 the 64 checked logits span eight batches: all of them are compared (a wrong
  weight that shows in example 20 only, i.e. in the third batch, is caught), none is skipped."""
  model, params, masks, x = setup
  cfg = RunConfig(post_epochs=0, batch_size=8)
  lines = []
  got = pipeline.sparse_inference(cfg, params, masks, x, model=model, repeats=1,
                                  log=lines.append)
  assert got.seconds > 0 and "on 64 examples" in lines[-1]

  class OffOnOne:  # the reference model, off in example 20's logits only
    def apply(self, variables, inputs, **kwargs):
      out = model.apply(variables, inputs, **kwargs)
      return out.at[20].add(1.0)

  with pytest.raises(pipeline.SparseCheckError, match="on the first 64 test examples"):
    pipeline.sparse_inference(cfg, params, masks, x, model=OffOnOne(), repeats=1,
                              log=lambda _: None)
