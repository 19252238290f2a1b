"""experiments/report.py: table cells (with their seed counts) against numpy, spelled-out labels
and settings captions, legends that match the marks used, Table 2's split and load marks,
Figure 1's broken lines and visible markers, Figure 3's legend against its bars, CSV round trip,
clear errors. Synthetic rows, no training."""
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from experiments import report  # noqa: E402

LAYERS = ("fc1", "fc2", "fc3", "fc4", "fc5", "head")
PRUNERS = ("rand", "snip", "synflow")
NAMES = {"rand": "Rand", "snip": "SNIP", "synflow": "SynFlow"}
COMPRESSIONS = (0.1, 0.5, 1.0)
SEEDS = (0, 1)
COLLAPSED = ("head", "synflow", 1.0, 1)  # (factorize, pruner, compression, seed)


def _row(rng, factorize, pruner, c, seed, **over):
  flops = rng.integers(1000, 5000, size=len(LAYERS))
  kept = flops * rng.uniform(0.05, 1.0, size=len(LAYERS))
  collapsed = (factorize, pruner, c, seed) == COLLAPSED
  row = {
      "dataset": "mnist", "model": "fc", "factorize": factorize, "pruner": pruner,
      "compression": c, "pre_epochs": 0, "post_epochs": 50,
      "prune_rounds": 100 if pruner == "synflow" else 1, "prune_schedule": "exponential",
      "prune_scope": "global", "prune_per_class": 10, "batch_size": 256, "lr": 1e-3,
      "dropout": 0.1, "batch_norm": False, "seed": seed, "train_examples": 60000,
      "test_examples": 10000, "factorize_with": "butterfly", "prune_factors": False,
      "top1": 11.35 if collapsed else float(rng.uniform(80, 99)),
      "inference_seconds": float(rng.uniform(0.01, 0.2)),
      "flop_density": float(kept.sum() / flops.sum()),
      "density": 10.0 ** -c if pruner != "none" else 1.0,
      "collapsed": collapsed, "collapsed_layer": "fc5" if collapsed else None,
      "devices": ["cpu:0"], "jax_version": "0.10.2",
      # Throughputs within 20 % of each other: no run counts as timed under a heavier load.
      "history": [{"epoch": 1, "examples_per_s": float(rng.uniform(900, 1100))}],
      "layers": [{"name": n, "kind": "dense", "flops": int(f), "flops_kept": float(k),
                  "weights": 10, "kept": 5, "density": 0.5}
                 for n, f, k in zip(LAYERS, flops, kept)]
                + [{"name": "bn", "kind": "norm", "flops": 64, "flops_kept": 64.0}],
  }
  row.update(over)
  row["run_key"] = json.dumps([row[k] for k in ("factorize", "pruner", "compression", "seed",
                                                "prune_rounds", "pre_epochs", "dataset")])
  return row


@pytest.fixture(scope="module")
def rows():
  rng = np.random.default_rng(0)
  out = []
  for fac in ("none", "head"):
    for p in PRUNERS:
      for c in COMPRESSIONS:
        for s in SEEDS:
          out.append(_row(rng, fac, p, c, s))
    for s in SEEDS:
      out.append(_row(rng, fac, "none", 0.0, s))
  for s in SEEDS:
    out.append(_row(rng, "all", "none", 0.0, s))
  # A second dataset / architecture with a single seed.
  out.append(_row(rng, "none", "rand", 0.1, 0, dataset="cifar10", model="vgg16",
                  train_examples=50000))
  return out


@pytest.fixture(scope="module")
def runs(rows):
  return report.runs_from_rows(rows)


def _select(rows, **kw):
  return [r for r in rows if all(r[k] == v for k, v in kw.items())]


def _expected(vals, fmt, collapsed=0, busy=0):
  """The cell text written out independently: mean [± std] [marks] (n=k)."""
  vals = np.asarray(vals, float)
  s = format(vals.mean(), fmt)
  if len(vals) > 1:
    s += " ± " + format(np.std(vals, ddof=1), fmt)
  for mark, k in (("†", collapsed), ("‡", busy)):
    if k:
      s += f" {mark}" + (f"({k}/{len(vals)})" if k < len(vals) else "")
  return s + f" (n={len(vals)})"


def _cell(table, method, column):
  col = table.header.index(column)
  for r in table.rows:
    if r[0] == method:
      return r[col]
  raise KeyError((method, column))


def _t2(tables, kind, dm, head):
  (t,) = [t for t in tables if f", {kind}, {dm}, {head}" in t.title]
  return t


@pytest.mark.parametrize("c", [0.1, 1.0])
def test_table1_cells_are_mean_std_and_seed_count(rows, runs, c):
  t = report.table1(runs, c)
  assert "c = " + f"{c:g}" in t.title and f"{10 ** -c:.3g}" in t.title
  # One column per dataset / architecture x head (two datasets here).
  assert t.header == ["Method", "MNIST / FC, dense head", "MNIST / FC, butterfly head",
                      "CIFAR-10 / VGG16, dense head", "CIFAR-10 / VGG16, butterfly head"]
  assert [r[0] for r in t.rows] == ["Rand", "SNIP", "SynFlow", "Unpruned", "All-factorized"]
  for fac, head in (("none", "dense head"), ("head", "butterfly head")):
    col = f"MNIST / FC, {head}"
    for p in PRUNERS:
      sel = _select(rows, dataset="mnist", factorize=fac, pruner=p, compression=c)
      assert len(sel) == 2
      text = _cell(t, NAMES[p], col)
      assert text == _expected([r["top1"] for r in sel], ".2f",
                               sum(r["collapsed"] for r in sel))
      assert text.endswith("(n=2)")
    sel = _select(rows, dataset="mnist", factorize=fac, pruner="none")
    assert _cell(t, "Unpruned", col) == _expected([r["top1"] for r in sel], ".2f")
    sel = _select(rows, factorize="all")
    assert _cell(t, "All-factorized", col) == _expected([r["top1"] for r in sel], ".2f")
  # The collapse mark sits exactly in the collapsed run's cell (1 of 2 seeds), nowhere else.
  marked = [(r[0], t.header[j]) for r in t.rows for j, x in enumerate(r) if "†" in x]
  assert marked == ([("SynFlow", "MNIST / FC, butterfly head")] if c == 1.0 else [])
  # A single seed says n=1 and has no ±; a cell without runs shows the missing mark.
  rand = [r for r in rows if r["dataset"] == "cifar10"][0]
  expect = f"{rand['top1']:.2f} (n=1)" if c == 0.1 else "–"
  assert _cell(t, "Rand", "CIFAR-10 / VGG16, dense head") == expect
  assert _cell(t, "Rand", "CIFAR-10 / VGG16, butterfly head") == "–"


def test_csv_parses_back_to_the_same_numbers(rows, runs):
  t = report.table1(runs, 1.0)
  recs = list(csv.DictReader(io.StringIO(report.to_csv(t))))
  assert len(recs) == len(t.records) > 0
  checked = 0
  for rec in recs:
    kw = {"dataset": rec["dataset"], "factorize": rec["head"], "pruner": rec["pruner"]}
    if rec["compression"]:
      kw["compression"] = float(rec["compression"])
      assert float(rec["density_nominal"]) == pytest.approx(10 ** -float(rec["compression"]))
    vals = [r["top1"] for r in _select(rows, **kw)]
    assert int(rec["n"]) == len(vals)
    assert rec["text"].endswith(f"(n={len(vals)})")
    assert float(rec["mean"]) == pytest.approx(np.mean(vals), rel=1e-12)
    assert float(rec["std"]) == pytest.approx(np.std(vals, ddof=1) if len(vals) > 1 else 0.0,
                                              abs=1e-12)
    assert int(rec["n_collapsed"]) == sum(r["collapsed"] for r in _select(rows, **kw))
    checked += 1
  # 3 pruners x 2 heads + 2 unpruned + all-factorized (MNIST); CIFAR-10 has nothing at c=1.
  assert checked == 3 * 2 + 2 + 1


def test_labels_and_captions_spell_out_settings(rows):
  rng = np.random.default_rng(1)
  extra = [_row(rng, "none", "synflow", 1.0, s, prune_rounds=1) for s in SEEDS]
  extra += [_row(rng, f, "mag", 1.0, 0, pre_epochs=pre) for f in ("none", "head")
            for pre in (0, 10)]
  runs = report.runs_from_rows(rows + extra)
  t = report.table1(runs, 1.0)
  methods = [r[0] for r in t.rows]
  assert methods == ["Rand", "Mag (no pre-training)", "Mag (10 pre-training epochs)", "SNIP",
                     "SynFlow (1 pruning round)", "SynFlow (100 pruning rounds)", "Unpruned",
                     "All-factorized"]
  assert not any(re.search(r"\w=\d|\+ BH|\[", m) for m in methods + t.header)
  assert _cell(t, "SynFlow (1 pruning round)", "MNIST / FC, dense head") == _expected(
      [r["top1"] for r in extra[:2]], ".2f")
  assert _cell(t, "SynFlow (1 pruning round)", "MNIST / FC, butterfly head") == "–"
  # Everything is the study's: the caption says so and names no setting.
  assert report.settings_caption(runs) == ""
  assert any("study's settings" in line for line in t.caption)

  # A reduced grid: every run 1 epoch on 5,085 examples, Mag pre-trained 1 epoch.
  reduced = [dict(r, post_epochs=1, train_examples=5085,
                  pre_epochs=1 if r["pruner"] == "mag" else 0)
             for r in rows + extra if r["dataset"] == "mnist" and r.get("pre_epochs") != 10]
  t = report.table1(report.runs_from_rows(reduced), 1.0)
  caption = " ".join(t.caption)
  assert ("every run: 1 training epoch after pruning (study: 50), 5,085 training examples "
          "(study: 60,000)") in caption
  assert "Mag: 1 pre-training epoch (study: 10)" in caption
  assert "Mag" in [r[0] for r in t.rows]  # one Mag variant left: no label needed
  tables2 = report.table2(report.runs_from_rows(reduced))
  assert all("1 training epoch after pruning (study: 50)" in " ".join(x.caption)
             for x in tables2)
  # Runs on different training-set sizes are different experiments, never one cell.
  mixed = report.runs_from_rows(rows + [dict(r, train_examples=5085, run_key=r["run_key"] + "s")
                                        for r in _select(rows, pruner="rand", dataset="mnist")])
  labels = [r[0] for r in report.table1(mixed, 1.0).rows]
  assert "Rand (5,085 training examples)" in labels and "Rand (60,000 training examples)" in labels


def test_table2_split_per_timing_and_head_fits_a_screen(rows, runs):
  tables = report.table2(runs)
  titles = [t.title for t in tables]
  assert titles == ["Table 2a: inference seconds, masked-dense model, MNIST / FC, dense head",
                    "Table 2b: inference seconds, masked-dense model, MNIST / FC, butterfly head",
                    "Table 2c: inference seconds, masked-dense model, CIFAR-10 / VGG16, dense "
                    "head"]
  for t in tables:
    md = report.to_markdown(t)
    assert max(len(line) for line in md.splitlines() if line.startswith("|")) < 200
  for fac, head in (("none", "dense head"), ("head", "butterfly head")):
    t = _t2(tables, "masked-dense model", "MNIST / FC", head)
    assert t.header == ["Method"] + [f"c = {c:g} (density {10 ** -c:.3g})" for c in COMPRESSIONS]
    assert [r[0] for r in t.rows] == ["Rand", "SNIP", "SynFlow"]
    for c in COMPRESSIONS:
      for p in PRUNERS:
        sel = _select(rows, dataset="mnist", factorize=fac, pruner=p, compression=c)
        assert _cell(t, NAMES[p], f"c = {c:g} (density {10 ** -c:.3g})") == _expected(
            [r["inference_seconds"] for r in sel], ".3g", sum(r["collapsed"] for r in sel))
    # The compression-independent nets are stated once, in the caption, with their counts.
    unp = _select(rows, dataset="mnist", factorize=fac, pruner="none")
    allf = _select(rows, factorize="all")
    ref = (f"Not pruned (the same at every c): Unpruned "
           f"{_expected([r['inference_seconds'] for r in unp], '.3g')}; All-factorized "
           f"{_expected([r['inference_seconds'] for r in allf], '.3g')}.")
    assert ref in t.caption
    recs = list(csv.DictReader(io.StringIO(report.to_csv(t))))
    assert len(recs) == 3 * 3 + 2  # every (pruner, c) once, then the two references
    assert {r["timing_env"] for r in recs} == {"cpu:0, jax 0.10.2"}
    timing = [line for line in t.caption if line.startswith("Timing conditions")]
    assert len(timing) == 1 and "every timing recorded on cpu:0, jax 0.10.2" in timing[0]
    assert "0 of 22 timings ran at under 0.5x it" in timing[0]
  # CIFAR-10 has no butterfly-head run: no table, and the first table of its kind says so.
  t = _t2(tables, "masked-dense model", "CIFAR-10 / VGG16", "dense head")
  assert "No masked-dense model timing for the butterfly head: no table for it." in t.caption


def _busy_rows(rows):
  """Rows where one run's last epoch ran at a quarter of the others' throughput."""
  out = []
  for r in rows:
    r = json.loads(json.dumps(r))
    if (r["dataset"], r["factorize"], r["pruner"], r["compression"], r["seed"]) == \
        ("mnist", "none", "snip", 0.5, 1):
      r["history"][-1]["examples_per_s"] = 250.0
    out.append(r)
  return out


def test_table2_marks_timings_taken_under_a_heavier_load(rows):
  new = _busy_rows(rows)
  tables = report.table2(report.runs_from_rows(new))
  t = _t2(tables, "masked-dense model", "MNIST / FC", "dense head")
  # Independent check of the rule: under half the median throughput of the same net.
  thr = [r["history"][-1]["examples_per_s"] for r in new
         if (r["dataset"], r["factorize"]) == ("mnist", "none")]
  med = np.median(thr)
  assert 250.0 < 0.5 * med < min(x for x in thr if x != 250.0)
  marked = [(r[0], t.header[j]) for r in t.rows for j, x in enumerate(r) if "‡" in x]
  assert marked == [("SNIP", "c = 0.5 (density 0.316)")]
  sel = _select(new, dataset="mnist", factorize="none", pruner="snip", compression=0.5)
  assert _cell(t, "SNIP", "c = 0.5 (density 0.316)") == _expected(
      [r["inference_seconds"] for r in sel], ".3g", busy=1)
  timing = [line for line in t.caption if line.startswith("Timing conditions")][0]
  assert f"{med:,.0f} examples/s for the dense head net" in timing
  assert "1 of 22 timings ran at under 0.5x it (‡)" in timing
  assert any(line.startswith("‡: timed while the machine was busier") for line in t.legend)
  # The butterfly-head table has no such run: neither the mark nor its explanation.
  tb = _t2(tables, "masked-dense model", "MNIST / FC", "butterfly head")
  assert not any("‡" in x for x in tb.cell_texts() + tb.legend)


def _mixed_timing_rows(rows):
  """Sparse timings: seed 0 backfilled on another jax, seed 1 in-run; one busy run."""
  out = []
  for r in _busy_rows(rows):
    if r["dataset"] == "mnist" and r["factorize"] == "none":
      r["inference_seconds_sparse"] = r["inference_seconds"] / 3
      if r["seed"] == 0:
        r["inference_seconds_sparse_backfilled"] = True
        r["jax_version"] = "0.9.0"
    out.append(r)
  return out


def test_every_mark_used_is_explained_and_every_explanation_is_used(rows):
  runs = report.runs_from_rows(_mixed_timing_rows(rows))
  tables = report.table2(runs) + [report.table1(runs, c) for c in (0.1, 1.0)]
  seen = set()
  for t in tables:
    cells = t.cell_texts()
    for mark in report.MARKS:
      used = any(mark in x for x in cells)
      explained = [line for line in t.legend if line.startswith(mark + ":")]
      assert used == bool(explained), (t.title, mark)
      seen |= {mark} if used else set()
    partial = any(re.search(r"[†‡§]\(\d+/\d+\)", x) for x in cells)
    assert partial == any("(k/m)" in line for line in t.legend), t.title
    assert any(" ± " in x for x in cells) == any("a ± b" in line for line in t.legend)
    tags = {g for x in cells for m in re.findall(r" \[([A-Z,]+)\]", x) for g in m.split(",")}
    env_line = [line for line in t.legend if line.startswith("Timing environment")]
    assert set(re.findall(r"\[([A-Z])\]", " ".join(env_line))) == tags, t.title
    assert all(re.search(r"\(n=\d+\)$", x) for x in cells if x != "–")
  # The data exercise every kind of mark at least once.
  assert seen == set(report.MARKS)
  sparse = _t2(report.table2(runs), "real sparse forward", "MNIST / FC", "dense head")
  # Seeds 0 (backfilled, jax 0.9.0) and 1 (in run, jax 0.10.2) in every cell.
  assert all(x.endswith("§(1/2) [A,B] (n=2)") or "†" in x or "‡" in x
             for r in sparse.rows for x in r[1:])
  assert "[A] cpu:0, jax 0.10.2; [B] cpu:0, jax 0.9.0" in " ".join(sparse.legend)
  assert "10 of 20 sparse timings backfilled" in " ".join(sparse.caption)


def test_table2_sparse_tables_and_dash_for_old_rows(rows):
  """Rows with inference_seconds_sparse (new), without it (old) and with None (unsupported)."""
  rng = np.random.default_rng(2)
  new = []
  for r in rows:
    r = dict(r)
    if r["dataset"] == "mnist" and r["factorize"] == "none" and r["seed"] == 0:
      r["inference_seconds_sparse"] = float(rng.uniform(0.001, 0.05))  # a new row
      r["inference_seconds_sparse_backfilled"] = True
    elif r["dataset"] == "mnist" and r["factorize"] == "head" and r["pruner"] == "rand":
      r["inference_seconds_sparse"] = None  # butterfly head: no sparse path
    new.append(r)  # everything else: an old row without the field
  tables = report.table2(report.runs_from_rows(new))
  assert [t.title.split(", ", 1)[1] for t in tables] == [
      "masked-dense model, MNIST / FC, dense head",
      "masked-dense model, MNIST / FC, butterfly head",
      "real sparse forward, MNIST / FC, dense head",
      "masked-dense model, CIFAR-10 / VGG16, dense head"]
  t = tables[2]
  assert "No real sparse forward timing for the butterfly head: no table for it." in t.caption
  assert any("every sparse timing here was backfilled" in line for line in t.caption)
  for c in COMPRESSIONS:
    col = f"c = {c:g} (density {10 ** -c:.3g})"
    for p in PRUNERS:
      sel = _select(new, dataset="mnist", factorize="none", pruner=p, compression=c)
      have = [r for r in sel if "inference_seconds_sparse" in r]
      assert len(have) == 1 and len(sel) == 2  # seed 0 new, seed 1 old
      assert _cell(t, NAMES[p], col) == _expected(
          [have[0]["inference_seconds_sparse"]], ".3g", int(have[0]["collapsed"]))
      # The masked-dense table still averages both seeds.
      assert _cell(tables[0], NAMES[p], col) == _expected(
          [r["inference_seconds"] for r in sel], ".3g", sum(r["collapsed"] for r in sel))
  unpruned = _select(new, dataset="mnist", factorize="none", pruner="none", seed=0)
  assert (f"Unpruned {_expected([unpruned[0]['inference_seconds_sparse']], '.3g')}; "
          f"All-factorized –.") in " ".join(t.caption)
  assert "–: no run, or no sparse timing." in t.legend
  md = report.to_markdown(t).splitlines()
  assert "| " + " | ".join(t.header) + " |" in md
  recs = list(csv.DictReader(io.StringIO(report.to_csv(t))))
  assert {r["metric"] for r in recs} == {"inference_seconds_sparse"}
  for rec in recs:
    kw = {"dataset": "mnist", "factorize": rec["head"], "pruner": rec["pruner"]}
    if rec["compression"]:
      kw["compression"] = float(rec["compression"])
    vals = [r["inference_seconds_sparse"] for r in _select(new, **kw)
            if r.get("inference_seconds_sparse") is not None]
    assert int(rec["n"]) == len(vals)
    if vals:
      assert float(rec["mean"]) == pytest.approx(np.mean(vals), rel=1e-12)
    else:
      assert rec["text"] == "–"
  # Rows without the field at all (every row written before it existed): no sparse table.
  assert not any("sparse" in x.title for x in report.table2(report.runs_from_rows(rows)))


def test_duplicate_run_key_keeps_last_and_missing_fields_are_clear(rows):
  dup = dict(rows[0], top1=1.0)
  runs = report.runs_from_rows(rows + [dup])
  assert len(runs) == len(rows)
  assert [r.top1 for r in runs if r.col_key[1] == "rand" and r.factorize == "none"
          and r.compression == 0.1 and r.seed == 0 and r.dataset == "mnist"] == [1.0]
  with pytest.raises(report.ReportError, match="'pruner'"):
    report.runs_from_rows([{"dataset": "mnist", "top1": 1.0}])
  # The total parameter count: params_total, or params in rows written before the rename.
  (new,) = report.runs_from_rows([dict(rows[0], params_total=1234)])
  (old,) = report.runs_from_rows([dict(rows[0], params=999)])
  assert (new.params_total, old.params_total) == (1234, 999)


def test_figure_data_mark_collapse_and_layer_densities(rows, runs):
  series = report.curve_series(runs, "mnist", "fc", "top1")
  labels = [s.label for s in series]
  assert labels == ["Rand, dense head", "Rand, butterfly head", "SNIP, dense head",
                    "SNIP, butterfly head", "SynFlow, dense head", "SynFlow, butterfly head"]
  for s in series:
    assert s.x == COMPRESSIONS and s.n == (2, 2, 2)
    expect = [1 if (s.factorize, "synflow", c) == COLLAPSED[:3] and "SynFlow" in s.label else 0
              for c in COMPRESSIONS]
    assert list(s.n_collapsed) == expect
    if any(expect):  # the collapsed run itself is marked at its own accuracy
      assert s.collapsed_points == ((COLLAPSED[2], 11.35),)
    else:
      assert s.collapsed_points == ()
  names, prof = report.layer_profiles(runs, "mnist", "fc", 1.0)
  assert names == list(LAYERS)  # the norm layer (never pruned) is left out
  for key, by_head in prof.items():
    for fac, (mean, collapsed) in by_head.items():
      sel = _select(rows, dataset="mnist", factorize=fac, pruner=key[1], compression=1.0)
      per_seed = [[l["flops_kept"] / l["flops"] for l in r["layers"] if l["kind"] != "norm"]
                  for r in sel]
      np.testing.assert_allclose(mean, np.mean(per_seed, axis=0), rtol=1e-12)
      assert collapsed == (["fc5"] if (fac, key[1]) == COLLAPSED[:2] else [])


def _by_gid(fig, gid):
  return [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]


def test_figure1_breaks_lines_at_missing_compressions_without_offsets(rows):
  import matplotlib.pyplot as plt
  # SNIP (dense head) without c = 0.5: its line must not join 0.1 to 1.
  kept = [r for r in rows if not (r["pruner"] == "snip" and r["factorize"] == "none"
                                  and r["compression"] == 0.5)]
  runs = report.runs_from_rows(kept)
  fig = report.figure1(runs, "mnist", "fc")
  try:
    (gap,) = _by_gid(fig, "line:SNIP, dense head")
    x, y = np.asarray(gap.get_xdata(), float), np.asarray(gap.get_ydata(), float)
    assert list(x) == list(COMPRESSIONS)
    assert list(np.isnan(y)) == [False, True, False]  # two pieces, nothing drawn across 0.5
    for c, v in zip(x[[0, 2]], y[[0, 2]]):
      sel = _select(kept, dataset="mnist", factorize="none", pruner="snip", compression=c)
      assert v == pytest.approx(np.mean([r["top1"] for r in sel]))
    (full,) = _by_gid(fig, "line:SNIP, butterfly head")
    assert not np.isnan(np.asarray(full.get_ydata(), float)).any()
    # Markers sit exactly on the compressions: no sideways offsets.
    for s in report.curve_series(runs, "mnist", "fc", "top1"):
      xs = np.concatenate([m.get_offsets()[:, 0] for m in _by_gid(fig, f"markers:{s.label}")])
      assert sorted(set(xs)) == sorted(s.x)
  finally:
    plt.close(fig)


def test_coinciding_series_stay_visible(rows):
  """Two series with identical values (both collapsed at chance accuracy): the one drawn first
  gets the larger marker, the other sits on top of it, so both show."""
  import matplotlib.pyplot as plt
  same = []
  for r in rows:
    r = dict(r)
    if r["dataset"] == "mnist" and r["pruner"] in ("rand", "snip") and r["factorize"] == "none":
      r["top1"] = 10.0
    same.append(r)
  runs = report.runs_from_rows(same)
  fig = report.figure1(runs, "mnist", "fc")
  try:
    rand = _by_gid(fig, "markers:Rand, dense head")
    snip = _by_gid(fig, "markers:SNIP, dense head")
    size = lambda coll: np.sqrt(coll.get_sizes())  # noqa: E731
    for c in COMPRESSIONS:
      (r_coll,) = [m for m in rand if c in m.get_offsets()[:, 0]]
      (s_coll,) = [m for m in snip if c in m.get_offsets()[:, 0]]
      assert size(r_coll)[0] > size(s_coll)[0]  # a ring of Rand around SNIP
      assert s_coll.get_zorder() > r_coll.get_zorder()  # the smaller one drawn above
    # Butterfly head: hollow (white face) markers with the method's colour on the edge.
    (bh,) = _by_gid(fig, "markers:Rand, butterfly head")[:1]
    assert tuple(bh.get_facecolor()[0][:3]) == (1.0, 1.0, 1.0)
    assert tuple(bh.get_edgecolor()[0][:3]) == tuple(rand[0].get_facecolor()[0][:3])
  finally:
    plt.close(fig)
  # The sizing rule itself: three equal points nest, a distant one stays at the base size.
  ys = np.array([[1.0], [1.0], [1.0], [5.0]])
  sizes = report.marker_sizes(ys, tol=0.01, base=6.0)[:, 0]
  assert sizes[0] > sizes[1] > sizes[2] == 6.0 and sizes[3] == 6.0
  assert sizes[1] - sizes[2] >= 2.0


def test_figure3_legend_matches_its_bars(rows, runs):
  import matplotlib.pyplot as plt
  from matplotlib.colors import to_rgba
  fig = report.figure3(runs, "mnist", "fc", 1.0)
  try:
    (legend,) = fig.legends
    handles = {t.get_text(): h for t, h in zip(legend.get_texts(), legend.legend_handles)}
    bar_labels, hatched = set(), False
    for ax in fig.axes:
      for cont in ax.containers:
        bar_labels.add(cont.get_label())
        h = handles[cont.get_label()]
        for patch in cont.patches:
          assert to_rgba(patch.get_facecolor()) == to_rgba(h.get_facecolor())
          hatched |= bool(patch.get_hatch())
    heads = {"dense head", "butterfly head"}
    assert bar_labels == heads
    assert heads <= set(handles)
    # The collapsed SynFlow run's bars are hatched, and only then the legend says so.
    assert hatched and any("collapsed run" in t for t in handles)
  finally:
    plt.close(fig)
  fig = report.figure3(runs, "mnist", "fc", 0.5)  # no collapsed run at c = 0.5
  try:
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert not any("collapsed" in t for t in texts)
    assert not any(p.get_hatch() for ax in fig.axes for c in ax.containers for p in c.patches)
  finally:
    plt.close(fig)


def test_write_report_makes_readable_pngs_and_tables(rows, runs, tmp_path):
  import matplotlib.image as mpimg
  written = report.write_report(runs, tmp_path, [0.1, 1.0], 0.5)
  names = {p.name for p in written}
  for n in ("table1_c0.1.md", "table1_c0.1.csv", "table1_c1.md", "table1_c1.csv", "table2.md",
            "table2.csv", "report.md", "fig1_top1_mnist_fc.png", "fig2_flop_density_mnist_fc.png",
            "fig3_layer_flops_mnist_fc_c0.5.png", "fig1_top1_cifar10_vgg16.png"):
    assert n in names, n
  # CIFAR-10 has no run at c=0.5: no Figure 3 for it, said in the report page.
  assert "fig3_layer_flops_cifar10_vgg16_c0.5.png" not in names
  page = (tmp_path / "report.md").read_text()
  assert "no pruned run at c = 0.5" in page
  assert "not shifted sideways" in page  # Figure 1's caption explains the encoding
  for p in written:
    if p.suffix == ".png":
      assert p.stat().st_size > 20_000, p
      img = mpimg.imread(p)
      assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 400
      assert img[..., :3].std() > 0.05  # not a blank canvas
  assert "†(1/2) (n=2)" in (tmp_path / "table1_c1.md").read_text()


def test_validate_flags_errors_and_default_out(tmp_path):
  with pytest.raises(report.ReportError, match="--results is required"):
    report.validate_flags(None, None, "0.1", "0.5")
  with pytest.raises(report.ReportError, match="no results file"):
    report.validate_flags(str(tmp_path), None, "0.1", "0.5")
  (tmp_path / "results.jsonl").write_text("\n")
  with pytest.raises(report.ReportError, match="is empty"):
    report.validate_flags(str(tmp_path), None, "0.1", "0.5")
  (tmp_path / "results.jsonl").write_text('{"dataset": "mnist"}\n')
  for t1, f3, msg in (("0.1,x", "0.5", "'x' is not a number"),
                      ("0.1,-1", "0.5", "outside"),
                      (" , ", "0.5", "is empty"),
                      ("0.1", "10", "outside"),
                      ("0.1", "0.5,1", "takes one value")):
    with pytest.raises(report.ReportError, match=msg):
      report.validate_flags(str(tmp_path), None, t1, f3)
  path, out, t1, f3 = report.validate_flags(str(tmp_path), None, "0.1, 1", "0.5")
  # The default output is under runs/report, never inside the results folder.
  assert (path, out, t1, f3) == (tmp_path / "results.jsonl",
                                 Path("runs") / "report" / tmp_path.name, [0.1, 1.0], 0.5)
  assert tmp_path.resolve() not in (Path.cwd() / out).resolve().parents
  assert report.validate_flags(str(tmp_path), str(tmp_path / "r"), "1", "1")[1] == tmp_path / "r"


def test_cli_end_to_end_and_one_line_errors(rows, tmp_path):
  res = tmp_path / "res"
  res.mkdir()
  (res / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:14]))
  script = str(REPO / "experiments" / "report.py")
  bad = subprocess.run([sys.executable, script, f"--results={res}", "--fig3_compression=abc"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1] == \
      "report.py: error: --fig3_compression: 'abc' is not a number"
  ok = subprocess.run([sys.executable, script, f"--results={res}", "--table1_compression=1"],
                      capture_output=True, text=True, timeout=120, cwd=tmp_path)
  assert ok.returncode == 0, ok.stderr
  out = tmp_path / "runs" / "report" / "res"  # the default, relative to the current folder
  assert (out / "table1_c1.md").exists() and not (res / "report").exists()
  assert (out / "fig1_top1_mnist_fc.png").stat().st_size > 20_000
  # A corrupt results line: one line naming the file and line, no traceback.
  bad_res = tmp_path / "bad"
  bad_res.mkdir()
  (bad_res / "results.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
  bad = subprocess.run([sys.executable, script, f"--results={bad_res}"], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
  assert bad.returncode != 0 and "Traceback" not in bad.stderr
  last = bad.stderr.strip().splitlines()[-1]
  assert last.startswith("report.py: error: ") and "results.jsonl" in last and "2" in last
  # A row that cannot be placed (no 'dataset'): also named by file and line (blank lines count).
  no_ds = {k: v for k, v in rows[1].items() if k != "dataset"}
  (bad_res / "results.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(no_ds) + "\n")
  bad = subprocess.run([sys.executable, script, f"--results={bad_res}"], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
  assert bad.returncode != 0 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1] == (
      f"report.py: error: {bad_res / 'results.jsonl'}:3: results row (run_key "
      f"{rows[1]['run_key']}) has no 'dataset'; fix or remove that line")
