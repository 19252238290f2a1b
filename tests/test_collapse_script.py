"""experiments/collapse.py: bisection on analytic step functions, flag errors, and a tiny real
run whose reported critical compressions are re-checked by pruning with the library directly."""
import csv
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, data_dir

sys.path.insert(0, str(REPO))
from experiments import collapse  # noqa: E402

SCRIPT = [sys.executable, str(REPO / "experiments" / "collapse.py")]
TINY = ["--dataset=mnist", "--pruners=rand,snip", "--heads=none,head", "--resolution=0.5",
        "--c_max=4", "--train_examples=2048", "--train_epochs=1", "--seed=0",
        "--monotone_checks=1"]


def _env():
  return dict(os.environ, BFPRUNE_DATA_DIR=str(data_dir()), JAX_PLATFORMS="cpu")


# ----------------------------------------------------------------------------- bisection


@pytest.mark.parametrize("threshold", [0.0, 0.07, 0.5, 1.234, 2.95, 2.999])
@pytest.mark.parametrize("c_max, resolution", [(3.0, 0.05), (3.0, 0.5), (3.0, 1.0)])
def test_bisection_brackets_the_step_of_an_analytic_function(threshold, c_max, resolution):
  calls = []

  def fails(c):  # a step: fine up to and including `threshold`, failing beyond it
    calls.append(c)
    return c > threshold

  b = collapse.bisect_compression(fails, c_max, resolution)
  expected = math.floor(threshold / resolution + 1e-9) * resolution  # largest grid c <= t
  assert b.status == "bracketed"
  assert b.last_ok == pytest.approx(expected, abs=1e-9)
  assert b.first_fail == pytest.approx(expected + resolution, abs=1e-9)
  assert b.last_ok <= threshold < b.first_fail
  assert list(b.probes) == calls and len(set(calls)) == len(calls)  # never the same c twice
  assert calls[:2] == [0.0, c_max]  # the bracket endpoints are checked first
  assert len(calls) <= 2 + math.ceil(math.log2(round(c_max / resolution)))
  for c in calls:  # probes lie on the grid k * resolution
    assert abs(c / resolution - round(c / resolution)) < 1e-9


def test_bisection_endpoints_and_non_monotone_events():
  b = collapse.bisect_compression(lambda c: True, 2.0, 0.5)
  assert (b.status, b.last_ok, b.first_fail, b.probes) == ("fails_at_0", None, 0.0, (0.0,))
  b = collapse.bisect_compression(lambda c: False, 2.0, 0.5)
  assert (b.status, b.last_ok, b.first_fail, b.probes) == ("censored", 2.0, None, (0.0, 2.0))
  # Failing on an island (1, 2] and again from 3: bisection still returns an adjacent
  # (pass, fail) pair, and the monotone check flags the contradiction in its probes.
  fails = lambda c: 1.0 < c <= 2.0 or c > 3.0
  b = collapse.bisect_compression(fails, 4.0, 0.25)
  assert not fails(b.last_ok) and fails(b.first_fail)
  assert b.first_fail - b.last_ok == pytest.approx(0.25)
  points = [(c, fails(c)) for c in (0.0, 1.5, 2.5, 3.5)]
  assert collapse.monotone_violations(points) == 1  # fails at 1.5, passes at 2.5
  assert collapse.monotone_violations([(0.0, False), (1.0, True), (2.0, True)]) == 0


def test_check_points_flank_the_bracket_on_the_grid():
  b = collapse.Bracket(1.0, 1.5, (0.0, 4.0, 2.0, 1.0, 1.5))
  assert collapse.check_points(b, 2, 4.0, 0.5) == [0.5, 2.5]  # 0 and 2 were probed already
  assert collapse.check_points(b, 0, 4.0, 0.5) == []
  edge = collapse.Bracket(3.5, 4.0, (0.0, 4.0, 3.5))
  assert collapse.check_points(edge, 2, 4.0, 0.5) == [3.0, 2.5]  # nothing above c_max
  assert collapse.check_points(collapse.Bracket(4.0, None, (0.0, 4.0)), 1, 4.0, 0.5) == [3.5]


def test_grid_must_divide_c_max():
  assert collapse.grid_size(6.0, 0.05) == 120
  with pytest.raises(ValueError, match="whole multiple"):
    collapse.grid_size(1.0, 0.3)
  with pytest.raises(ValueError, match="resolution must be > 0"):
    collapse.grid_size(1.0, 0.0)


# ----------------------------------------------------------------------------- script


@pytest.mark.parametrize("args, message", [
    (["--pruners=rand,magic"], "--pruners: 'magic' is not valid"),
    (["--heads=all"], "--heads: 'all' is not valid"),
    (["--resolution=0.3", "--c_max=1"], "--c_max=1 must be a whole multiple of --resolution=0.3"),
    (["--c_max=12"], "--c_max=12 must be in (0, 9]"),
    (["--train_epochs=0"], "--train_epochs=0 must be >= 1"),
    (["--monotone_checks=-1"], "--monotone_checks=-1 must be >= 0"),
    (["--factorize_with=fft"], "--factorize_with='fft' is not valid"),
    (["--dataset=mnist", "--model=vgg16"], "needs 32x32 inputs"),
    (["--model="], "--model='' is not valid"),
    (["--prune_rounds=0"], "--prune_rounds=0 must be >= 1"),
    (["--prune_rounds=-1"], "--prune_rounds=-1 must be >= 1"),
    (["--mag_pre_epochs=-2"], "--mag_pre_epochs=-2 must be >= 0"),
    (["--pruners=rand,,snip"], "--pruners='rand,,snip' has an empty item"),
    (["--searches=collapse,"], "--searches='collapse,' has an empty item"),
    (["--heads=none,none"], "--heads='none,none' lists 'none' twice"),
    (["--pruners=rand", "--mag_pre_epochs=3"], "--mag_pre_epochs=3 has no effect"),
    (["--searches=collapse", "--train_epochs=2"], "--train_epochs=2 has no effect"),
    (["--heads=none", "--factorize_with=monarch"], "--factorize_with=monarch has no effect"),
])
def test_bad_flags_fail_fast_with_one_clear_line(args, message, tmp_path):
  proc = subprocess.run(SCRIPT + args + [f"--out_dir={tmp_path}/out"], env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  (line,) = proc.stderr.strip().splitlines()  # exactly one line
  assert line.startswith("collapse.py: error: ") and message in line, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "out").exists()


_GOOD_ROW = {"kind": "collapse", "probe_key": "0123456789abcdef", "pruner": "rand",
             "factorize": "none", "compression": 0.5, "collapsed": False}


@pytest.mark.parametrize("bad, problem", [
    ({k: v for k, v in _GOOD_ROW.items() if k != "collapsed"},
     "a collapse probe row has no 'collapsed' (a bool)"),
    (dict(_GOOD_ROW, kind="accuracy", below_threshold=False, top1="high"),
     "an accuracy probe row has 'high' as 'top1' (a number)"),
    (dict(_GOOD_ROW, compression=True), "a collapse probe row has True as 'compression'"),
    ({"run_key": "abc", "top1": 9.0}, "'kind' is None, not a probe of collapse.py"),
])
def test_a_row_missing_what_the_searches_read_is_one_line_naming_file_and_line(bad, problem,
                                                                               tmp_path):
  results = tmp_path / "results.jsonl"
  results.write_text(json.dumps(_GOOD_ROW) + "\n\n" + json.dumps(bad) + "\n")
  before = results.read_bytes()
  proc = subprocess.run(SCRIPT + TINY + [f"--out_dir={tmp_path}", "--dry_run"], env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith(f"collapse.py: error: {results}:3: "), line
  assert problem in line, line
  assert line.endswith("; fix or remove that line") and proc.stdout == ""
  assert results.read_bytes() == before


def test_default_out_dir_is_a_user_folder_not_the_committed_results(tmp_path):
  proc = subprocess.run(SCRIPT + TINY + ["--dry_run"], env=_env(), cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert " finished in runs/collapse/mnist/results.jsonl, " in proc.stdout.splitlines()[0]
  assert not (tmp_path / "runs").exists()


def test_too_few_examples_of_a_class_for_snip_is_one_line_before_any_probe(tmp_path, mnist):
  out = tmp_path / "out"
  proc = subprocess.run(SCRIPT + ["--pruners=rand,snip", "--heads=none", "--searches=collapse",
                                  "--train_examples=60", "--batch_size=20",
                                  f"--out_dir={out}"],
                        env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  counts = np.bincount(mnist.train_y[:60], minlength=10)  # SNIP draws 10 of every class
  c = int(np.argmin(counts))
  assert counts[c] < 10
  assert proc.stderr.strip().splitlines()[-1] == (
      f"collapse.py: error: --train_examples=60: snip and grasp prune with 10 examples of "
      f"every class, but class {c} has {counts[c]} of the 60 training examples; raise it, or "
      "leave snip and grasp out of --pruners")
  assert not out.exists()


def _prune_and_detect(dataset, pruner, head, c):
  """Re-prunes with the library (independently of the script's probe cache) and detects."""
  import jax
  import jax.numpy as jnp
  from bfprune import metrics, train
  from bfprune.pruning import masks as masks_lib
  from experiments import pipeline
  from experiments.config import RunConfig
  cfg = RunConfig(dataset="mnist", model="fc", factorize=head, pruner=pruner, compression=c,
                  seed=0, train_examples=2048)
  model = pipeline.build_model(cfg)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  ones = masks_lib.ones_like(variables["params"])
  state = train.init_state(variables, ones, train.adam(1e-3))
  masks = pipeline.prune_masks(cfg, model, dataset, state, ones, (28, 28, 1))
  assert masks_lib.density(masks) == pytest.approx(10.0 ** -c, rel=0.02)
  return metrics.detect_collapse(model, variables, masks, (28, 28, 1))[0]


DRY_LINE = re.compile(r"^(\S+) +(dense head|butterfly head) +(collapse|accuracy) +"
                      r"(finished +c\* = (\S+) \((\w+)\)|to do +next probe c = (\S+)); "
                      r"(\d+) probe\(s\) stored$")


def _dry_run(out):
  """{(pruner, head, search): (c* or None, status or next probe c, probes stored)}."""
  proc = subprocess.run(SCRIPT + TINY + [f"--out_dir={out}", "--dry_run"], env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  head, *lines = proc.stdout.strip().splitlines()
  assert head.startswith("collapse: 8 searches (2 pruners x 2 heads x 2 searches, c in [0, 4] "
                         "step 0.5): ")
  out = {}
  for line in lines:
    m = DRY_LINE.match(line)
    assert m, line
    key = (m[1], "none" if m[2] == "dense head" else "head", m[3])
    out[key] = (m[5], m[6], int(m[8])) if m[5] else (None, float(m[7]), int(m[8]))
  assert len(out) == 8
  return head, out


def test_tiny_run_reports_consistent_critical_compressions_and_resumes(tmp_path, mnist):
  out = tmp_path / "out"
  head, searches = _dry_run(out)  # before: every search starts at c = 0, nothing written
  assert "0 finished" in head and set(searches.values()) == {(None, 0.0, 0)}
  assert not out.exists()
  args = SCRIPT + TINY + [f"--out_dir={out}", f"--compilation_cache={tmp_path}/jax_cache"]
  proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("collapse.md", "collapse.csv", "collapse.png", "results.jsonl"):
    assert (out / name).stat().st_size > 0, name
  assert (out / "collapse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  rows = list(csv.DictReader((out / "collapse.csv").open()))
  assert {(r["pruner"], r["head"], r["search"]) for r in rows} == {
      (p, h, s) for p in ("rand", "snip") for h in ("none", "head")
      for s in ("collapse", "accuracy")}
  md = (out / "collapse.md").read_text()
  assert md.count("| rand |") == 2 and md.count("| snip |") == 2

  probes = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
  keys = [(p["kind"], p["probe_key"]) for p in probes]
  assert len(keys) == len(set(keys))  # no probe computed twice

  small = mnist._replace(train_x=mnist.train_x[:2048], train_y=mnist.train_y[:2048])
  for r in rows:
    if r["search"] != "collapse":
      continue
    # FC / MNIST: intact at density 1, certainly collapsed at 10^-4 (12 weights for 6 layers).
    assert r["status"] == "bracketed", r
    c_star, c_fail = float(r["c_star"]), float(r["c_fail"])
    assert c_fail == pytest.approx(c_star + 0.5)
    assert float(r["density_star"]) == pytest.approx(10.0 ** -c_star)
    seen = {p["compression"]: p["collapsed"] for p in probes if p["kind"] == "collapse"
            and (p["pruner"], p["factorize"]) == (r["pruner"], r["head"])}
    assert int(r["checked_points"]) == len(seen)
    for flank in (c_star - 0.5, c_fail + 0.5):  # --monotone_checks=1 probes both flanks
      assert not 0 <= flank <= 4 or flank in seen, (flank, sorted(seen))
    bad = sum(1 for c1, f1 in seen.items() for c2, f2 in seen.items() if c1 < c2 and f1 and not f2)
    assert int(r["monotone_violations"]) == bad
    assert not _prune_and_detect(small, r["pruner"], r["head"], c_star), r
    assert _prune_and_detect(small, r["pruner"], r["head"], c_fail), r
  for r in rows:
    if r["search"] == "accuracy" and r["status"] == "bracketed":
      ok = [p for p in probes if p["kind"] == "accuracy" and p["pruner"] == r["pruner"]
            and p["factorize"] == r["head"] and p["compression"] == float(r["c_star"])]
      assert ok and ok[0]["top1"] >= 20.0 and float(r["top1_at_c_star"]) == ok[0]["top1"]

  # A dry run now replays every search from results.jsonl to the table's c* and status.
  head, searches = _dry_run(out)
  assert "8 finished" in head
  for r in rows:
    c_star, status, stored = searches[(r["pruner"], r["head"], r["search"])]
    assert (c_star, status) == (f"{float(r['c_star']):g}" if r["c_star"] else "—", r["status"])
    assert stored == int(r["checked_points"])

  # Rerunning replays every probe from results.jsonl: nothing computed, the same table.
  table = (out / "collapse.csv").read_text()
  again = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "0 probes computed" in again.stderr
  assert (out / "results.jsonl").read_text().count("\n") == len(probes)
  assert (out / "collapse.csv").read_text() == table
