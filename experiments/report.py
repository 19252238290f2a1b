r"""results.jsonl -> the study's tables (markdown + CSV) and figures (PNG).

Examples:
  python experiments/report.py --results runs/sweep
  python experiments/report.py --results experiments/results/paper_mnist --table1_compression=0.1,1

Writes into ``--out`` (default ``<results>/report``):

* ``table1_c<c>.md / .csv``: top-1 (%) per dataset x architecture x pruner at compression c, dense
  head vs butterfly head, plus the unpruned and all-factorized models (one table per c);
* ``table2.md / .csv``: inference seconds per compression x pruner, same columns: the
  masked-dense model (column = the pruner's name) and, beside it, the real sparse (BCSR) forward
  of ``bfprune.sparse`` ("<pruner> sparse s", row field ``inference_seconds_sparse``) when at
  least one run of that table has it (rows without it, e.g. models the sparse path does not
  support such as a butterfly head, show "–");
* ``fig1_top1_<dataset>_<model>.png``: top-1 vs compression, dense head solid, butterfly head
  dashed ("+ BH");
* ``fig2_flop_density_<dataset>_<model>.png``: FLOP density vs compression, same encoding;
* ``fig3_layer_flops_<dataset>_<model>_c<c>.png``: per-layer FLOP density at one compression;
* ``report.md``: everything above in one page.

Cells are mean ± sample std (ddof=1) over seeds; "†" marks a cell where at least one seed's net
collapsed (the collapse detector found no path from input to output), "–" a missing cell. The
CSV files are long-format (one line per cell, numbers unformatted) so they parse back exactly.

Runs that differ in a setting other than dataset / model / factorize / pruner / compression /
seed (e.g. SynFlow with 1 and with 100 rounds, Mag with and without pre-training) get separate
columns, labelled with the differing settings ("SynFlow [rounds=1]"), never averaged together.

Everything from rows to tables / figures is a pure function; ``main`` only does I/O.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import results_io  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("results", None, "Folder holding results.jsonl (or the .jsonl file itself)")
flags.DEFINE_string("out", None, "Output folder (default: <results folder>/report)")
flags.DEFINE_string("table1_compression", "0.1,1",
                    "Comma list of compressions c (density 10**-c): one Table 1 per value")
flags.DEFINE_string("fig3_compression", "0.5", "Compression c of Figure 3 (per-layer FLOPs)")

COLLAPSE_MARK = "†"
MISSING = "–"
SPARSE_SUFFIX = " sparse s"  # Table 2: header suffix of the sparse inference-seconds columns
PRUNERS = ("rand", "mag", "snip", "grasp", "synflow")
PRUNER_NAMES = {"rand": "Rand", "mag": "Mag", "snip": "SNIP", "grasp": "GraSP",
                "synflow": "SynFlow", "none": "Unpruned", "all": "All-factorized"}
HEADS = ("none", "head", "all")
HEAD_NAMES = {"none": "dense head", "head": "butterfly head", "all": "all factorized"}
DATASET_NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10"}
MODEL_NAMES = {"fc": "FC", "vgg16": "VGG16"}
DEFAULT_MODEL = {"mnist": "fc", "cifar10": "vgg16"}
# Settings that make two runs of the same pruner different experiments (not seeds of one).
VARIANT_FIELDS = ("pre_epochs", "post_epochs", "prune_rounds", "prune_schedule", "prune_scope",
                  "prune_per_class", "batch_size", "lr", "dropout", "batch_norm")
VARIANT_ABBR = {"pre_epochs": "pre", "post_epochs": "post", "prune_rounds": "rounds",
                "prune_schedule": "schedule", "prune_scope": "scope",
                "prune_per_class": "per_class", "batch_size": "batch", "lr": "lr",
                "dropout": "dropout", "batch_norm": "bn"}
MAX_COMPRESSION = 9.0


class ReportError(ValueError):
  """Bad flags or unusable results; the message is one line naming the problem."""


# ----------------------------------------------------------------------------- rows -> runs


@dataclasses.dataclass(frozen=True)
class Run:
  """One results row, reduced to what the report needs.

  ``column`` is the display label of the run's pruner (with its variant settings when several
  variants of that pruner exist); ``col_key`` the sortable identity behind it. Metrics a row
  lacks are NaN (top1 %, inference seconds, flop_density fraction; ``inference_seconds_sparse``
  is NaN for rows written before it existed and for models without a sparse path, where the row
  holds None); ``layers`` maps a layer name to its FLOP density (flops_kept / flops), in forward
  order.
  """
  dataset: str
  model: str
  factorize: str
  pruner: str
  compression: float
  seed: int
  variant: tuple
  column: str
  col_key: tuple
  top1: float
  inference_seconds: float
  flop_density: float
  density: float
  collapsed: bool
  collapsed_layer: Optional[str]
  layers: tuple[tuple[str, float], ...]
  inference_seconds_sparse: float = math.nan

  def metric(self, name: str) -> float:
    return getattr(self, name)


def _num(x: Any) -> float:
  try:
    v = float(x)
  except (TypeError, ValueError):
    return math.nan
  return v


def _ckey(c: float) -> float:
  """Compressions are compared after rounding (0.1 read from JSON vs typed on a flag)."""
  return round(float(c), 6)


def _layer_flop_density(layers: Any) -> tuple[tuple[str, float], ...]:
  """[(name, flops_kept / flops)] for layers that do work; tolerant of missing keys."""
  out = []
  if not isinstance(layers, (list, tuple)):
    return ()
  for i, layer in enumerate(layers):
    if not isinstance(layer, dict):
      continue
    if layer.get("kind") == "norm":  # norm work is never pruned: not a layer of Figure 3
      continue
    name = str(layer.get("name", f"layer{i}"))
    flops, kept = _num(layer.get("flops")), _num(layer.get("flops_kept"))
    if flops > 0 and not math.isnan(kept):
      out.append((name, kept / flops))
    elif math.isnan(flops) and not math.isnan(_num(layer.get("density"))):
      out.append((name, _num(layer.get("density"))))  # no FLOP counts: weight density
  return tuple(out)


def _sortable(v: Any) -> tuple:
  """Variant values sort numerically when they are numbers (rounds 1 < 100)."""
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    return (0, float(v), "")
  return (1, 0.0, str(v))


def _fmt_value(v: Any) -> str:
  return f"{v:g}" if isinstance(v, float) else str(v)


def runs_from_rows(rows: Sequence[dict[str, Any]]) -> list[Run]:
  """Normalises result rows into ``Run``s with column labels; duplicate run_keys keep the last.

  Raises ReportError when a row lacks ``dataset`` or ``pruner`` (nothing can place it).
  """
  by_key: dict[Any, dict] = {}
  for i, row in enumerate(rows):
    if not isinstance(row, dict):
      raise ReportError(f"results row {i + 1} is not a JSON object")
    for need in ("dataset", "pruner"):
      if need not in row:
        raise ReportError(f"results row {i + 1} (run_key {row.get('run_key')}) has no {need!r}")
    by_key[row.get("run_key", ("row", i))] = row
  rows = list(by_key.values())

  def col_of(r):  # the column family a run belongs to
    if r["pruner"] != "none":
      return r["pruner"]
    return "all" if r.get("factorize", "none") == "all" else "none"

  def variant_of(r):
    return tuple(r.get(f) for f in VARIANT_FIELDS)

  # Which settings differ among runs of one column family (per dataset / model)?
  families: dict[tuple, set] = {}
  for r in rows:
    fam = (r["dataset"], r.get("model") or DEFAULT_MODEL.get(r["dataset"], "?"), col_of(r))
    families.setdefault(fam, set()).add(variant_of(r))

  runs = []
  for r in rows:
    model = r.get("model") or DEFAULT_MODEL.get(r["dataset"], "?")
    col = col_of(r)
    variants = families[(r["dataset"], model, col)]
    v = variant_of(r)
    differing = [j for j, f in enumerate(VARIANT_FIELDS) if len({x[j] for x in variants}) > 1]
    label = PRUNER_NAMES.get(col, col)
    if differing:
      label += " [" + ", ".join(f"{VARIANT_ABBR[VARIANT_FIELDS[j]]}={_fmt_value(v[j])}"
                                for j in differing) + "]"
    # Pruners in the study's order, unknown ones after, then Unpruned and All-factorized.
    order = (PRUNERS.index(col) if col in PRUNERS else
             len(PRUNERS) + 1 + ("none", "all").index(col) if col in ("none", "all") else
             len(PRUNERS))
    col_key = (order, col, tuple(_sortable(v[j]) for j in differing), label)
    runs.append(Run(
        dataset=r["dataset"], model=model, factorize=r.get("factorize", "none"),
        pruner=r["pruner"],
        compression=_ckey(r.get("compression", 0.0)) if r["pruner"] != "none" else 0.0,
        seed=int(r.get("seed", 0)), variant=v, column=label, col_key=col_key,
        top1=_num(r.get("top1")), inference_seconds=_num(r.get("inference_seconds")),
        flop_density=_num(r.get("flop_density")), density=_num(r.get("density")),
        collapsed=bool(r.get("collapsed", False)), collapsed_layer=r.get("collapsed_layer"),
        layers=_layer_flop_density(r.get("layers")),
        inference_seconds_sparse=_num(r.get("inference_seconds_sparse"))))
  return runs


# ----------------------------------------------------------------------------- cells


@dataclasses.dataclass(frozen=True)
class Cell:
  """Mean ± sample std (ddof=1; 0 for one seed) of one metric over the seeds of one cell."""
  values: tuple[float, ...]
  n_collapsed: int

  @property
  def n(self) -> int:
    return len(self.values)

  @property
  def mean(self) -> float:
    return float(np.mean(self.values)) if self.values else math.nan

  @property
  def std(self) -> float:
    return float(np.std(self.values, ddof=1)) if self.n > 1 else 0.0

  def text(self, fmt: str) -> str:
    if not self.values:
      return MISSING
    s = format(self.mean, fmt)
    if self.n > 1:
      s += " ± " + format(self.std, fmt)
    if self.n_collapsed:
      s += " " + COLLAPSE_MARK
      if self.n_collapsed < self.n:
        s += f"({self.n_collapsed}/{self.n})"
    return s


def make_cell(runs: Iterable[Run], metric: str) -> Cell:
  """The cell of ``runs`` (all seeds of one configuration) for ``metric``; NaNs are dropped."""
  vals, n_col = [], 0
  for r in sorted(runs, key=lambda r: r.seed):
    v = r.metric(metric)
    if not math.isnan(v):
      vals.append(float(v))
      n_col += r.collapsed
  return Cell(tuple(vals), n_col)


@dataclasses.dataclass
class Table:
  """A rendered table: ``header`` + ``rows`` of strings for markdown, ``records`` (one dict per
  distinct cell, numbers unformatted) for CSV."""
  title: str
  header: list[str]
  rows: list[list[str]]
  records: list[dict[str, Any]]
  notes: list[str] = dataclasses.field(default_factory=list)


CSV_FIELDS = ("dataset", "model", "head", "column", "pruner", "compression", "density_nominal",
              "metric", "n", "mean", "std", "n_collapsed", "text")


def _record(run0: Run, head: str, compression: Optional[float], metric: str, cell: Cell,
            fmt: str) -> dict[str, Any]:
  return {"dataset": run0.dataset, "model": run0.model, "head": head, "column": run0.column,
          "pruner": run0.pruner,
          "compression": "" if compression is None else compression,
          "density_nominal": "" if compression is None else 10.0 ** -compression,
          "metric": metric, "n": cell.n, "mean": cell.mean, "std": cell.std,
          "n_collapsed": cell.n_collapsed, "text": cell.text(fmt)}


def _groups(runs: Iterable[Run]) -> dict[tuple, list[Run]]:
  """(dataset, model, factorize, col_key, compression) -> the runs (seeds) of that cell."""
  out: dict[tuple, list[Run]] = {}
  for r in runs:
    out.setdefault((r.dataset, r.model, r.factorize, r.col_key, r.compression), []).append(r)
  return out


def _dm_order(runs: Iterable[Run]) -> list[tuple[str, str]]:
  order = {"mnist": 0, "cifar10": 1}
  return sorted({(r.dataset, r.model) for r in runs}, key=lambda dm: (order.get(dm[0], 9), dm))


def _columns(runs: Iterable[Run]) -> list[tuple]:
  """Column keys in display order: pruners (canonical order, variants), Unpruned, All."""
  return sorted({r.col_key for r in runs})


def _heads(runs: Iterable[Run]) -> list[str]:
  """Head rows: dense and butterfly head always; all-factorized only if pruned runs have it."""
  heads = ["none", "head"]
  if any(r.factorize == "all" and r.pruner != "none" for r in runs):
    heads.append("all")
  return heads


def _lookup(groups, dm, head, col_key, c) -> tuple[Optional[list[Run]], Optional[float]]:
  """The runs of one displayed cell; unpruned columns ignore c, All ignores the head too."""
  kind = col_key[1]
  if kind == "all":
    return groups.get(dm + ("all", col_key, 0.0)), None
  if kind == "none":
    return groups.get(dm + (head, col_key, 0.0)), None
  return groups.get(dm + (head, col_key, c)), c


def _density_text(c: float) -> str:
  return f"{10.0 ** -c:.3g}"


def table1(runs: Sequence[Run], compression: float) -> Table:
  """Top-1 (%) per dataset x architecture (rows: dense head, butterfly head) x pruner at one
  compression c (density 10**-c). The Unpruned column holds the unpruned net with that head and
  the All-factorized column the all-butterfly / K-matrix net (the same runs on every row, as it
  has no separate dense head)."""
  c = _ckey(compression)
  groups = _groups(runs)
  cols = _columns(runs)
  header = ["Head", "Dataset", "Architecture"] + [k[3] for k in cols]
  rows, records, seen = [], [], set()
  for head in _heads(runs):
    for dm in _dm_order(runs):
      line = [HEAD_NAMES[head], DATASET_NAMES.get(dm[0], dm[0]), MODEL_NAMES.get(dm[1], dm[1])]
      for k in cols:
        cell_runs, cc = _lookup(groups, dm, head, k, c)
        if not cell_runs:
          line.append(MISSING)
          continue
        cell = make_cell(cell_runs, "top1")
        line.append(cell.text(".2f"))
        rec_head = "all" if k[1] == "all" else head
        if (dm, rec_head, k) not in seen:
          seen.add((dm, rec_head, k))
          records.append(_record(cell_runs[0], rec_head, cc, "top1", cell, ".2f"))
      rows.append(line)
  title = (f"Table 1: top-1 accuracy (%) at compression c = {c:g} "
           f"(density 10^-{c:g} = {_density_text(c)})")
  notes = [f"Mean ± sample std over seeds; {COLLAPSE_MARK} = at least one seed collapsed "
           f"(k/n: k of n seeds); {MISSING} = no run.",
           "Unpruned and All-factorized do not depend on c; All-factorized (every layer "
           "butterfly / K-matrix, not pruned) is the same runs on each row."]
  return Table(title, header, rows, records, notes)


def table2(runs: Sequence[Run]) -> list[Table]:
  """Inference seconds (median of 5 warm passes over the test set, mean ± std over seeds) per
  compression x pruner, dense head vs butterfly head; one table per dataset / architecture.

  Each column (a pruner's name) is the masked-dense model; when at least one run of the table
  has ``inference_seconds_sparse``, every column is followed by "<column> sparse s", the same
  for the real sparse (BCSR) forward ("–" where a run lacks it). The CSV has one
  ``inference_seconds_sparse`` record per cell of those columns, exactly the markdown's cells.
  """
  groups = _groups(runs)
  tables = []
  for dm in _dm_order(runs):
    dm_runs = [r for r in runs if (r.dataset, r.model) == dm]
    cols = _columns(dm_runs)
    comps = sorted({r.compression for r in dm_runs if r.pruner != "none"})
    metrics = ["inference_seconds"]
    if any(not math.isnan(r.inference_seconds_sparse) for r in dm_runs):
      metrics.append("inference_seconds_sparse")
    header = ["Head", "c", "density"] + [k[3] + ("" if m == "inference_seconds" else
                                                  SPARSE_SUFFIX)
                                          for k in cols for m in metrics]
    rows, records, seen = [], [], set()
    for head in _heads(dm_runs):
      for c in comps or [None]:
        line = [HEAD_NAMES[head], MISSING if c is None else f"{c:g}",
                MISSING if c is None else _density_text(c)]
        for k in cols:
          cell_runs, cc = _lookup(groups, dm, head, k, c)
          for m in metrics:
            if not cell_runs:
              line.append(MISSING)
              continue
            cell = make_cell(cell_runs, m)
            line.append(cell.text(".4g"))
            rec_head = "all" if k[1] == "all" else head
            if (rec_head, k, cc, m) not in seen:
              seen.add((rec_head, k, cc, m))
              records.append(_record(cell_runs[0], rec_head, cc, m, cell, ".4g"))
        rows.append(line)
    title = (f"Table 2: inference seconds, {DATASET_NAMES.get(dm[0], dm[0])} / "
             f"{MODEL_NAMES.get(dm[1], dm[1])} (jitted, warmed-up pass over the whole test "
             f"set, median of 5)")
    notes = [f"Mean ± sample std over seeds; {COLLAPSE_MARK} = collapsed; {MISSING} = no run. "
             "Unpruned and All-factorized do not depend on c and repeat on every row."]
    if len(metrics) > 1:
      notes.append(f"Columns without a suffix time the masked-dense model (pruned weights are "
                   f"zeros, the cost of the dense net); \"{SPARSE_SUFFIX.strip()}\" columns time "
                   f"the real sparse forward (bfprune.sparse, BCSR kernels holding only the kept "
                   f"weights), {MISSING} where a run has no such timing (rows from before it "
                   f"existed, butterfly / K-matrix layers, BatchNorm).")
    tables.append(Table(title, header, rows, records, notes))
  return tables


def to_markdown(table: Table) -> str:
  lines = [f"### {table.title}", "", "| " + " | ".join(table.header) + " |",
           "|" + "|".join("---" for _ in table.header) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in table.rows]
  lines += [""] + [f"{n}" for n in table.notes]
  return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
  w.writeheader()
  for rec in table.records:
    w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in rec.items()})
  return buf.getvalue()


# ----------------------------------------------------------------------------- figures


@dataclasses.dataclass(frozen=True)
class Series:
  """One line of Figure 1 / 2: ``x`` compressions, per-point mean / std / number of collapsed
  seeds, and ``collapsed_points`` (x, value) of every collapsed run (to mark them)."""
  label: str
  col_key: tuple
  factorize: str
  x: tuple[float, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  n_collapsed: tuple[int, ...]
  collapsed_points: tuple[tuple[float, float], ...] = ()


def curve_series(runs: Sequence[Run], dataset: str, model: str, metric: str) -> list[Series]:
  """Pruned runs of one dataset / model as lines over compression, one per column x head."""
  out = []
  groups = _groups(r for r in runs if (r.dataset, r.model) == (dataset, model)
                   and r.pruner != "none")
  keys = sorted({(k[3], k[2]) for k in groups}, key=lambda t: (t[0], HEADS.index(t[1])))
  for col_key, fac in keys:
    xs = sorted(k[4] for k in groups if k[3] == col_key and k[2] == fac)
    cells = [make_cell(groups[(dataset, model, fac, col_key, x)], metric) for x in xs]
    pts = [(x, c) for x, c in zip(xs, cells) if c.n]
    if not pts:
      continue
    suffix = {"none": "", "head": " + BH", "all": " + all-BF"}[fac]
    bad = tuple((x, float(r.metric(metric))) for x in xs
                for r in sorted(groups[(dataset, model, fac, col_key, x)], key=lambda r: r.seed)
                if r.collapsed and not math.isnan(r.metric(metric)))
    out.append(Series(col_key[3] + suffix, col_key, fac, tuple(x for x, _ in pts),
                      tuple(c.mean for _, c in pts), tuple(c.std for _, c in pts),
                      tuple(c.n_collapsed for _, c in pts), bad))
  return out


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


_LINESTYLE = {"none": "-", "head": "--", "all": ":"}


def _colours(keys: Sequence[tuple]) -> dict[tuple, Any]:
  plt = _plt()
  cmap = plt.get_cmap("tab10")
  return {k: cmap(i % 10) for i, k in enumerate(sorted(set(keys)))}


def _curve_figure(runs: Sequence[Run], dataset: str, model: str, metric: str, ylabel: str,
                  title: str, logy: bool, reference: Optional[str] = None):
  plt = _plt()
  series = curve_series(runs, dataset, model, metric)
  fig, ax = plt.subplots(figsize=(8.5, 5.0))
  colours = _colours([s.col_key for s in series])
  marked = False
  all_x = sorted({x for s in series for x in s.x})
  logx = bool(all_x) and min(all_x) > 0
  span = (max(all_x) - min(all_x)) if all_x else 1.0
  for i, s in enumerate(series):
    # Dodge the series sideways a little so their error bars do not sit on top of each other.
    shift = (i - (len(series) - 1) / 2) * 0.012
    dodge = (lambda v: np.asarray(v) * 10.0 ** shift) if logx else \
        (lambda v: np.asarray(v) + shift * span)
    x, y, e = np.array(s.x), np.array(s.mean), np.array(s.std)
    ax.errorbar(dodge(x), y, yerr=e if e.any() else None, color=colours[s.col_key],
                linestyle=_LINESTYLE[s.factorize], marker="o", markersize=4, capsize=3,
                label=s.label)
    if s.collapsed_points:
      bx, by = np.array(s.collapsed_points).T
      ax.scatter(dodge(bx), by, marker="x", s=80, linewidths=2.2, color="black",
                 zorder=5, label=None if marked else f"collapsed run {COLLAPSE_MARK}")
      marked = True
  # Compression-independent references: unpruned nets and the all-factorized net.
  dm_runs = [r for r in runs if (r.dataset, r.model) == (dataset, model) and r.pruner == "none"]
  for fac, style, name in (("none", "-", "Unpruned"), ("head", "--", "Unpruned + BH"),
                           ("all", ":", "All-factorized")):
    cell = make_cell([r for r in dm_runs if r.factorize == fac], metric)
    if cell.n and not (logy and cell.mean <= 0):
      ax.axhline(cell.mean, color="0.45", linestyle=style, linewidth=1.1,
                 label=name + (f" {COLLAPSE_MARK}" if cell.n_collapsed else ""))
  if reference == "density" and series:
    xs = np.array(sorted({x for s in series for x in s.x}))
    ax.plot(xs, 10.0 ** -xs, color="0.7", linewidth=3, alpha=0.6, zorder=0,
            label="weight density 10^-c")
  if all_x:
    if logx:
      ax.set_xscale("log")
    ax.set_xticks(all_x)
    ax.set_xticklabels([f"{x:g}" for x in all_x])
    ax.minorticks_off()
  if logy:
    ax.set_yscale("log")
  ax.set_xlabel("compression c (density 10^-c)")
  ax.set_ylabel(ylabel)
  ax.set_title(title.format(dataset=DATASET_NAMES.get(dataset, dataset),
                            model=MODEL_NAMES.get(model, model)))
  ax.grid(True, alpha=0.3, which="both")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
  if not series and not dm_runs:
    ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
  fig.tight_layout()
  return fig


def figure1(runs: Sequence[Run], dataset: str, model: str):
  """Top-1 vs compression per pruner: dense head solid, butterfly head dashed ("+ BH"); mean
  over seeds with ± std bars (series dodged sideways); x = one collapsed run's own value; grey
  lines = unpruned / all-factorized."""
  return _curve_figure(runs, dataset, model, "top1", "top-1 accuracy (%)",
                       "Figure 1: top-1 vs compression, {dataset} / {model}", logy=False)


def figure2(runs: Sequence[Run], dataset: str, model: str):
  """FLOP density (kept FLOPs / dense FLOPs) vs compression, log y, same encoding as Fig. 1."""
  return _curve_figure(runs, dataset, model, "flop_density", "FLOP density (kept / total)",
                       "Figure 2: FLOP density vs compression, {dataset} / {model}", logy=True,
                       reference="density")


def layer_profiles(runs: Sequence[Run], dataset: str, model: str, compression: float
                   ) -> tuple[list[str], dict[tuple, dict[str, tuple[np.ndarray, list[str]]]]]:
  """Per-layer FLOP density at one compression, mean over seeds.

  Returns ``(layer_names, {col_key: {factorize: (densities (n_layers,) with NaN where the
  layer is absent, names of collapsed layers over seeds)}})``; layers in forward order (dense
  head nets first).
  """
  c = _ckey(compression)
  sel = [r for r in runs if (r.dataset, r.model) == (dataset, model) and r.pruner != "none"
         and r.compression == c and r.layers]
  names: dict[str, None] = {}
  for r in sorted(sel, key=lambda r: HEADS.index(r.factorize) if r.factorize in HEADS else 9):
    for n, _ in r.layers:
      names.setdefault(n, None)
  order = list(names)
  out: dict[tuple, dict[str, tuple[np.ndarray, list[str]]]] = {}
  for (_, _, fac, col_key, _), grp in _groups(sel).items():
    mat = np.full((len(grp), len(order)), np.nan)
    for i, r in enumerate(grp):
      for n, d in r.layers:
        mat[i, order.index(n)] = d
    with np.errstate(all="ignore"):
      mean = np.nanmean(mat, axis=0) if len(grp) else np.full(len(order), np.nan)
    collapsed = [r.collapsed_layer or "?" for r in grp if r.collapsed]
    out.setdefault(col_key, {})[fac] = (mean, collapsed)
  return order, out


def figure3(runs: Sequence[Run], dataset: str, model: str, compression: float):
  """Per-layer FLOP density at compression c: one panel per pruner, grouped bars per layer,
  dense head vs butterfly head; the collapsed layer of a collapsed run carries a black x.
  Returns None when no pruned run at c has layer data."""
  import warnings
  plt = _plt()
  order, prof = layer_profiles(runs, dataset, model, compression)
  if not prof:
    return None
  keys = sorted(prof)
  ncols = min(3, len(keys))
  nrows = math.ceil(len(keys) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(max(5.0, 0.42 * len(order) + 1.5) * ncols,
                                                  3.2 * nrows), squeeze=False, sharey=True)
  facs = [f for f in HEADS if any(f in prof[k] for k in keys)]
  width = 0.8 / len(facs)
  colour = {"none": "tab:blue", "head": "tab:orange", "all": "tab:green"}
  x = np.arange(len(order))
  for ax, k in zip(axes.flat, keys):
    flags_ = []
    for j, fac in enumerate(facs):
      if fac not in prof[k]:
        continue
      mean, collapsed = prof[k][fac]
      pos = x + (j - (len(facs) - 1) / 2) * width
      name = {"none": "dense head", "head": "+ BH", "all": "+ all-BF"}[fac]
      ax.bar(pos, np.nan_to_num(mean, nan=0.0), width, color=colour[fac], label=name,
             hatch="//" if collapsed else None, edgecolor="black" if collapsed else None,
             linewidth=0.4)
      for layer in set(collapsed):
        if layer in order:
          i = order.index(layer)
          ax.scatter([pos[i]], [0.02], marker="x", color="black", s=60, zorder=5)
      if collapsed:
        flags_.append(f"{name}: {COLLAPSE_MARK} {', '.join(sorted(set(collapsed)))}")
    ax.set_title(k[3] + ("\n" + "; ".join(flags_) if flags_ else ""), fontsize=9)
    ax.set_xticks(x)
    ax.set_xticklabels(order, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.grid(True, axis="y", alpha=0.3)
    ax.axhline(10.0 ** -_ckey(compression), color="0.5", linestyle=":", linewidth=1)
  for ax in list(axes.flat)[len(keys):]:
    ax.set_visible(False)
  for ax in axes[:, 0]:
    ax.set_ylabel("layer FLOP density")
  axes.flat[0].legend(fontsize=7, loc="upper right")
  fig.suptitle(f"Figure 3: per-layer FLOP density at c = {compression:g} (density "
               f"{_density_text(_ckey(compression))}, dotted), "
               f"{DATASET_NAMES.get(dataset, dataset)} / {MODEL_NAMES.get(model, model)}; "
               f"hatched = collapsed run", fontsize=10)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fig.tight_layout()
  return fig


# ----------------------------------------------------------------------------- flags / I/O


def parse_compressions(text: str, name: str) -> list[float]:
  """Comma list of compressions in [0, 9]; ReportError naming the flag otherwise."""
  items = [t.strip() for t in str(text or "").split(",") if t.strip()]
  if not items:
    raise ReportError(f"--{name} is empty; give compressions like 0.1,1")
  out = []
  for t in items:
    try:
      c = float(t)
    except ValueError:
      raise ReportError(f"--{name}: {t!r} is not a number") from None
    if not 0 <= c <= MAX_COMPRESSION or math.isnan(c):
      raise ReportError(f"--{name}: {t} is outside [0, {MAX_COMPRESSION:g}] "
                        f"(compression c means density 10**-c)")
    out.append(_ckey(c))
  return out


def validate_flags(results: Optional[str], out: Optional[str], table1_compression: str,
                   fig3_compression: str) -> tuple[Path, Path, list[float], float]:
  """Checks every flag and the results file; returns (results.jsonl, out dir, Table 1
  compressions, Figure 3 compression). Raises ReportError with one line on any problem."""
  if not results:
    raise ReportError("--results is required: the folder holding results.jsonl")
  path = Path(results)
  if path.is_dir():
    path = path / "results.jsonl"
  if not path.is_file():
    raise ReportError(f"no results file at {path}")
  if path.stat().st_size == 0 or not path.read_text().strip():
    raise ReportError(f"{path} is empty: no finished runs to report")
  t1 = parse_compressions(table1_compression, "table1_compression")
  f3 = parse_compressions(fig3_compression, "fig3_compression")
  if len(f3) != 1:
    raise ReportError(f"--fig3_compression takes one value, got {fig3_compression!r}")
  out_dir = Path(out) if out else path.parent / "report"
  if out_dir.exists() and not out_dir.is_dir():
    raise ReportError(f"--out={out_dir} exists and is not a folder")
  return path, out_dir, t1, f3[0]


def _slug(c: float) -> str:
  return f"{c:g}"


def write_report(runs: Sequence[Run], out_dir: Path, table1_compressions: Sequence[float],
                 fig3_compression: float) -> list[Path]:
  """Writes every table and figure into ``out_dir``; returns the files written."""
  plt = _plt()
  out_dir.mkdir(parents=True, exist_ok=True)
  written: list[Path] = []
  page = ["# bfprune report", ""]

  def put(name: str, text: str) -> Path:
    p = out_dir / name
    p.write_text(text)
    written.append(p)
    return p

  pruned_cs = {r.compression for r in runs if r.pruner != "none"}
  for c in table1_compressions:
    if c not in pruned_cs:
      logging.warning("Table 1: no pruned run at compression %g (cells show %s)", c, MISSING)
    t = table1(runs, c)
    put(f"table1_c{_slug(c)}.md", to_markdown(t))
    put(f"table1_c{_slug(c)}.csv", to_csv(t))
    page += [to_markdown(t), ""]
  t2 = table2(runs)
  md2 = "\n".join(to_markdown(t) for t in t2)
  put("table2.md", md2)
  recs = [rec for t in t2 for rec in t.records]
  put("table2.csv", to_csv(Table("", [], [], recs)))
  page += [md2, ""]

  def save(fig, name: str) -> None:
    p = out_dir / name
    fig.savefig(p, dpi=130, bbox_inches="tight")
    plt.close(fig)
    written.append(p)
    page.extend([f"![{name}]({name})", ""])

  for ds, model in _dm_order(runs):
    save(figure1(runs, ds, model), f"fig1_top1_{ds}_{model}.png")
    save(figure2(runs, ds, model), f"fig2_flop_density_{ds}_{model}.png")
    fig = figure3(runs, ds, model, fig3_compression)
    if fig is None:
      logging.warning("Figure 3: no pruned %s/%s run with layer data at compression %g", ds,
                      model, fig3_compression)
      page += [f"Figure 3 ({ds}/{model}): no pruned run at c = {fig3_compression:g}.", ""]
    else:
      save(fig, f"fig3_layer_flops_{ds}_{model}_c{_slug(fig3_compression)}.png")
  put("report.md", "\n".join(page))
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    path, out_dir, t1, f3 = validate_flags(FLAGS.results, FLAGS.out, FLAGS.table1_compression,
                                           FLAGS.fig3_compression)
    runs = runs_from_rows(results_io.read_rows(path))
  except ValueError as e:  # ReportError, and read_rows' malformed-line error
    sys.exit(f"report.py: error: {e}")
  written = write_report(runs, out_dir, t1, f3)
  logging.info("%d runs from %s -> %d files in %s", len(runs), path, len(written), out_dir)
  print(f"wrote {len(written)} files to {out_dir}")


if __name__ == "__main__":
  app.run(main)
