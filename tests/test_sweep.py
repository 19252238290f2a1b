"""sweep.py end to end: flag validation, results rows, SIGKILL + resume reproducibility."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, data_dir

SWEEP = [sys.executable, str(REPO / "experiments" / "sweep.py")]


def _env():
  return dict(os.environ, BFPRUNE_DATA_DIR=str(data_dir()), JAX_PLATFORMS="cpu")


def _rows(out: Path):
  path = out / "results.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("args, message", [
    (["--pruner=magic"], "--pruner='magic' is not valid"),
    (["--compression=abc"], "--compression: 'abc' is not a valid float"),
    (["--compression=-1", "--pruner=rand"], "--compression=-1.0 must be in [0, 9]"),
    (["--dataset=imagenet"], "--dataset='imagenet' is not valid"),
    (["--model=vgg16"], "needs 32x32 inputs"),
    (["--factorize=all", "--pruner=snip"], "no dense kernel to prune"),
    (["--batch_size=0"], "--batch_size=0 must be >= 1"),
    (["--grid=paper_imagenet"], "--grid='paper_imagenet' is not valid"),
])
def test_bad_flags_fail_fast_with_one_clear_line(args, message, tmp_path):
  t0 = time.perf_counter()
  proc = subprocess.run(SWEEP + args + [f"--out_dir={tmp_path}"], env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "results.jsonl").exists()


def test_missing_data_is_a_clear_error(tmp_path):
  proc = subprocess.run(SWEEP + ["--post_epochs=1", f"--data_dir={tmp_path}",
                                 f"--out_dir={tmp_path}/out"], env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "data error" in proc.stderr and "train-images-idx3-ubyte" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_killed_run_resumes_to_identical_numbers_without_duplicate_rows(tmp_path):
  args = ["--pruner=snip", "--compression=1", "--post_epochs=4", "--train_examples=8192"]
  ref = tmp_path / "ref"
  subprocess.run(SWEEP + args + [f"--out_dir={ref}"], env=_env(), check=True,
                 capture_output=True, timeout=600)
  (ref_row,) = _rows(ref)
  assert ref_row["pruner"] == "snip" and abs(ref_row["density"] - 0.1) < 1e-4
  for key in ("top1", "top5", "density", "flop_density", "params_total", "params_kept",
              "train_seconds", "inference_seconds", "inference_seconds_sparse", "jax_version",
              "devices", "collapsed"):
    assert key in ref_row

  out = tmp_path / "killed"
  proc = subprocess.Popen(SWEEP + args + [f"--out_dir={out}"], env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = out / "checkpoints" / ref_row["run_key"]
  deadline = time.time() + 300
  # Kill once the pruned network has trained at least one epoch (checkpoint step >= 3).
  while time.time() < deadline and proc.poll() is None:
    if ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 3 for p in ckpts.iterdir()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _rows(out) == []
  subprocess.run(SWEEP + args + [f"--out_dir={out}"], env=_env(), check=True,
                 capture_output=True, timeout=600)
  (row,) = _rows(out)
  for key in ("top1", "top5", "test_loss", "density", "flop_density"):
    assert row[key] == ref_row[key], key
  assert [h["test_loss"] for h in row["history"]] == [h["test_loss"] for h in ref_row["history"]]
  assert not ckpts.exists()  # cleaned up once the row landed
  # A rerun skips the finished run: still exactly one row.
  subprocess.run(SWEEP + args + [f"--out_dir={out}"], env=_env(), check=True,
                 capture_output=True, timeout=600)
  assert len(_rows(out)) == 1
