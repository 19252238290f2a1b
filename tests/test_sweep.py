"""sweep.py end to end: flag validation, results rows, SIGKILL + resume reproducibility."""
import json
import os
import re
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


def _epochs_logged(log: str) -> list[int]:
  """The epoch numbers a sweep's log reports as trained (train.fit's one line per epoch)."""
  return [int(e) for e in re.findall(r": epoch=(\d+) train_loss=", log)]


def test_killed_run_resumes_to_identical_numbers_without_duplicate_rows(tmp_path):
  post_epochs = 4
  args = ["--pruner=snip", "--compression=1", f"--post_epochs={post_epochs}",
          "--train_examples=8192"]
  # One persistent compilation cache for the four processes: later ones skip compiling (the
  # same programs, so the same numbers); all compile time goes below the threshold.
  env = dict(_env(), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  ref = tmp_path / "ref"
  proc = subprocess.run(SWEEP + args + [f"--out_dir={ref}"], env=env, check=True,
                        capture_output=True, text=True, timeout=600)
  assert _epochs_logged(proc.stderr) == list(range(1, post_epochs + 1)), proc.stderr[-3000:]
  assert "resumed from" not in proc.stderr
  (ref_row,) = _rows(ref)
  assert ref_row["pruner"] == "snip" and abs(ref_row["density"] - 0.1) < 1e-4
  for key in ("top1", "top5", "density", "flop_density", "params", "train_seconds",
              "inference_seconds", "inference_seconds_sparse", "jax_version", "devices",
              "collapsed"):
    assert key in ref_row

  out = tmp_path / "killed"
  with open(tmp_path / "killed.log", "w") as killed_log:
    proc = subprocess.Popen(SWEEP + args + [f"--out_dir={out}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=killed_log)
    ckpts = out / "checkpoints" / ref_row["run_key"]
    deadline = time.time() + 300
    # Checkpoint steps: 1 right after pruning (SNIP has no pre-training), then one per epoch.
    # Kill once step 3 (2 epochs trained) is there, before the last epoch.
    while time.time() < deadline and proc.poll() is None:
      if ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 3 for p in ckpts.iterdir()):
        break
      time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert _rows(out) == []
  before_kill = _epochs_logged((tmp_path / "killed.log").read_text())

  proc = subprocess.run(SWEEP + args + [f"--out_dir={out}"], env=env, check=True,
                        capture_output=True, text=True, timeout=600)
  # run_one logs where it resumed; k epochs were checkpointed before the kill.
  resumed = re.findall(r"resumed from \S+ \(phase (\w+), (\d+) epochs done\)", proc.stderr)
  assert len(resumed) == 1, proc.stderr[-3000:]
  phase, k = resumed[0][0], int(resumed[0][1])
  assert phase == "post" and 1 <= k < post_epochs, (phase, k)
  assert before_kill[:k] == list(range(1, k + 1))  # the killed run did train those k epochs
  # After the restore only the remaining post_epochs - k epochs are trained, numbered on from
  # k, and the pruning (done before the first checkpoint) is not redone.
  assert _epochs_logged(proc.stderr) == list(range(k + 1, post_epochs + 1))
  assert "pruned with" not in proc.stderr
  (row,) = _rows(out)
  for key in ("top1", "top5", "test_loss", "density", "flop_density", "layers"):
    assert row[key] == ref_row[key], key
  assert [h["epoch"] for h in row["history"]] == list(range(1, post_epochs + 1))
  for key in ("train_loss", "test_loss", "test_top1"):
    assert [h[key] for h in row["history"]] == [h[key] for h in ref_row["history"]], key
  assert not ckpts.exists()  # cleaned up once the row landed
  # A rerun skips the finished run: still exactly one row, nothing trained.
  proc = subprocess.run(SWEEP + args + [f"--out_dir={out}"], env=env, check=True,
                        capture_output=True, text=True, timeout=600)
  assert len(_rows(out)) == 1
  assert _epochs_logged(proc.stderr) == []
