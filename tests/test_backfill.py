"""Sparse inference timing in results rows (pipeline.timed_sparse_inference, run_one) and the
backfill of old rows (experiments/backfill_sparse.py) on a real tiny sweep's results."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, data_dir

sys.path.insert(0, str(REPO))
from experiments import backfill_sparse, pipeline, results_io  # noqa: E402
from experiments.config import RunConfig  # noqa: E402

from bfprune.pruning import masks as M  # noqa: E402

FIELD, MARK = "inference_seconds_sparse", "inference_seconds_sparse_backfilled"
SWEEP = [sys.executable, str(REPO / "experiments" / "sweep.py")]
BACKFILL = [sys.executable, str(REPO / "experiments" / "backfill_sparse.py")]


def _env():
  return dict(os.environ, BFPRUNE_DATA_DIR=str(data_dir()), JAX_PLATFORMS="cpu")


def _small(mnist, n):
  return mnist._replace(train_x=mnist.train_x[:n], train_y=mnist.train_y[:n])


def test_run_one_times_sparse_inference_and_checks_it_against_dense(mnist):
  cfg = RunConfig(pruner="snip", compression=1.0, post_epochs=1, train_examples=512)
  lines = []
  row = pipeline.run_one(cfg, _small(mnist, 512), log=lines.append)
  assert isinstance(row[FIELD], float) and 0 < row[FIELD] < 60
  json.dumps(row)  # still a JSON row
  # The sparse pass's own top-1 (logged) equals the dense evaluation's, computed separately.
  (line,) = [l for l in lines if l.startswith("sparse inference:")]
  assert f"top-1 {row['top1']:.2f}% (dense {row['top1']:.2f}%)" in line
  assert f"{M.kept_count(0.1, 119_400)} stored weights" in line


@pytest.fixture(scope="module")
def head_run(mnist):
  """A real run_one row of a butterfly-head net (no training: cheap), and its log. On the whole
  training split (train_examples=0), which the row records as 60000."""
  cfg = RunConfig(factorize="head", pruner="rand", compression=1.0, post_epochs=0)
  lines = []
  return pipeline.run_one(cfg, mnist, log=lines.append), lines


def test_run_one_butterfly_head_has_no_sparse_timing(head_run):
  row, lines = head_run
  assert FIELD in row and row[FIELD] is None
  assert row["train_examples"] == 60000 and backfill_sparse.config_from_row(row).train_examples == 0
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


def test_check_masks_compares_density_flop_density_and_layer_counts():
  row = {"density": 0.1, "flop_density": 0.2,
         "layers": [{"name": "fc1", "kept": 7}, {"name": "head", "kept": 3}]}
  layers = [{"name": "fc1", "kept": 7}, {"name": "head", "kept": 3}]
  backfill_sparse.check_masks(row, 0.1 + 5e-7, 0.2, layers)
  with pytest.raises(backfill_sparse.BackfillError, match="density"):
    backfill_sparse.check_masks(row, 0.1 + 2e-6, 0.2, layers)
  with pytest.raises(backfill_sparse.BackfillError, match="flop_density"):
    backfill_sparse.check_masks(row, 0.1, 0.2 - 2e-6, layers)
  with pytest.raises(backfill_sparse.BackfillError, match="in head"):
    backfill_sparse.check_masks(row, 0.1, 0.2, layers[:1] + [{"name": "head", "kept": 4}])


@pytest.fixture(scope="module")
def sweep_results(tmp_path_factory):
  """A real tiny sweep: one Mag run (1 pre-training epoch, so the backfill must reproduce it)."""
  out = tmp_path_factory.mktemp("sweep")
  subprocess.run(SWEEP + ["--pruner=mag", "--pre_epochs=1", "--post_epochs=0",
                          "--compression=1", "--train_examples=256", f"--out_dir={out}"],
                 env=_env(), check=True, capture_output=True, timeout=600)
  rows = results_io.read_rows(out / "results.jsonl")
  assert [(r["pruner"], r["pre_epochs"], type(r[FIELD])) for r in rows] == [("mag", 1, float)]
  return out / "results.jsonl"


def test_backfill_restores_the_column_resumably_and_changes_nothing_else(sweep_results,
                                                                        head_run, tmp_path):
  original = results_io.read_rows(sweep_results) + [head_run[0]]  # + a butterfly-head row
  path = tmp_path / "results.jsonl"
  # Old rows: no sparse column; plus a row whose config does not give its run_key back.
  bad = dict(original[0], run_key="0" * 16)
  old = [{k: v for k, v in r.items() if k != FIELD} for r in original + [bad]]
  path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in old))
  before = path.read_text().splitlines()

  stats = backfill_sparse.backfill(path, str(data_dir()), limit=1, log=lambda _: None)
  assert stats == {"missing": 3, "done": 1, "skipped": 0, "left": 2}
  after = path.read_text().splitlines()
  assert after[0] != before[0] and after[1:] == before[1:]  # only the finished row changed
  stats = backfill_sparse.backfill(path, str(data_dir()), log=lambda _: None)
  assert stats == {"missing": 2, "done": 1, "skipped": 1, "left": 1}  # the bad row: skipped

  rows = results_io.read_rows(path)
  assert len(rows) == len(old)
  dense, head, bad_after = rows
  assert bad_after == old[2]  # skipped: untouched
  assert isinstance(dense[FIELD], float) and dense[FIELD] > 0 and dense[MARK] is True
  assert head[FIELD] is None and head[MARK] is True
  for got, want in zip(rows[:2], old[:2]):
    assert {k: v for k, v in got.items() if k not in (FIELD, MARK)} == want
  # Timing depends on the sparsity pattern only: the backfilled value (pre-trained weights) is
  # of the order of the one the run measured on its trained weights.
  assert 0.1 < dense[FIELD] / original[0][FIELD] < 10

  # Another call (the CLI) changes nothing: the file stays byte for byte.
  snapshot = path.read_bytes()
  proc = subprocess.run(BACKFILL + [f"--results={tmp_path}", f"--data_dir={data_dir()}"],
                        env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "1 rows lacked inference_seconds_sparse; 0 backfilled, 1 skipped" in proc.stdout
  assert "rebuilt from the row has key" in proc.stderr and "skipped" in proc.stderr  # the warning, one line
  assert path.read_bytes() == snapshot


def test_store_keeps_rows_appended_meanwhile(tmp_path):
  path = tmp_path / "results.jsonl"
  results_io.append_row(path, {"run_key": "a", "x": 1})
  results_io.append_row(path, {"run_key": "b", "x": 2})
  # A sweep appends between the backfill's read and its write: the write re-reads under the lock.
  results_io.append_row(path, {"run_key": "c", "x": 3})
  assert backfill_sparse.store(path, "b", 0.5) == 1
  assert backfill_sparse.store(path, "b", 0.7) == 0  # already there: never overwritten
  rows = results_io.read_rows(path)
  assert rows == [{"run_key": "a", "x": 1}, {"run_key": "b", "x": 2, FIELD: 0.5, MARK: True},
                  {"run_key": "c", "x": 3}]
  assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_cli_errors_are_one_line(tmp_path):
  proc = subprocess.run(BACKFILL + [f"--results={tmp_path}"], env=_env(), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == \
      f"backfill_sparse.py: error: no results file at {tmp_path / 'results.jsonl'}"
