"""experiments/check_device.py: the --quick run on this CPU, and that a broken check fails it."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, data_dir

SCRIPT = [sys.executable, str(REPO / "experiments" / "check_device.py")]
SECTIONS = ("## Device and versions", "## Correctness", "## CIFAR-10 smoke run (sweep pipeline)",
            "## Benchmarks")


def _run(args, timeout=900, **env):
  return subprocess.run(SCRIPT + args, env=dict(os.environ, JAX_PLATFORMS="cpu", **env),
                        capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _rows(text: str) -> list[tuple[str, str]]:
  """(check name, status) of every row of the report's result tables."""
  return re.findall(r"^\| (.+?) \| (PASS|FAIL|SKIPPED) \|", text, flags=re.M)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("check_device") / "report.md"
  proc = _run(["--quick", f"--out={out}", "--budget_s=1e9", f"--data_dir={data_dir()}"])
  return proc, out.read_text() if out.exists() else ""


def test_quick_run_has_every_section_and_all_pass(quick):
  proc, text = quick
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert text.startswith("# Device check: PASS")
  for section in SECTIONS:
    assert section in text, section
  for item in ("backend | cpu", "jax / jaxlib", "flax / optax / numpy",
               "float64 (x64) on default device | yes", "devices | 1 x cpu"):
    assert item in text, item
  rows = _rows(text)
  assert rows and all(status == "PASS" for _, status in rows), \
      [r for r in rows if r[1] != "PASS"]
  names = [n for n, _ in rows]

  def count(prefix):
    return sum(n.startswith(prefix) for n in names)
  assert count("butterfly impl") >= 4              # every impl x the quick cases
  assert count("layer ") >= 6
  for layer in ("ButterflyDense", "KMatrixDense", "MonarchDense", "KOPS2D"):
    assert any(layer in n for n in names if n.startswith("layer ")), layer
  for pruner in ("rand", "mag", "snip", "grasp", "synflow"):
    assert count(f"pruner {pruner} on ") == 2, pruner  # FC, FC + butterfly head
  assert count("sharded train") >= 1
  assert count("VGG16 factorize=none") == 1 and count("VGG16 factorize=head") == 1
  for bench in ("butterfly vs dense", "train step fc", "VGG16 inference"):
    assert count(bench) >= 1, bench
  # Measured numbers made it into the report: errors, masks, losses, timings.
  assert re.search(r"dtwiddle \d", text) and "masks at density 0.1: 0 of 119400 differ" in text
  assert re.search(r"\d+\.\d+ ms/step", text) and "top-1" in text


def test_a_wrong_reference_fails_the_run(tmp_path):
  out = tmp_path / "report.md"
  proc = _run(["--quick", "--checks=butterfly", "--inject_fault=butterfly", f"--out={out}"])
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
  text = out.read_text()
  assert text.startswith("# Device check: FAIL")
  rows = _rows(text)
  assert rows and all(status == "FAIL" for _, status in rows), rows
  # The one perturbed twiddle entry (0.1 %) shows as errors above the float32 tolerance.
  cells = re.findall(r"^\| butterfly impl.*? \| FAIL \| (.*?) \| ([\d.e+-]+) \|", text,
                     flags=re.M)
  assert len(cells) == len(rows)
  for measured, tol in cells:
    errs = [float(v) for v in re.findall(r"(?:y|dx|dtwiddle) ([\d.e+-]+)", measured)]
    assert max(errs) > 2 * float(tol), (measured, tol)


def test_spent_budget_skips_benchmarks_with_the_reason(tmp_path):
  out = tmp_path / "report.md"
  proc = _run(["--quick", "--checks=bench_butterfly,bench_train", "--budget_s=0", f"--out={out}"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = _rows(out.read_text())
  assert len(rows) == 3 and all(status == "SKIPPED" for _, status in rows), rows
  assert "time budget --budget_s=0 spent" in out.read_text()


def test_smoke_without_data_folder_is_one_clear_failure(tmp_path):
  out = tmp_path / "report.md"
  env = {k: v for k, v in os.environ.items() if k != "BFPRUNE_DATA_DIR"}
  proc = subprocess.run(SCRIPT + ["--quick", "--checks=smoke", f"--out={out}"],
                        env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        timeout=300, cwd=REPO)
  assert proc.returncode == 1
  assert re.search(r"\| load CIFAR-10 \| FAIL \| ValueError: no CIFAR-10 folder: pass "
                   r"--data_dir or set BFPRUNE_DATA_DIR", out.read_text())


@pytest.mark.parametrize("args, message", [
    (["--checks=butterfly,nope"], "--checks item 'nope' is not one of"),
    (["--inject_fault=gpu"], "--inject_fault='gpu' is not one of"),
    (["--smoke_pruner=magic"], "--smoke_pruner='magic' is not one of"),
    (["--compilation_cache=TMP/file/cache"], "cannot create the folder"),
])
def test_bad_flags_are_one_line(args, message, tmp_path):
  (tmp_path / "file").write_text("")
  args = [a.replace("TMP", str(tmp_path)) for a in args]
  proc = _run(args + [f"--out={tmp_path / 'r.md'}"], timeout=120)
  assert proc.returncode == 2 and message in proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "r.md").exists()


# ------------------------------------------------------------------ the judging logic in-process


def test_mask_agreement_allows_flips_only_at_near_ties(monkeypatch):
  from bfprune.pruning import masks as masks_lib
  from experiments import check_device as cd
  ref = {"a": np.arange(100, dtype=np.float64), "b": None}
  # Density 0.1 keeps the scores 90..99 (threshold 90). Swapping 89 and 90 across it by
  # moving them 1.2 and 0.2 flips two entries, both within 2 max|diff| = 2.4 of the threshold.
  near = {"a": ref["a"].copy(), "b": None}
  near["a"][89], near["a"][90] = 90.2, 89.8
  ok, desc = cd.mask_agreement(near, ref, 0.1)
  assert ok and "2 of 100 differ (2.000%)" in desc
  # Masks that differ where the scores do not (a broken selection) are not near-ties.
  real = masks_lib.masks_from_scores
  monkeypatch.setattr(masks_lib, "masks_from_scores", lambda s, d, *a: (
      real(s, d) if s is ref else {"a": np.arange(100) < 10, "b": None}))
  ok, desc = cd.mask_agreement({"a": ref["a"].copy(), "b": None}, ref, 0.1)
  # Entries 0..9 and 90..99 flip; entry 90 sits on the threshold itself.
  assert not ok and "20 of 100 differ" in desc and "19 of them farther than" in desc


def test_sharded_judge_fails_on_a_loss_mismatch_or_an_unsplit_batch():
  from experiments import check_device as cd
  one = {"losses": [2.3, 2.2, 2.1], "eval_loss": 2.0, "split": True}
  same = {"devices": 4, "one": one, "all": dict(one, losses=[2.3, 2.2, 2.1 * (1 + 1e-7)])}
  assert cd._judge_sharded(same, cd.U32)[0] == cd.PASS
  off = {"devices": 4, "one": one, "all": dict(one, losses=[2.3, 2.2, 2.1 * 1.001])}
  assert cd._judge_sharded(off, cd.U32)[0] == cd.FAIL
  unsplit = {"devices": 4, "one": one, "all": dict(one, split=False)}
  status, measured, _ = cd._judge_sharded(unsplit, cd.U32)
  assert status == cd.FAIL and "does NOT split" in measured


def test_numpy_butterfly_reference_against_explicit_small_matrices():
  """The checker's own reference: n = 4, one block, built by hand from the definitions."""
  from experiments import check_device as cd
  rng = np.random.default_rng(0)
  tw = rng.normal(size=(1, 1, 2, 2, 2, 2))
  t0, t1 = tw[0, 0, 0], tw[0, 0, 1]
  # Increasing stride: factor 0 (stride 1) pairs (0,1), (2,3); factor 1 (stride 2) (0,2), (1,3).
  f0 = np.zeros((4, 4))
  f0[np.ix_([0, 1], [0, 1])] = t0[0]
  f0[np.ix_([2, 3], [2, 3])] = t0[1]
  f1 = np.zeros((4, 4))
  f1[np.ix_([0, 2], [0, 2])] = t1[0]
  f1[np.ix_([1, 3], [1, 3])] = t1[1]
  np.testing.assert_allclose(cd.np_butterfly_matrix(tw, True), f1 @ f0)
  # Decreasing stride applies the stride-2 factor first, with twiddle factor 0.
  g0 = np.zeros((4, 4))
  g0[np.ix_([0, 2], [0, 2])] = t0[0]
  g0[np.ix_([1, 3], [1, 3])] = t0[1]
  g1 = np.zeros((4, 4))
  g1[np.ix_([0, 1], [0, 1])] = t1[0]
  g1[np.ix_([2, 3], [2, 3])] = t1[1]
  np.testing.assert_allclose(cd.np_butterfly_matrix(tw, False), g1 @ g0)
  # Gradients by central differences of L = sum(ct * x M^T).
  x, ct = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
  loss = lambda t: np.sum(ct * (x @ cd.np_butterfly_matrix(t, True).T))
  dx, dtw = cd.np_butterfly_grads(tw, x, ct, True)
  num = np.zeros_like(tw)
  for i in np.ndindex(tw.shape):
    e = np.zeros_like(tw)
    e[i] = 1e-6
    num[i] = (loss(tw + e) - loss(tw - e)) / 2e-6
  np.testing.assert_allclose(dtw, num, atol=1e-6)
  np.testing.assert_allclose(dx, ct @ cd.np_butterfly_matrix(tw, True))


@pytest.mark.parametrize("fault", ["", "pruners"])
def test_pruner_check_passes_on_identical_weights_and_fails_on_a_wrong_reference(
    fault, tmp_path, monkeypatch):
  """The pruner rows in-process on a tiny FC: all PASS, or all FAIL with the host reference
  perturbed by 0.1 % (scores) so that rand / mag are no longer bit-identical either."""
  from bfprune import models
  from experiments import check_device as cd
  monkeypatch.setattr(cd, "pruner_models", lambda quick: [
      ("tiny FC", models.FC(hidden=(16, 16)), (4, 4, 1))])
  s = cd.Settings(quick=True, checks=("pruners",), fault=fault)
  report = cd.Report(tmp_path / "r.md", s)
  cd.check_pruners(s, report, "cpu")
  statuses = {r.name.split(" on ")[0]: r.status for r in report.results}
  assert sorted(statuses) == [f"pruner {p}" for p in sorted(cd.PRUNERS)]
  assert set(statuses.values()) == {cd.FAIL if fault else cd.PASS}, report.results
