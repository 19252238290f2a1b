"""experiments/report.py: table cells against numpy, collapse markers, CSV round trip, PNGs,
clear errors for bad flags and empty results. Synthetic rows, no training."""
import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from experiments import report  # noqa: E402

LAYERS = ("fc1", "fc2", "fc3", "fc4", "fc5", "head")
PRUNERS = ("rand", "snip", "synflow")
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
      "dropout": 0.1, "batch_norm": False, "seed": seed,
      "top1": 11.35 if collapsed else float(rng.uniform(80, 99)),
      "inference_seconds": float(rng.uniform(0.01, 0.2)),
      "flop_density": float(kept.sum() / flops.sum()),
      "density": 10.0 ** -c if pruner != "none" else 1.0,
      "collapsed": collapsed, "collapsed_layer": "fc5" if collapsed else None,
      "layers": [{"name": n, "kind": "dense", "flops": int(f), "flops_kept": float(k),
                  "weights": 10, "kept": 5, "density": 0.5}
                 for n, f, k in zip(LAYERS, flops, kept)]
                + [{"name": "bn", "kind": "norm", "flops": 64, "flops_kept": 64.0}],
  }
  row.update(over)
  row["run_key"] = json.dumps([row[k] for k in ("factorize", "pruner", "compression", "seed",
                                                "prune_rounds", "dataset")])
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
  # A second dataset / architecture with a single seed: no "±" there.
  out.append(_row(rng, "none", "rand", 0.1, 0, dataset="cifar10", model="vgg16"))
  return out


@pytest.fixture(scope="module")
def runs(rows):
  return report.runs_from_rows(rows)


def _select(rows, **kw):
  return [r for r in rows if all(r[k] == v for k, v in kw.items())]


def _expected(vals, fmt, collapsed=0):
  vals = np.asarray(vals, float)
  s = format(vals.mean(), fmt)
  if len(vals) > 1:
    s += " ± " + format(np.std(vals, ddof=1), fmt)
  if collapsed:
    s += " †" + (f"({collapsed}/{len(vals)})" if collapsed < len(vals) else "")
  return s


def _cell(table, head, dataset, column, c=None):
  col = table.header.index(column)
  for r in table.rows:
    if r[0] == head and (r[1] == dataset if c is None else r[1] == f"{c:g}"):
      return r[col]
  raise KeyError((head, dataset, column, c))


@pytest.mark.parametrize("c", [0.1, 1.0])
def test_table1_cells_are_mean_and_std_over_seeds(rows, runs, c):
  t = report.table1(runs, c)
  assert "c = " + f"{c:g}" in t.title and f"{10 ** -c:.3g}" in t.title
  names = {"rand": "Rand", "snip": "SNIP", "synflow": "SynFlow"}
  marked = 0
  for fac, head in (("none", "dense head"), ("head", "butterfly head")):
    for p in PRUNERS:
      sel = _select(rows, dataset="mnist", factorize=fac, pruner=p, compression=c)
      assert len(sel) == 2
      n_col = sum(r["collapsed"] for r in sel)
      assert _cell(t, head, "MNIST", names[p]) == _expected([r["top1"] for r in sel], ".2f", n_col)
    sel = _select(rows, dataset="mnist", factorize=fac, pruner="none")
    assert _cell(t, head, "MNIST", "Unpruned") == _expected([r["top1"] for r in sel], ".2f")
    sel = _select(rows, factorize="all")
    assert _cell(t, head, "MNIST", "All-factorized") == _expected([r["top1"] for r in sel], ".2f")
  # The collapse marker sits exactly in the collapsed run's cell (1 of 2 seeds), nowhere else.
  for r in t.rows:
    for j, text in enumerate(r):
      if "†" in text:
        marked += 1
        assert (r[0], r[1], t.header[j]) == ("butterfly head", "MNIST", "SynFlow") and c == 1.0
        assert text.endswith("†(1/2)")
  assert marked == (1 if c == 1.0 else 0)
  # Single-seed cells show no std; cells without runs show the missing mark.
  rand = [r for r in rows if r["dataset"] == "cifar10"][0]
  expect = f"{rand['top1']:.2f}" if c == 0.1 else "–"
  assert _cell(t, "dense head", "CIFAR-10", "Rand") == expect
  assert _cell(t, "butterfly head", "CIFAR-10", "Rand") == "–"


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
    assert float(rec["mean"]) == pytest.approx(np.mean(vals), rel=1e-12)
    assert float(rec["std"]) == pytest.approx(np.std(vals, ddof=1) if len(vals) > 1 else 0.0,
                                              abs=1e-12)
    assert int(rec["n_collapsed"]) == sum(r["collapsed"] for r in _select(rows, **kw))
    checked += 1
  # 3 pruners x 2 heads + 2 unpruned + all-factorized (MNIST); CIFAR-10 has nothing at c=1.
  assert checked == 3 * 2 + 2 + 1


def test_table2_inference_seconds(rows, runs):
  (t_mnist, t_cifar) = report.table2(runs)
  assert "MNIST" in t_mnist.title and "CIFAR-10" in t_cifar.title
  for fac, head in (("none", "dense head"), ("head", "butterfly head")):
    for c in COMPRESSIONS:
      for p, name in (("rand", "Rand"), ("synflow", "SynFlow")):
        sel = _select(rows, dataset="mnist", factorize=fac, pruner=p, compression=c)
        n_col = sum(r["collapsed"] for r in sel)
        assert _cell(t_mnist, head, None, name, c) == _expected(
            [r["inference_seconds"] for r in sel], ".4g", n_col)
      allf = _select(rows, factorize="all")
      assert _cell(t_mnist, head, None, "All-factorized", c) == _expected(
          [r["inference_seconds"] for r in allf], ".4g")
  recs = list(csv.DictReader(io.StringIO(report.to_csv(t_mnist))))
  # Every (head, pruner, c) once, and the compression-independent cells once each.
  assert len(recs) == 2 * 3 * 3 + 2 + 1


def test_pruner_variants_get_separate_columns(rows):
  rng = np.random.default_rng(1)
  extra = [_row(rng, "none", "synflow", 1.0, s, prune_rounds=1) for s in SEEDS]
  runs = report.runs_from_rows(rows + extra)
  t = report.table1(runs, 1.0)
  assert "SynFlow [rounds=1]" in t.header and "SynFlow [rounds=100]" in t.header
  assert t.header.index("SynFlow [rounds=1]") < t.header.index("SynFlow [rounds=100]")
  assert _cell(t, "dense head", "MNIST", "SynFlow [rounds=1]") == _expected(
      [r["top1"] for r in extra], ".2f")
  assert _cell(t, "butterfly head", "MNIST", "SynFlow [rounds=1]") == "–"


def test_duplicate_run_key_keeps_last_and_missing_fields_are_clear(rows):
  dup = dict(rows[0], top1=1.0)
  runs = report.runs_from_rows(rows + [dup])
  assert len(runs) == len(rows)
  assert [r.top1 for r in runs if r.col_key[1] == "rand" and r.factorize == "none"
          and r.compression == 0.1 and r.seed == 0 and r.dataset == "mnist"] == [1.0]
  with pytest.raises(report.ReportError, match="'pruner'"):
    report.runs_from_rows([{"dataset": "mnist", "top1": 1.0}])


def test_figure_data_mark_collapse_and_layer_densities(rows, runs):
  series = report.curve_series(runs, "mnist", "fc", "top1")
  labels = [s.label for s in series]
  assert labels == ["Rand", "Rand + BH", "SNIP", "SNIP + BH", "SynFlow", "SynFlow + BH"]
  for s in series:
    assert s.x == COMPRESSIONS
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
  assert "no pruned run at c = 0.5" in (tmp_path / "report.md").read_text()
  for p in written:
    if p.suffix == ".png":
      assert p.stat().st_size > 20_000, p
      img = mpimg.imread(p)
      assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 400
      assert img[..., :3].std() > 0.05  # not a blank canvas
  assert "†(1/2)" in (tmp_path / "table1_c1.md").read_text()


def test_validate_flags_errors(tmp_path):
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
  assert (path, out, t1, f3) == (tmp_path / "results.jsonl", tmp_path / "report", [0.1, 1.0], 0.5)


def test_cli_end_to_end_and_one_line_error(rows, tmp_path):
  res = tmp_path / "res"
  res.mkdir()
  (res / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:14]))
  script = str(REPO / "experiments" / "report.py")
  bad = subprocess.run([sys.executable, script, f"--results={res}", "--fig3_compression=abc"],
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1] == \
      "report.py: error: --fig3_compression: 'abc' is not a number"
  ok = subprocess.run([sys.executable, script, f"--results={res}", "--table1_compression=1"],
                      capture_output=True, text=True, timeout=120)
  assert ok.returncode == 0, ok.stderr
  assert (res / "report" / "table1_c1.md").exists()
  assert (res / "report" / "fig1_top1_mnist_fc.png").stat().st_size > 20_000


def test_table2_sparse_columns_beside_dense_ones_and_dash_for_old_rows(rows):
  """Rows with inference_seconds_sparse (new), without it (old) and with None (unsupported)."""
  rng = np.random.default_rng(2)
  new = []
  for r in rows:
    r = dict(r)
    if r["dataset"] == "mnist" and r["factorize"] == "none" and r["seed"] == 0:
      r["inference_seconds_sparse"] = float(rng.uniform(0.001, 0.05))  # a new row
    elif r["dataset"] == "mnist" and r["factorize"] == "head" and r["pruner"] == "rand":
      r["inference_seconds_sparse"] = None  # butterfly head: no sparse path
    new.append(r)  # everything else: an old row without the field
  t_mnist, t_cifar = report.table2(report.runs_from_rows(new))
  dense_cols = ["Rand", "SNIP", "SynFlow", "Unpruned", "All-factorized"]
  assert t_mnist.header[3:] == [h for c in dense_cols for h in (c, c + " sparse s")]
  assert t_cifar.header[3:] == ["Rand"]  # no run of that table has the value: no column
  for c in COMPRESSIONS:
    for p, name in (("rand", "Rand"), ("snip", "SNIP"), ("synflow", "SynFlow")):
      sel = _select(new, dataset="mnist", factorize="none", pruner=p, compression=c)
      have = [r for r in sel if "inference_seconds_sparse" in r]
      assert len(have) == 1 and len(sel) == 2  # seed 0 new, seed 1 old
      mark = 1 if have[0]["collapsed"] else 0
      assert _cell(t_mnist, "dense head", None, name + " sparse s", c) == _expected(
          [have[0]["inference_seconds_sparse"]], ".4g", mark)
      # The masked-dense column beside it still averages both seeds.
      assert _cell(t_mnist, "dense head", None, name, c) == _expected(
          [r["inference_seconds"] for r in sel], ".4g", sum(r["collapsed"] for r in sel))
      # Old rows and None (unsupported) rows: the missing mark.
      assert _cell(t_mnist, "butterfly head", None, name + " sparse s", c) == "–"
    assert _cell(t_mnist, "butterfly head", None, "All-factorized sparse s", c) == "–"
  unpruned = _select(new, dataset="mnist", factorize="none", pruner="none", seed=0)
  assert _cell(t_mnist, "dense head", None, "Unpruned sparse s", 0.1) == _expected(
      [unpruned[0]["inference_seconds_sparse"]], ".4g")
  assert "sparse s" in "\n".join(t_mnist.notes)
  md = report.to_markdown(t_mnist).splitlines()
  assert md[2] == "| " + " | ".join(t_mnist.header) + " |"
  # CSV: one sparse record per displayed sparse cell, numbers parsing back to the values.
  recs = list(csv.DictReader(io.StringIO(report.to_csv(t_mnist))))
  sparse = [r for r in recs if r["metric"] == "inference_seconds_sparse"]
  dense = [r for r in recs if r["metric"] == "inference_seconds"]
  assert len(sparse) == len(dense) == 2 * 3 * 3 + 2 + 1
  for rec in sparse:
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
  # Rows without the field at all (every row written before it existed): no sparse columns.
  t_old = report.table2(report.runs_from_rows(rows))[0]
  assert not any("sparse" in h for h in t_old.header)
