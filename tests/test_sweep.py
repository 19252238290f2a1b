"""sweep.py end to end: flag validation, results rows, SIGKILL + resume reproducibility."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, data_dir

SWEEP = [sys.executable, str(REPO / "experiments" / "sweep.py")]


def _env():
  return dict(os.environ, BFPRUNE_DATA_DIR=str(data_dir()), JAX_PLATFORMS="cpu")


def _rows(out: Path):
  path = out / "results.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def _run(args, **kw):
  return subprocess.run(SWEEP + args, env=_env(), capture_output=True, text=True, timeout=120,
                        **kw)


@pytest.mark.parametrize("args, message", [
    (["--pruner=magic"], "--pruner='magic' is not valid"),
    (["--compression=abc"], "--compression: 'abc' is not a valid float"),
    (["--compression=-1", "--pruner=rand"], "--compression=-1.0 must be in [0, 9]"),
    (["--dataset=imagenet"], "--dataset='imagenet' is not valid"),
    (["--model=vgg16"], "needs 32x32 inputs"),
    (["--model="], "--model='' is not valid"),
    (["--factorize=all", "--pruner=snip"], "no dense kernel to prune"),
    (["--batch_size=0"], "--batch_size=0 must be >= 1"),
    (["--grid=paper_imagenet"], "--grid='paper_imagenet' is not valid"),
    # Values that used to be silently replaced: the sentinels are gone, so they are refused.
    (["--prune_rounds=-1"], "--prune_rounds=-1 must be >= 1"),
    (["--prune_rounds=0", "--pruner=synflow"], "--prune_rounds=0 must be >= 1"),
    (["--pruner=mag", "--pre_epochs=-5"], "--pre_epochs=-5 must be >= 0"),
    (["--seed=-1"], "--seed=-1 must be >= 0"),
    # A flag that the grid sets, given beside it.
    (["--grid=paper_mnist", "--pruner=snip"], "--pruner=snip cannot be combined with --grid"),
    (["--grid=paper_mnist", "--compression=1"], "--compression=1 cannot be combined with"),
    (["--grid=paper_mnist", "--factorize=head"], "--factorize=head cannot be combined with"),
    (["--grid=paper_mnist", "--dataset=mnist"], "--dataset=mnist cannot be combined with"),
    (["--grid=paper_cifar10", "--model=vgg16"], "--model=vgg16 cannot be combined with"),
    # BatchNorm exists only in VGG16: with the FC, given or implied by the dataset, or a grid.
    (["--batch_norm", "--model=fc"], "--batch_norm needs --model=vgg16"),
    (["--batch_norm"], "--batch_norm needs --model=vgg16"),
    (["--batch_norm", "--grid=paper_mnist"], "--batch_norm needs --model=vgg16"),
    # Comma lists: no empty item, no repeated item.
    (["--pruner=snip", "--compression=1,,2"], "--compression='1,,2' has an empty item"),
    (["--pruner=snip", "--compression=1,2,"], "--compression='1,2,' has an empty item"),
    (["--pruner=snip,snip"], "--pruner='snip,snip' lists 'snip' twice"),
    (["--pruner=rand", "--compression=1,1.0"], "--compression='1,1.0' lists '1.0' twice"),
    # Every compression is range-checked, also where no run would use it.
    (["--compression=-1"], "--compression=-1.0 must be in [0, 9]"),
    (["--compression=nan"], "--compression=nan must be in [0, 9]"),
    (["--pruner=snip", "--compression=1,inf"], "--compression=inf must be in [0, 9]"),
    (["--pruner="], "--pruner is empty"),
    # Given, but no run of the command would use it.
    (["--pre_epochs=3"], "--pre_epochs=3 has no effect: no run prunes"),
    (["--compression=7"], "--compression=7 has no effect: no run prunes"),
    (["--pruner=none", "--compression=1"], "--compression=1 has no effect: no run prunes"),
    (["--prune_rounds=2"], "--prune_rounds=2 has no effect: no run prunes"),
    (["--pruner=snip", "--prune_schedule=linear"], "--prune_schedule=linear has no effect"),
    (["--pruner=rand", "--prune_per_class=5"], "--prune_per_class=5 has no effect"),
    (["--factorize_with=monarch"], "--factorize_with=monarch has no effect"),
    (["--prune_factors", "--factorize=head"], "--prune_factors=True has no effect"),
])
def test_bad_flags_fail_fast_with_one_clear_line(args, message, tmp_path):
  out = tmp_path / "out"
  proc = _run(args + [f"--out_dir={out}"])
  assert proc.returncode != 0
  (line,) = proc.stderr.strip().splitlines()  # exactly one line
  assert line.startswith("sweep.py: error: ") and message in line, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not out.exists()


def _dry(args, out):
  """(first line, [(key, finished, settings dict)]) of a --dry_run."""
  proc = _run(args + [f"--out_dir={out}", "--dry_run"])
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  head, *lines = proc.stdout.strip().splitlines()
  runs = []
  for line in lines:
    key, state, rest = line.split(None, 2)
    if state == "to":  # "to do"
      rest = rest.split(None, 1)[1]
    settings = dict(kv.split("=", 1) for kv in rest.split()[1:])
    runs.append((key, state == "finished", settings))
  return head, runs


def test_dry_run_of_the_paper_grid_lists_63_runs_and_writes_nothing(tmp_path):
  out = tmp_path / "out"
  head, runs = _dry(["--grid=paper_mnist"], out)
  assert head.startswith("sweep: 63 runs (0 finished in ")
  assert len(runs) == 63 and len({key for key, _, _ in runs}) == 63
  # The study's grid: 5 pruners x 6 compressions x {dense, butterfly head} + 3 unpruned.
  cells = {(s["factorize"], s["pruner"], float(s["c"])) for _, _, s in runs}
  assert cells == {(f, p, c) for f in ("none", "head")
                   for p in ("rand", "mag", "snip", "grasp", "synflow")
                   for c in (0.05, 0.1, 0.2, 0.5, 1, 2)} | {
                       ("none", "none", 0.0), ("head", "none", 0.0), ("all", "none", 0.0)}
  for _, finished, s in runs:  # the study's defaults: mag pre-trains 10, synflow 100 rounds
    assert not finished
    if s["pruner"] != "none":
      assert s["pre_epochs"] == ("10" if s["pruner"] == "mag" else "0")
      assert s["rounds"] == ("100" if s["pruner"] == "synflow" else "1")
  assert not out.exists()
  _, two_seeds = _dry(["--grid=paper_mnist", "--seeds=2"], out)
  assert len(two_seeds) == 126 and not out.exists()


def test_help_says_what_each_grid_runs_and_agrees_with_the_dry_run(tmp_path):
  proc = _run(["--help"])  # absl prints the help and exits 1
  assert "Traceback" not in proc.stderr
  text = " ".join(proc.stdout.split())  # absl wraps the help text
  assert ("paper_mnist (mnist, fc): 5 pruners (rand, mag, snip, grasp, synflow) x 6 "
          "compressions (0.05, 0.1, 0.2, 0.5, 1, 2) x {dense head, butterfly head} + 3 "
          "unpruned") in text
  for grid in ("paper_mnist", "paper_cifar10"):
    n = int(text.split(f"{grid} (")[1].split(" runs per seed")[0].rsplit("= ", 1)[1])
    assert len(_dry([f"--grid={grid}"], tmp_path / "out")[1]) == n == 63


def test_dry_run_marks_runs_already_in_results_and_changes_nothing(tmp_path):
  out = tmp_path / "out"
  args = ["--pruner=rand,snip", "--compression=1,2"]
  _, runs = _dry(args, out)
  assert len(runs) == 4 and not any(finished for _, finished, _ in runs)
  out.mkdir()
  results = out / "results.jsonl"
  results.write_text(json.dumps({"run_key": runs[2][0], "top1": 50.0}) + "\n")
  before = results.read_bytes()
  head, again = _dry(args, out)
  assert head.startswith(f"sweep: 4 runs (1 finished in {results}, 3 to do)")
  assert [k for k, _, _ in again] == [k for k, _, _ in runs]  # same runs, same order
  assert [finished for _, finished, _ in again] == [False, False, True, False]
  assert results.read_bytes() == before and sorted(p.name for p in out.iterdir()) == [
      "results.jsonl"]


def test_config_default_rounds_is_the_librarys():
  """experiments/config.py keeps its own copy of the rule (importing the library imports jax,
  too slow before flag validation); it must agree with the library's."""
  sys.path.insert(0, str(REPO))
  from experiments import config
  from bfprune.pruning import schedule
  for pruner in config.PAPER_PRUNERS:
    assert config.default_rounds(pruner, None) == schedule.default_rounds(pruner), pruner
    assert config.default_rounds(pruner, 7) == 7


_DRY_RUN_INTO_A_CLOSED_PIPE = """
import os, sys
from pathlib import Path
from experiments import config, sweep
configs = [config.RunConfig(seed=s) for s in range(20000)]  # ~1.5 MB, far over a pipe buffer
before = set(os.listdir("/proc/self/fd"))
sweep.dry_run(configs, Path("results.jsonl"), set())
print("leaked fds:", len(set(os.listdir("/proc/self/fd")) - before), file=sys.stderr)
"""


def test_dry_run_into_a_pipe_closed_early_exits_quietly_and_leaks_no_fd(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", _DRY_RUN_INTO_A_CLOSED_PIPE], cwd=REPO,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  assert proc.stdout.readline().startswith(b"sweep: 20000 runs")  # like `| head -1`
  proc.stdout.close()
  err = proc.stderr.read().decode()
  assert proc.wait(timeout=60) == 0, err
  assert err.strip() == "leaked fds: 0"


def test_nothing_to_do_ends_with_the_summary_line(tmp_path):
  out = tmp_path / "out"
  _, runs = _dry(["--pruner=rand", "--compression=1,2"], out)
  out.mkdir()
  (out / "results.jsonl").write_text("".join(json.dumps({"run_key": k}) + "\n"
                                             for k, _, _ in runs))
  proc = _run(["--pruner=rand", "--compression=1,2", f"--out_dir={out}"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == (
      f"sweep: 2 of 2 runs finished (0 new, 2 already there); results in {out}/results.jsonl")


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_corrupt_results_line_is_one_message_naming_file_and_line(dry_run, tmp_path):
  results = tmp_path / "results.jsonl"
  results.write_text('{"run_key": "a"}\n\n{"run_key": "b", "top1": 9\n{"run_key": "c"}\n')
  proc = _run([f"--out_dir={tmp_path}"] + (["--dry_run"] if dry_run else []))
  assert proc.returncode != 0
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith(f"sweep.py: error: {results}:3: not valid JSON (")
  assert line.endswith("); fix or remove that line")
  assert proc.stdout == ""


def test_a_new_run_is_counted_in_the_summary_and_keeps_the_results_files_mode(tmp_path):
  """One real (tiny) run beside one already finished: the summary counts both, the rewritten
  results file keeps its mode (the atomic rewrite starts from a 0600 temp file), no lock file
  or checkpoint folder is left."""
  out = tmp_path / "out"
  args = ["--seeds=2", "--post_epochs=0", "--train_examples=256", f"--out_dir={out}"]
  _, runs = _dry(args, out)
  out.mkdir()
  results = out / "results.jsonl"
  results.write_text(json.dumps({"run_key": runs[0][0]}) + "\n")
  results.chmod(0o640)
  proc = _run(args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == (
      f"sweep: 2 of 2 runs finished (1 new, 1 already there); results in {results}")
  rows = _rows(out)
  assert [r["run_key"] for r in rows] == [runs[0][0], runs[1][0]] and rows[1]["seed"] == 1
  assert results.stat().st_mode & 0o777 == 0o640
  assert sorted(p.name for p in out.iterdir()) == ["results.jsonl"]


def test_missing_data_is_a_clear_error(tmp_path):
  proc = subprocess.run(SWEEP + ["--post_epochs=1", f"--data_dir={tmp_path}",
                                 f"--out_dir={tmp_path}/out"], env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "data error" in proc.stderr and "train-images-idx3-ubyte" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_prune_per_class_above_a_class_count_is_one_line_before_any_run(tmp_path, mnist):
  out = tmp_path / "out"
  proc = _run(["--pruner=snip,grasp", "--prune_per_class=100", "--train_examples=512",
               f"--out_dir={out}"])
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  counts = np.bincount(mnist.train_y[:512], minlength=10)  # the smallest class of the slice
  c = int(np.argmin(counts))
  assert counts[c] < 100
  assert proc.stderr.strip().splitlines()[-1] == (
      f"sweep.py: error: --prune_per_class=100: snip and grasp prune with 100 examples of "
      f"every class, but class {c} has {counts[c]} of the 512 training examples; lower it, or "
      "raise --train_examples")
  assert not (out / "checkpoints").exists() and not (out / "results.jsonl").exists()


def test_a_checkpoint_that_does_not_fit_the_run_is_one_line_naming_its_folder(tmp_path):
  """A checkpoint left by another version (here: another tree) is reported, not a traceback."""
  out = tmp_path / "out"
  args = ["--post_epochs=0", "--train_examples=256"]
  ((key, _, _),) = _dry(args, out)[1]
  folder = out / "checkpoints" / key
  sys.path.insert(0, str(REPO))
  from bfprune import checkpoint
  ckpt = checkpoint.RunCheckpointer(folder)
  ckpt.save(1, {"state": {"w": np.zeros(3, np.float32)}, "masks": {"w": np.ones(3, bool)}},
            {"phase": "post", "epochs_done": 0, "history": [], "prune_seconds": 0.0,
             "train_seconds": 0.0})
  ckpt.close()
  proc = _run(args + [f"--out_dir={out}"])
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"sweep.py: error: checkpoint {folder} (step 1) does not fit"), last
  assert last.endswith("delete that directory to start the run afresh")
  assert not (out / "results.jsonl").exists() and folder.exists()  # left for the user


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
  for key in ("top1", "top5", "density", "flop_density", "params_total", "params_kept",
              "train_seconds", "inference_seconds", "inference_seconds_sparse", "jax_version",
              "devices", "collapsed"):
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
