"""sweep.py end to end on VGG16 / CIFAR-10 with tiny inputs (32-64 examples, batch 16): every
--factorize, pruning, the row's fields against counts derived here from the architecture, and
SIGKILL + resume reproducing an uninterrupted run."""
import json
import math
import re
import signal
import subprocess
import time

import pytest

from conftest import data_dir  # noqa: F401  (the session checks the data folder first)
from test_sweep import SWEEP, _env, _epochs_logged, _rows

NEEDS_CIFAR10 = True
pytestmark = pytest.mark.slow

# VGG16 as in the study: 13 3x3 convs (channels, input side), one 512 -> 10 dense head.
PLAN = [(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8),
        (256, 256, 8), (256, 512, 4), (512, 512, 4), (512, 512, 4), (512, 512, 2),
        (512, 512, 2), (512, 512, 2)]
CONV_WEIGHTS = [9 * cin * cout for cin, cout, _ in PLAN]
CONV_BIASES = [cout for _, cout, _ in PLAN]
HEAD_DENSE = 512 * 10 + 10
HEAD_BUTTERFLY = 9 * 256 * 4 + 10  # log2(512) factors of 256 2x2 blocks, plus the bias
# Per example: a multiply-add per weight and spatial position, plus the bias adds.
CONV_FLOPS = [side * side * (w + b) for (_, _, side), w, b in zip(PLAN, CONV_WEIGHTS, CONV_BIASES)]

TINY = ["--dataset=cifar10", "--batch_size=16", "--nosparse_inference"]


def _sweep(args, timeout=900):
  # The processes share the session's compilation cache (conftest): later ones compile less.
  proc = subprocess.run(SWEEP + args, env=_env(), capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.mark.parametrize("factorize, pruner", [("none", "snip"), ("head", "snip"),
                                               ("all", "none")])
def test_one_epoch_row(factorize, pruner, tmp_path):
  out = tmp_path / "out"
  prune = [f"--pruner={pruner}"] + (
      ["--compression=1", "--prune_per_class=1"] if pruner == "snip" else [])
  _sweep(TINY + [f"--factorize={factorize}"] + prune + ["--post_epochs=1", "--train_examples=32", "--test_examples=32",
                 f"--out_dir={out}"])
  (row,) = _rows(out)
  assert (row["model"], row["dataset"], row["factorize"], row["pruner"]) == (
      "vgg16", "cifar10", factorize, pruner)
  assert (row["train_examples"], row["test_examples"], row["post_epochs"]) == (32, 32, 1)
  (hist,) = row["history"]
  assert hist["epoch"] == 1 and math.isfinite(hist["train_loss"])
  assert hist["test_top1"] == row["top1"]  # the final evaluation is that of the last epoch
  assert round(row["top1"] * 32 / 100, 6).is_integer() and 0 <= row["top1"] <= row["top5"] <= 100
  assert math.isfinite(row["test_loss"]) and row["inference_seconds"] > 0
  assert row["inference_seconds_sparse"] is None
  assert row["inference_sparse_note"] == "not timed (--nosparse_inference)"
  assert row["processes"] == 1 and len(row["devices"]) == 1
  assert re.fullmatch(r"[0-9a-f]{64}", row["mask_sha256"]) and row["collapsed"] is False

  layers = {l["name"]: l for l in row["layers"]}
  assert list(layers) == [f"conv{i}" for i in range(1, 14)] + ["head"]
  assert sum(l["params"] for l in row["layers"]) == row["params_total"]
  if factorize == "all":  # every layer structured, nothing pruned
    assert row["density"] == 1.0 and row["params_kept"] == row["params_total"]
    assert all(l["kind"] != "conv" for l in row["layers"][:13]) and layers["head"]["kind"] != "dense"
    assert row["flops"] < sum(CONV_FLOPS)  # KOPS2D: fewer multiply-adds than the dense convs
    return
  head = HEAD_DENSE if factorize == "none" else HEAD_BUTTERFLY
  assert row["params_total"] == sum(CONV_WEIGHTS) + sum(CONV_BIASES) + head
  assert [layers[f"conv{i + 1}"]["flops"] for i in range(13)] == CONV_FLOPS
  assert row["flops"] == sum(CONV_FLOPS) + head
  prunable = sum(CONV_WEIGHTS) + (512 * 10 if factorize == "none" else 0)
  kept = round(0.1 * prunable)
  assert abs(row["density"] * prunable - kept) <= 1  # global top-k: exactly 10 % kept
  assert row["params_kept"] == row["params_total"] - prunable + round(row["density"] * prunable)
  assert 0.1 < row["flop_density"] < 1  # conv1/conv2 (most FLOPs per weight) keep more
  if factorize == "head":
    assert layers["head"]["kind"] != "dense" and layers["head"]["params"] == HEAD_BUTTERFLY
    assert layers["head"]["density"] == 1.0  # the butterfly head is not pruned


def test_killed_run_resumes_to_identical_numbers(tmp_path):
  post_epochs = 3
  args = TINY + ["--factorize=head", "--pruner=rand", "--compression=1",
                 f"--post_epochs={post_epochs}", "--train_examples=64", "--test_examples=32"]
  ref = tmp_path / "ref"
  proc = _sweep(args + [f"--out_dir={ref}"])
  assert _epochs_logged(proc.stderr) == list(range(1, post_epochs + 1))
  (ref_row,) = _rows(ref)

  out = tmp_path / "killed"
  ckpts = out / "checkpoints" / ref_row["run_key"]
  with open(tmp_path / "killed.log", "w") as log:
    proc = subprocess.Popen(SWEEP + args + [f"--out_dir={out}"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=log)
    # Checkpoint step 1 is written right after pruning, then one per epoch: kill once the
    # first epoch's (step 2) is there.
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
      try:
        if any(p.name.isdigit() and int(p.name) >= 2 for p in ckpts.iterdir()):
          break
      except FileNotFoundError:  # not created yet (or already removed: poll() says so)
        pass
      time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert _rows(out) == []
  before_kill = _epochs_logged((tmp_path / "killed.log").read_text())

  proc = _sweep(args + [f"--out_dir={out}"])
  resumed = re.findall(r"resumed from \S+ \(phase (\w+), (\d+) epochs done\)", proc.stderr)
  assert len(resumed) == 1, proc.stderr[-3000:]
  k = int(resumed[0][1])
  assert resumed[0][0] == "post" and 1 <= k < post_epochs
  assert before_kill[:k] == list(range(1, k + 1))  # the killed run did train those k epochs
  assert _epochs_logged(proc.stderr) == list(range(k + 1, post_epochs + 1))
  assert "pruned with" not in proc.stderr  # pruning came before the first checkpoint
  (row,) = _rows(out)
  for key in ("top1", "top5", "test_loss", "density", "flop_density", "layers", "mask_sha256"):
    assert row[key] == ref_row[key], key
  for key in ("train_loss", "test_loss", "test_top1"):
    assert [h[key] for h in row["history"]] == [h[key] for h in ref_row["history"]], key
  assert not ckpts.exists()
  assert json.loads((out / "results.jsonl").read_text())["run_key"] == ref_row["run_key"]
