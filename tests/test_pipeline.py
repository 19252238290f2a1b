"""experiments/pipeline.py: run_one's results row and its sparse inference timing
(timed_sparse_inference), whose checks must reject a wrong export."""
import json
import sys

import jax
import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from experiments import pipeline  # noqa: E402
from experiments.config import RunConfig  # noqa: E402

from bfprune.pruning import masks as M  # noqa: E402

FIELD = "inference_seconds_sparse"


def _small(mnist, n):
  return mnist._replace(train_x=mnist.train_x[:n], train_y=mnist.train_y[:n])


def test_run_one_times_sparse_inference_and_checks_it_against_dense(mnist):
  cfg = RunConfig(pruner="snip", compression=1.0, post_epochs=1, train_examples=512)
  lines = []
  row = pipeline.run_one(cfg, _small(mnist, 512), log=lines.append)
  assert isinstance(row[FIELD], float) and row[FIELD] > 0
  json.dumps(row)  # still a JSON row
  # The sparse pass's own top-1 (logged) equals the dense evaluation's, computed separately.
  (line,) = [l for l in lines if l.startswith("sparse inference:")]
  assert f"top-1 {row['top1']:.2f}% (dense {row['top1']:.2f}%)" in line
  assert f"{M.kept_count(0.1, 119_400)} stored weights" in line


def test_run_one_butterfly_head_has_no_sparse_timing(mnist):
  # No training (cheap), on the whole training split, which the row records as 60000.
  cfg = RunConfig(factorize="head", pruner="rand", compression=1.0, post_epochs=0)
  lines = []
  row = pipeline.run_one(cfg, mnist, log=lines.append)
  assert FIELD in row and row[FIELD] is None
  assert row["train_examples"] == 60000
  assert any("not timed (--factorize=head" in l for l in lines)
  assert pipeline.sparse_unsupported(RunConfig(dataset="cifar10", model="vgg16",
                                               batch_norm=True)) is not None
  assert pipeline.sparse_unsupported(RunConfig(dataset="cifar10", model="vgg16")) is None


def test_sparse_timing_rejects_a_wrong_export(mnist, monkeypatch):
  """An export of other weights than the evaluated model's, or a wrong sparse forward, fails."""
  cfg = RunConfig(post_epochs=0)
  model = pipeline.build_model(cfg)
  params = jax.device_get(model.init(jax.random.key(0), mnist.test_x[:1])["params"])
  rng = np.random.default_rng(0)
  scores = jax.tree_util.tree_map_with_path(
      lambda p, v: rng.random(v.shape) if M.path_names(p)[-1] == "kernel" else None, params)
  masks = jax.device_get(M.masks_from_scores(scores, 0.1))
  masked = jax.device_get(M.apply_masks(params, masks))
  logits = model.apply({"params": masked}, mnist.test_x)  # the dense model, independently
  top1 = float(100 * np.mean(np.argmax(logits, -1) == mnist.test_y))
  quiet = dict(model=model, dense_top1=top1, repeats=1, log=lambda _: None)
  s = pipeline.timed_sparse_inference(cfg, masked, masks, mnist.test_x, mnist.test_y, **quiet)
  assert isinstance(s, float) and s > 0
  # The kept weights of another mask: not the model whose top-1 the dense evaluation gave.
  other = jax.device_get(M.masks_from_scores(jax.tree.map(lambda v: 1 - v, scores), 0.1))
  with pytest.raises(pipeline.SparseCheckError, match="top-1"):
    pipeline.timed_sparse_inference(cfg, params, other, mnist.test_x, mnist.test_y, **quiet)
  # A sparse forward with a layout bug (pixels read in the wrong order).
  fwd = pipeline.sparse_lib.fc_apply_sparse
  monkeypatch.setattr(pipeline.sparse_lib, "fc_apply_sparse", lambda p, x: fwd(p, x[:, ::-1]))
  with pytest.raises(pipeline.SparseCheckError, match="logits differ"):
    pipeline.timed_sparse_inference(cfg, masked, masks, mnist.test_x, mnist.test_y, **quiet)
