r"""results.jsonl -> the study's tables (markdown + CSV) and figures (PNG).

Examples:
  python experiments/report.py --results runs/sweep          # writes runs/report/sweep/
  python experiments/report.py --results experiments/results/paper_mnist \
      --out experiments/results/paper_mnist/report --table1_compression=0.1,1

Writes into ``--out`` (default ``runs/report/<name of the results folder>``, relative to the
current folder, so a report is never written over committed results unless asked for):

* ``table1_c<c>.md / .csv``: top-1 (%) at compression c, one row per method (pruner, with its
  settings when several variants exist; the unpruned and all-factorized models), one column
  per dataset / architecture x head (dense head, butterfly head);
* ``table2.md / .csv``: inference seconds, one table per dataset / architecture x timing x
  head (rows: pruners, columns: compressions): the masked-dense model (pruned weights stored as
  zeros) and, when a run has the row field ``inference_seconds_sparse``, the real sparse (BCSR)
  forward of ``bfprune.sparse``. Each caption says how the timings were taken and what was
  compared to flag ones taken under a different load (see ``table2``);
* ``fig1_top1_<dataset>_<model>.png``: top-1 vs compression; colour + marker = method, dense
  head solid lines and filled markers, butterfly head dashed lines and hollow markers;
* ``fig2_flop_density_<dataset>_<model>.png``: FLOP density vs compression, same encoding;
* ``fig3_layer_flops_<dataset>_<model>_c<c>.png``: per-layer FLOP density at one compression;
* ``report.md``: everything above in one page, with captions.

A cell is "mean ± sample std (ddof=1) (n=k)" over its k seeds ("mean (n=1)" for one seed).
Marks, each explained under a table only when the table uses it: "†" the run collapsed (the
collapse detector found no path from input to output), "‡" a timing taken while the machine was
busier (Table 2), "§" a sparse timing backfilled in a later pass (Table 2, only when a table mixes
backfilled and in-run timings), "[A]" the timing environment (Table 2, only when a table mixes
several), "–" no run. A mark followed by "(k/m)" holds for k of the m seeds. The CSV files are
long-format (one line per cell, numbers unformatted, ``n`` = seeds) so they parse back exactly.

Runs that differ in a setting other than dataset / model / factorize / pruner / compression /
seed (e.g. SynFlow with 1 and with 100 rounds, Mag with and without pre-training) get separate
rows, labelled with the differing settings spelled out ("SynFlow (1 pruning round)"), never
averaged together. Settings shared by a whole table that differ from the study's (e.g. 1
training epoch after pruning instead of 50, a subset of the training data) are stated in its
caption and in the figure titles.

Everything from rows to tables / figures is a pure function; ``main`` only does I/O.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import results_io  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("results", None, "Folder holding results.jsonl (or the .jsonl file itself)")
flags.DEFINE_string("out", None, "Output folder (default: runs/report/<name of the results "
                    "folder>; give it explicitly to regenerate a committed report)")
flags.DEFINE_string("table1_compression", "0.1,1",
                    "Comma list of compressions c (density 10**-c): one Table 1 per value")
flags.DEFINE_string("fig3_compression", "0.5", "Compression c of Figure 3 (per-layer FLOPs)")

COLLAPSE_MARK = "†"
BUSY_MARK = "‡"
BACKFILL_MARK = "§"
MISSING = "–"
MARKS = (COLLAPSE_MARK, BUSY_MARK, BACKFILL_MARK, MISSING)
DEFAULT_OUT_ROOT = Path("runs") / "report"
# Table 2: a timing is flagged when the run's last training epoch (just before the timing) ran
# at under this fraction of the median throughput of the runs with the same net.
BUSY_FRACTION = 0.5
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
                  "prune_per_class", "batch_size", "lr", "dropout", "batch_norm",
                  "train_examples", "test_examples", "factorize_with", "prune_factors")
# The study's settings (paper: 50 epochs after pruning, Mag pre-trained 10 epochs, SynFlow 100
# rounds, Adam 1e-3, batch 256, full datasets). Captions name every shared setting that differs.
STUDY = {"post_epochs": 50, "prune_schedule": "exponential", "prune_scope": "global",
         "prune_per_class": 10, "batch_size": 256, "lr": 1e-3, "dropout": 0.1,
         "batch_norm": False, "factorize_with": "butterfly", "prune_factors": False}
STUDY_PER_PRUNER = {"pre_epochs": ({"mag": 10}, 0), "prune_rounds": ({"synflow": 100}, 1)}
STUDY_SPLITS = {"mnist": {"train_examples": 60000, "test_examples": 10000},
                "cifar10": {"train_examples": 50000, "test_examples": 10000}}
PRUNING_ONLY = ("pre_epochs", "prune_rounds", "prune_schedule", "prune_scope", "prune_per_class")
MAX_COMPRESSION = 9.0


class ReportError(ValueError):
  """Bad flags or unusable results; the message is one line naming the problem."""


# ----------------------------------------------------------------------------- labels


def _count(v: Any, word: str) -> str:
  n = int(v)
  return f"{n:,} {word}{'' if n == 1 else 's'}"


_SETTING_TEXT: dict[str, Callable[[Any], str]] = {
    "pre_epochs": lambda v: "no pre-training" if v == 0 else _count(v, "pre-training epoch"),
    "post_epochs": lambda v: _count(v, "training epoch") + " after pruning",
    "prune_rounds": lambda v: _count(v, "pruning round"),
    "prune_schedule": lambda v: f"{v} pruning schedule",
    "prune_scope": lambda v: {"global": "global masks", "local": "layer-wise masks"}[v],
    "prune_per_class": lambda v: _count(v, "pruning example") + " per class",
    "batch_size": lambda v: f"batch size {int(v)}",
    "lr": lambda v: f"learning rate {float(v):g}",
    "dropout": lambda v: f"dropout {float(v):g}",
    "batch_norm": lambda v: "with BatchNorm" if v else "without BatchNorm",
    "train_examples": lambda v: _count(v, "training example"),
    "test_examples": lambda v: _count(v, "test example"),
    "factorize_with": lambda v: {"butterfly": "butterfly", "kmatrix": "K-matrix",
                                 "monarch": "Monarch"}[v] + " structured layers",
    "prune_factors": lambda v: "structured factors pruned" if v else "structured factors kept",
}


def setting_text(field: str, value: Any) -> str:
  """A run setting in words: ``("prune_rounds", 1)`` -> "1 pruning round"."""
  if value is None:
    return f"{field} not recorded"
  try:
    return _SETTING_TEXT[field](value)
  except (KeyError, TypeError, ValueError):
    return f"{field} {value}"


def _short(field: str, v: Any) -> str:
  """A study value beside a full phrase: "50", "50,000", "0.001"; words for the rest."""
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return setting_text(field, v)
  return f"{v:,}" if isinstance(v, int) else f"{v:g}"


def _study_value(field: str, dataset: str, family: str) -> Any:
  """The study's value of a setting for a column family (a pruner, "none" or "all"); None when
  the study has none (e.g. pruning settings of the unpruned nets, an unknown dataset)."""
  if family in ("none", "all") and field in PRUNING_ONLY:
    return None
  if field in STUDY_PER_PRUNER:
    per, default = STUDY_PER_PRUNER[field]
    return per.get(family, default)
  if field in STUDY_SPLITS.get(dataset, {}):
    return STUDY_SPLITS[dataset][field]
  return STUDY.get(field)


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return math.isclose(float(a), float(b), rel_tol=1e-9)
  return a == b


# ----------------------------------------------------------------------------- rows -> runs


@dataclasses.dataclass(frozen=True)
class Run:
  """One results row, reduced to what the report needs.

  ``column`` is the display label of the run's method (with its variant settings spelled out
  when several variants of that pruner exist); ``col_key`` the sortable identity behind it.
  Metrics a row lacks are NaN (top1 %, inference seconds, flop_density fraction;
  ``inference_seconds_sparse`` is NaN for rows written before it existed and for models without
  a sparse path, where the row holds None); ``layers`` maps a layer name to its FLOP density
  (flops_kept / flops), in forward order. Timing context: ``throughput`` is the examples/s of
  the run's last training epoch (NaN without history; ``history_epochs`` epochs recorded),
  ``timing_env`` the recorded devices and jax version, ``sparse_backfilled`` whether the sparse
  timing was taken in a later pass. ``params_total`` reads ``params`` in rows from before the
  field was renamed.
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
  throughput: float = math.nan
  timing_env: str = "not recorded"
  sparse_backfilled: bool = False
  params_total: float = math.nan
  history_epochs: int = 0

  def metric(self, name: str) -> float:
    return getattr(self, name)

  def setting(self, field: str) -> Any:
    return self.variant[VARIANT_FIELDS.index(field)]


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


def _last_throughput(history: Any) -> float:
  """examples/s of the last epoch in a row's history: the machine's speed just before the run
  timed its inference (rows record no load, this is the closest measured proxy)."""
  if isinstance(history, list) and history and isinstance(history[-1], dict):
    return _num(history[-1].get("examples_per_s"))
  return math.nan


def _timing_env(row: dict[str, Any]) -> str:
  devices, version = row.get("devices"), row.get("jax_version")
  if devices is None and version is None:
    return "not recorded"
  dev = ", ".join(map(str, devices)) if isinstance(devices, (list, tuple)) else str(devices)
  return f"{dev}, jax {version}"


def _sortable(v: Any) -> tuple:
  """Variant values sort numerically when they are numbers (rounds 1 < 100)."""
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    return (0, float(v), "")
  return (1, 0.0, str(v))


def runs_from_rows(rows: Sequence[dict[str, Any]],
                   where: Optional[Sequence[str]] = None) -> list[Run]:
  """Normalises result rows into ``Run``s with column labels; duplicate run_keys keep the last.

  Raises ReportError when a row lacks ``dataset`` or ``pruner`` (nothing can place it); the
  message starts with ``where[i]`` (e.g. ``'<path>:<line>'``, as ResultsError's) when given.
  """
  by_key: dict[Any, dict] = {}
  for i, row in enumerate(rows):
    at = f"{where[i]}: results row" if where is not None else f"results row {i + 1}"
    if not isinstance(row, dict):
      raise ReportError(f"{at} is not a JSON object")
    for need in ("dataset", "pruner"):
      if need not in row:
        raise ReportError(f"{at} (run_key {row.get('run_key')}) has no {need!r}; fix or "
                          "remove that line")
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
      label += " (" + ", ".join(setting_text(VARIANT_FIELDS[j], v[j]) for j in differing) + ")"
    # Pruners in the study's order, unknown ones after, then Unpruned and All-factorized.
    order = (PRUNERS.index(col) if col in PRUNERS else
             len(PRUNERS) + 1 + ("none", "all").index(col) if col in ("none", "all") else
             len(PRUNERS))
    col_key = (order, col, tuple(_sortable(v[j]) for j in differing), label)
    sparse_flag = r.get("inference_seconds_sparse_backfilled")
    runs.append(Run(
        dataset=r["dataset"], model=model, factorize=r.get("factorize", "none"),
        pruner=r["pruner"],
        compression=_ckey(r.get("compression", 0.0)) if r["pruner"] != "none" else 0.0,
        seed=int(r.get("seed", 0)), variant=v, column=label, col_key=col_key,
        top1=_num(r.get("top1")), inference_seconds=_num(r.get("inference_seconds")),
        flop_density=_num(r.get("flop_density")), density=_num(r.get("density")),
        collapsed=bool(r.get("collapsed", False)), collapsed_layer=r.get("collapsed_layer"),
        layers=_layer_flop_density(r.get("layers")),
        inference_seconds_sparse=_num(r.get("inference_seconds_sparse")),
        throughput=_last_throughput(r.get("history")), timing_env=_timing_env(r),
        sparse_backfilled=bool(sparse_flag),
        # Rows name the total parameter count params_total; older rows called it params.
        params_total=_num(r.get("params_total", r.get("params"))),
        history_epochs=len(r["history"]) if isinstance(r.get("history"), list) else 0))
  return runs


# ----------------------------------------------------------------------------- cells


@dataclasses.dataclass(frozen=True)
class Cell:
  """Mean ± sample std (ddof=1; 0 for one seed) of one metric over the seeds of one cell, with
  how many of those seeds carry each mark, and the timing-environment tags of its runs (only
  set where a table mixes environments)."""
  values: tuple[float, ...]
  n_collapsed: int = 0
  n_busy: int = 0
  n_backfilled: int = 0
  envs: tuple[str, ...] = ()

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
    """"97.51 ± 0.08 (n=2)", "11.35 † (n=1)", "0.148 ‡(1/2) (n=2)"; MISSING without values."""
    if not self.values:
      return MISSING
    s = format(self.mean, fmt)
    if self.n > 1:
      s += " ± " + format(self.std, fmt)
    for mark, k in ((COLLAPSE_MARK, self.n_collapsed), (BUSY_MARK, self.n_busy),
                    (BACKFILL_MARK, self.n_backfilled)):
      if k:
        s += " " + mark + ("" if k == self.n else f"({k}/{self.n})")
    if self.envs:
      s += " [" + ",".join(self.envs) + "]"
    return s + f" (n={self.n})"


def make_cell(runs: Iterable[Run], metric: str, busy: Optional[Callable[[Run], bool]] = None,
              backfill: bool = False, env_tags: Optional[dict[str, str]] = None) -> Cell:
  """The cell of ``runs`` (all seeds of one configuration) for ``metric``; NaNs are dropped.

  ``busy`` flags runs timed under a heavier load; ``backfill`` counts runs whose sparse timing
  was backfilled; ``env_tags`` maps a run's ``timing_env`` to its tag."""
  vals, n_col, n_busy, n_back, envs = [], 0, 0, 0, set()
  for r in sorted(runs, key=lambda r: r.seed):
    v = r.metric(metric)
    if math.isnan(v):
      continue
    vals.append(float(v))
    n_col += r.collapsed
    n_busy += bool(busy and busy(r))
    n_back += bool(backfill and r.sparse_backfilled)
    if env_tags:
      envs.add(env_tags[r.timing_env])
  return Cell(tuple(vals), n_col, n_busy, n_back, tuple(sorted(envs)))


@dataclasses.dataclass
class Table:
  """A rendered table: ``caption`` lines (what the table holds, settings, what was compared),
  ``header`` + ``rows`` of strings, ``legend`` lines (one per kind of mark the cells use),
  ``records`` (one dict per distinct cell, numbers unformatted) for CSV. ``caption_cells`` are
  cell texts shown in the caption (compression-independent references)."""
  title: str
  header: list[str]
  rows: list[list[str]]
  records: list[dict[str, Any]]
  caption: list[str] = dataclasses.field(default_factory=list)
  legend: list[str] = dataclasses.field(default_factory=list)
  caption_cells: list[str] = dataclasses.field(default_factory=list)

  def cell_texts(self) -> list[str]:
    return [c for r in self.rows for c in r[1:]] + list(self.caption_cells)


CSV_FIELDS = ("dataset", "model", "head", "column", "pruner", "compression", "density_nominal",
              "metric", "n", "mean", "std", "n_collapsed", "n_busy", "n_backfilled",
              "timing_env", "text")


def _record(run0: Run, head: str, compression: Optional[float], metric: str, cell: Cell,
            fmt: str, env: str = "") -> dict[str, Any]:
  return {"dataset": run0.dataset, "model": run0.model, "head": head, "column": run0.column,
          "pruner": run0.pruner,
          "compression": "" if compression is None else compression,
          "density_nominal": "" if compression is None else 10.0 ** -compression,
          "metric": metric, "n": cell.n, "mean": cell.mean, "std": cell.std,
          "n_collapsed": cell.n_collapsed, "n_busy": cell.n_busy,
          "n_backfilled": cell.n_backfilled, "timing_env": env, "text": cell.text(fmt)}


def legend_lines(texts: Sequence[str], busy: str = "", backfill: str = "",
                 envs: Optional[dict[str, str]] = None, missing: str = "no run") -> list[str]:
  """One explanation per kind of mark that occurs in ``texts`` (the cells), and none for marks
  that do not occur: the legend always matches the cells."""
  out = []
  if any(t != MISSING for t in texts):
    s = "(n=k): the cell averages k seeds"
    if any(" ± " in t for t in texts):
      s += "; a ± b: mean ± sample standard deviation (ddof=1) over those seeds"
    out.append(s + ".")
  if any(COLLAPSE_MARK in t for t in texts):
    out.append(f"{COLLAPSE_MARK}: the run collapsed (the collapse detector found no path from "
               "input to output).")
  if any(BUSY_MARK in t for t in texts):
    out.append(f"{BUSY_MARK}: {busy}")
  if any(BACKFILL_MARK in t for t in texts):
    out.append(f"{BACKFILL_MARK}: {backfill}")
  if any(re.search(r"[†‡§]\(\d+/\d+\)", t) for t in texts):
    out.append("A mark followed by (k/m): it holds for k of the m seeds.")
  used = {tag for t in texts for m in re.findall(r" \[([A-Z,]+)\]", t) for tag in m.split(",")}
  if used:
    out.append("Timing environment: " + "; ".join(f"[{tag}] {env}" for env, tag in
                                                  sorted((envs or {}).items(), key=lambda e: e[1])
                                                  if tag in used) + ".")
  if MISSING in texts:
    out.append(f"{MISSING}: {missing}.")
  return out


def _groups(runs: Iterable[Run]) -> dict[tuple, list[Run]]:
  """(dataset, model, factorize, col_key, compression) -> the runs (seeds) of that cell."""
  out: dict[tuple, list[Run]] = {}
  for r in runs:
    out.setdefault((r.dataset, r.model, r.factorize, r.col_key, r.compression), []).append(r)
  return out


def _dm_order(runs: Iterable[Run]) -> list[tuple[str, str]]:
  order = {"mnist": 0, "cifar10": 1}
  return sorted({(r.dataset, r.model) for r in runs}, key=lambda dm: (order.get(dm[0], 9), dm))


def _dm_name(dm: tuple[str, str]) -> str:
  return f"{DATASET_NAMES.get(dm[0], dm[0])} / {MODEL_NAMES.get(dm[1], dm[1])}"


def _columns(runs: Iterable[Run]) -> list[tuple]:
  """Method keys in display order: pruners (canonical order, variants), Unpruned, All."""
  return sorted({r.col_key for r in runs})


def _heads(runs: Iterable[Run]) -> list[str]:
  """Heads shown: dense and butterfly head always; all-factorized only if pruned runs have it."""
  heads = ["none", "head"]
  if any(r.factorize == "all" and r.pruner != "none" for r in runs):
    heads.append("all")
  return heads


def _lookup(groups, dm, head, col_key, c) -> tuple[Optional[list[Run]], Optional[float]]:
  """The runs of one displayed cell; unpruned methods ignore c, All ignores the head too."""
  kind = col_key[1]
  if kind == "all":
    return groups.get(dm + ("all", col_key, 0.0)), None
  if kind == "none":
    return groups.get(dm + (head, col_key, 0.0)), None
  return groups.get(dm + (head, col_key, c)), c


def _density_text(c: float) -> str:
  return f"{10.0 ** -c:.3g}"


def settings_caption(runs: Sequence[Run]) -> str:
  """The settings of ``runs`` (one dataset / architecture) that differ from the study's, in
  words: settings shared by every run first, then per method. Settings that vary inside a
  method are in its label and not repeated here. Empty when everything is the study's."""
  by_fam: dict[str, list[Run]] = {}
  for r in runs:
    by_fam.setdefault(r.col_key[1], []).append(r)
  fam_order = sorted(by_fam, key=lambda f: min(r.col_key for r in by_fam[f]))
  diffs: dict[str, list[str]] = {}  # family -> phrases
  shared: list[str] = []
  for field in VARIANT_FIELDS:
    per_fam = {}
    for fam in fam_order:
      values = {r.setting(field) for r in by_fam[fam]}
      study = _study_value(field, by_fam[fam][0].dataset, fam)
      if len(values) == 1 and study is not None:
        (v,) = values
        if v is not None and not _same(v, study):
          per_fam[fam] = (v, study)
    relevant = [f for f in fam_order if _study_value(field, by_fam[f][0].dataset, f) is not None]
    pairs = set(per_fam.values())
    if per_fam and len(per_fam) == len(relevant) == len(fam_order) and len(pairs) == 1:
      v, study = pairs.pop()
      shared.append(f"{setting_text(field, v)} (study: {_short(field, study)})")
      continue
    for fam, (v, study) in per_fam.items():
      diffs.setdefault(fam, []).append(
          f"{setting_text(field, v)} (study: {_short(field, study)})")
  parts = []
  if shared:
    parts.append("every run: " + ", ".join(shared))
  for fam in fam_order:
    if fam in diffs:
      parts.append(f"{PRUNER_NAMES.get(fam, fam)}: " + ", ".join(diffs[fam]))
  if not parts:
    return ""
  return "Settings that differ from the study's: " + "; ".join(parts) + "."


def _settings_line(runs: Sequence[Run], dms: Sequence[tuple[str, str]]) -> list[str]:
  out = []
  for dm in dms:
    s = settings_caption([r for r in runs if (r.dataset, r.model) == dm])
    if s:
      out.append((f"{_dm_name(dm)}: " if len(dms) > 1 else "") + s)
  if not out:
    out.append("All runs use the study's settings, except where a method's label says "
               "otherwise.")
  return out


def table1(runs: Sequence[Run], compression: float) -> Table:
  """Top-1 (%) at one compression c (density 10**-c): one row per method, one column per
  dataset / architecture x head. The Unpruned row holds the unpruned net with that head and the
  All-factorized row the all-butterfly / K-matrix net (the same runs in every head column, as it
  has no separate dense head)."""
  c = _ckey(compression)
  groups = _groups(runs)
  dms = _dm_order(runs)
  heads = _heads(runs)
  cols = [(dm, head) for dm in dms for head in heads]
  header = ["Method"] + [(f"{_dm_name(dm)}, " if len(dms) > 1 else "") + HEAD_NAMES[head]
                         for dm, head in cols]
  rows, records, seen = [], [], set()
  for k in _columns(runs):
    line = [k[3]]
    for dm, head in cols:
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
  where = f", {_dm_name(dms[0])}" if len(dms) == 1 else ""
  title = (f"Table 1: top-1 accuracy (%) at compression c = {c:g} "
           f"(density 10^-{c:g} = {_density_text(c)}){where}")
  caption = _settings_line(runs, dms)
  caption.append("Unpruned and All-factorized do not depend on c; All-factorized (every layer "
                 "butterfly / K-matrix, not pruned) is the same runs in each head column.")
  table = Table(title, header, rows, records, caption)
  table.legend = legend_lines(table.cell_texts())
  return table


def _busy_predicate(runs: Sequence[Run]) -> tuple[Callable[[Run], bool], dict[tuple, float]]:
  """Runs timed while the machine was busier: the run's last training epoch ran at under
  BUSY_FRACTION of the median throughput of the runs of the same net (dataset, model, head)."""
  by_net: dict[tuple, list[float]] = {}
  for r in runs:
    if not math.isnan(r.throughput):
      by_net.setdefault((r.dataset, r.model, r.factorize), []).append(r.throughput)
  medians = {k: float(np.median(v)) for k, v in by_net.items()}

  def busy(r: Run) -> bool:
    med = medians.get((r.dataset, r.model, r.factorize))
    return med is not None and r.throughput < BUSY_FRACTION * med
  return busy, medians


SECONDS_FMT = ".3g"
TIMING_KINDS = {"inference_seconds": "masked-dense model",
                "inference_seconds_sparse": "real sparse forward"}


def table2(runs: Sequence[Run]) -> list[Table]:
  """Inference seconds (median of 5 warm passes over the test set, mean ± std over seeds).

  One table per dataset / architecture x timing (masked dense; real sparse when a run has
  ``inference_seconds_sparse``) x head, so that each fits a screen: rows are pruned methods,
  columns compressions; the unpruned and all-factorized nets, which do not depend on c, are in
  the caption. A table without a single timing is left out (the first table of its kind says
  so). The CSV has one record per cell shown, in every table.

  Timings are comparable only under the same load, which rows do not record. Each caption says
  what was compared: the timing environment (devices, jax version; tagged per cell when a table
  mixes several), for in-run timings the throughput of the run's last training epoch against
  the median of runs of the same net (``BUSY_MARK`` below ``BUSY_FRACTION`` of it), and for
  sparse timings whether they were backfilled in a later pass (``BACKFILL_MARK`` per cell when a
  table mixes backfilled and in-run timings).
  """
  groups = _groups(runs)
  busy, medians = _busy_predicate(runs)
  tables: list[Table] = []
  for dm in _dm_order(runs):
    dm_runs = [r for r in runs if (r.dataset, r.model) == dm]
    methods = [k for k in _columns(dm_runs) if k[1] not in ("none", "all")]
    refs = [k for k in _columns(dm_runs) if k[1] in ("none", "all")]
    comps = sorted({r.compression for r in dm_runs if r.pruner != "none"})
    metrics = ["inference_seconds"]
    if any(not math.isnan(r.inference_seconds_sparse) for r in dm_runs):
      metrics.append("inference_seconds_sparse")
    settings = _settings_line(dm_runs, [dm])
    test_n = {r.setting("test_examples") for r in dm_runs} - {None}
    over = _count(test_n.pop(), "test example") if len(test_n) == 1 else "the whole test set"
    for m in metrics:
      sparse = m != "inference_seconds"
      timed = [r for r in dm_runs if not math.isnan(r.metric(m))]
      envs = sorted({r.timing_env for r in timed})
      env_tags = ({e: chr(ord("A") + i) for i, e in enumerate(envs)} if len(envs) > 1
                  else None)
      n_back = sum(r.sparse_backfilled for r in timed) if sparse else 0
      mixed_backfill = 0 < n_back < len(timed)

      def flagged(r: Run, sparse=sparse) -> bool:  # throughput is next to in-run timings only
        return busy(r) and not (sparse and r.sparse_backfilled)

      def cell_of(cell_runs, m=m, flagged=flagged, mixed=mixed_backfill, tags=env_tags):
        return make_cell(cell_runs, m, flagged, mixed, tags)
      first, empty_heads = len(tables), []
      for head in _heads(dm_runs):
        if not any(r.factorize == head for r in timed):
          empty_heads.append(HEAD_NAMES[head])
          continue
        header = ["Method"] + [f"c = {c:g} (density {_density_text(c)})" for c in comps]
        rows, records, shown = [], [], []
        for k in methods:
          line = [k[3]]
          for c in comps:
            cell_runs, cc = _lookup(groups, dm, head, k, c)
            cell = cell_of(cell_runs or [])
            line.append(cell.text(SECONDS_FMT))
            if cell_runs:
              records.append(_record(cell_runs[0], head, cc, m, cell, SECONDS_FMT,
                                     _envs_text(cell_runs)))
              shown += [r for r in cell_runs if not math.isnan(r.metric(m))]
          if any(t != MISSING for t in line[1:]):
            rows.append(line)
        ref_texts = []
        for k in refs:
          cell_runs, _ = _lookup(groups, dm, head, k, None)
          if not cell_runs:
            continue
          cell = cell_of(cell_runs)
          ref_texts.append((k[3], cell.text(SECONDS_FMT)))
          records.append(_record(cell_runs[0], "all" if k[1] == "all" else head, None, m, cell,
                                 SECONDS_FMT, _envs_text(cell_runs)))
          shown += [r for r in cell_runs if not math.isnan(r.metric(m))]
        caption = [f"Seconds for one jitted, warmed-up pass of the {TIMING_KINDS[m]} over "
                   f"{over} (median of 5 passes), {HEAD_NAMES[head]}."]
        if sparse:
          caption.append("Real sparse: bfprune.sparse's BCSR kernels hold only the kept "
                         "weights; nets with layers it has no kernel for (butterfly / K-matrix, "
                         "BatchNorm) have no such timing.")
        else:
          caption.append("Masked dense: pruned weights are stored as zeros, so the net costs "
                         "what the dense net costs at every c.")
        if ref_texts:
          caption.append("Not pruned (the same at every c): " + "; ".join(
              f"{name} {t}" for name, t in ref_texts) + ".")
        caption += settings
        caption.append(_timing_caption(m, shown, medians, flagged))
        letter = chr(ord("a") + len(tables))
        title = (f"Table 2{letter}: inference seconds, {TIMING_KINDS[m]}, {_dm_name(dm)}, "
                 f"{HEAD_NAMES[head]}")
        table = Table(title, header, rows, records, caption,
                      caption_cells=[t for _, t in ref_texts])
        table.legend = legend_lines(
            table.cell_texts(),
            busy=(f"timed while the machine was busier: the run's last training epoch, just "
                  f"before the timing, ran at under {BUSY_FRACTION:g}x the median throughput "
                  f"of the runs of the same net."),
            backfill=("sparse timing backfilled: measured after the runs, in a later separate "
                      "pass (row field inference_seconds_sparse_backfilled), not in the run's "
                      "own process."),
            envs=env_tags,
            missing="no run" + (", or no sparse timing" if sparse else ", or no timing"))
        tables.append(table)
      if empty_heads and len(tables) > first:
        tables[first].caption.append(
            f"No {TIMING_KINDS[m]} timing for the {' or '.join(empty_heads)}: no table for it.")
  return tables


def _envs_text(runs: Iterable[Run]) -> str:
  return "; ".join(sorted({r.timing_env for r in runs}))


def _timing_caption(metric: str, runs: Sequence[Run], medians: dict[tuple, float],
                    flagged: Callable[[Run], bool]) -> str:
  """What was compared to tell timings taken under different loads, for one Table 2 (``runs``:
  the runs whose timings it shows)."""
  parts = []
  envs = sorted({r.timing_env for r in runs})
  if envs == ["not recorded"]:
    parts.append("no row records its devices or jax version")
  elif len(envs) == 1:
    parts.append(f"every timing recorded on {envs[0]}")
  else:
    parts.append(f"{len(envs)} timing environments (devices, jax version), tagged per cell")
  sparse = metric != "inference_seconds"
  if sparse:
    n_back = sum(r.sparse_backfilled for r in runs)
    if n_back == len(runs):
      parts.append("every sparse timing here was backfilled: measured after the runs in a later "
                   "pass, not in the run's own process, so under a different load than the "
                   "masked-dense timings; compare the two tables only roughly")
    elif n_back:
      parts.append(f"{n_back} of {len(runs)} sparse timings backfilled in a later pass "
                   f"({BACKFILL_MARK}), the others taken in the run's process right after its "
                   f"masked-dense timing")
    else:
      parts.append("every sparse timing taken in the run's own process right after its "
                   "masked-dense timing")
  in_run = [r for r in runs if not (sparse and r.sparse_backfilled)]
  nets = sorted({(r.dataset, r.model, r.factorize) for r in in_run} & set(medians))
  if nets:
    meds = ", ".join(f"{medians[n]:,.0f} examples/s for the {HEAD_NAMES.get(n[2], n[2])} net"
                     for n in nets)
    n_busy = sum(flagged(r) for r in in_run)
    parts.append(
        "rows record no machine load, so the load of each in-run timing was judged by the "
        "throughput of its run's last training epoch (just before the timing) against the "
        f"median of the runs of the same net ({meds}): {n_busy} of {len(in_run)} timings ran at "
        f"under {BUSY_FRACTION:g}x it" + (f" ({BUSY_MARK})" if n_busy else "") +
        ("; with a single training epoch that epoch includes compilation, so the comparison "
         "is coarse" if any(r.history_epochs == 1 for r in in_run) else ""))
  elif in_run:
    parts.append("rows record neither machine load nor training throughput: timings of "
                 "different runs may have been taken under different loads")
  return "Timing conditions: " + "; ".join(parts) + "."


def to_markdown(table: Table) -> str:
  lines = [f"### {table.title}", ""]
  for c in table.caption:
    lines += [c, ""]
  lines += ["| " + " | ".join(table.header) + " |",
            "|" + "|".join("---" for _ in table.header) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in table.rows]
  if table.legend:
    lines += [""] + [f"- {n}" for n in table.legend]
  return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n", restval="")
  w.writeheader()
  for rec in table.records:
    w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in rec.items()})
  return buf.getvalue()


# ----------------------------------------------------------------------------- figures


@dataclasses.dataclass(frozen=True)
class Series:
  """One line of Figure 1 / 2: ``x`` compressions that have runs, per-point mean / std /
  number of seeds / number of collapsed seeds, and ``collapsed_points`` (x, value) of every
  collapsed run (to mark them)."""
  label: str
  col_key: tuple
  factorize: str
  x: tuple[float, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  n_collapsed: tuple[int, ...]
  collapsed_points: tuple[tuple[float, float], ...] = ()
  n: tuple[int, ...] = ()


def curve_series(runs: Sequence[Run], dataset: str, model: str, metric: str) -> list[Series]:
  """Pruned runs of one dataset / model as lines over compression, one per method x head."""
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
    bad = tuple((x, float(r.metric(metric))) for x in xs
                for r in sorted(groups[(dataset, model, fac, col_key, x)], key=lambda r: r.seed)
                if r.collapsed and not math.isnan(r.metric(metric)))
    out.append(Series(f"{col_key[3]}, {HEAD_NAMES[fac]}", col_key, fac,
                      tuple(x for x, _ in pts), tuple(c.mean for _, c in pts),
                      tuple(c.std for _, c in pts), tuple(c.n_collapsed for _, c in pts), bad,
                      tuple(c.n for _, c in pts)))
  return out


def on_grid(s: Series, grid: Sequence[float]) -> np.ndarray:
  """The series' means at each grid compression, NaN where it has no run: plotted as one line,
  the NaNs break it, so no segment crosses a compression without a run."""
  at = dict(zip(s.x, s.mean))
  return np.array([at.get(x, np.nan) for x in grid], float)


def marker_sizes(ys: np.ndarray, tol: float, base: float = 6.0, max_size: float = 16.0
                 ) -> np.ndarray:
  """Marker sizes (points) that keep points drawn at (nearly) the same place visible.

  ``ys`` is (series, grid) in drawing order, already in the axis' scale (log10 for a log axis);
  points of one column closer than ``tol`` to their neighbour form a group. In a group of k the
  first drawn gets the largest marker and each later one a smaller one (down to ``base``), so
  every marker shows as a ring around those drawn over it. Isolated points get ``base``."""
  sizes = np.full(ys.shape, base)
  for j in range(ys.shape[1]):
    idx = sorted((i for i in range(ys.shape[0]) if np.isfinite(ys[i, j])),
                 key=lambda i: (ys[i, j], i))
    groups, cur = [], []
    for i in idx:
      if cur and ys[i, j] - ys[cur[-1], j] > tol:
        groups.append(cur)
        cur = []
      cur.append(i)
    if cur:
      groups.append(cur)
    for g in groups:
      # Rings at least 1 point wide, 1.75 where there is room under max_size.
      step = max(2.0, min(3.5, (max_size - base) / (len(g) - 1))) if len(g) > 1 else 0.0
      for rank, i in enumerate(sorted(g)):
        sizes[i, j] = base + step * (len(g) - 1 - rank)
  return sizes


def zoom_range(values: np.ndarray) -> Optional[tuple[float, float]]:
  """A y range for a zoom panel on the top cluster of points (e.g. every pruner near 98 % at low
  compression): from the maximum down while the next point is within 5 % of the whole span.
  Returned when that cluster holds at least a quarter of the points and spans under 15 % of the
  whole range; None when the points are spread out anyway."""
  v = np.sort(values[np.isfinite(values)])[::-1]
  if v.size < 8 or v[0] - v[-1] <= 0:
    return None
  span = v[0] - v[-1]
  k = 1
  while k < v.size and v[k - 1] - v[k] < 0.05 * span:
    k += 1
  hi, lo = float(v[0]), float(v[k - 1])
  if k < v.size / 4 or hi - lo >= 0.15 * span:
    return None
  pad = max(0.08 * (hi - lo), 1e-3 * abs(hi))
  return lo - pad, hi + pad


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


_LINESTYLE = {"none": "-", "head": "--", "all": ":"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def _styles(keys: Sequence[tuple]) -> dict[tuple, tuple[Any, str]]:
  """Method -> (colour, marker): distinct for up to 10 methods."""
  plt = _plt()
  cmap = plt.get_cmap("tab10")
  return {k: (cmap(i % 10), _MARKERS[i % len(_MARKERS)])
          for i, k in enumerate(sorted(set(keys)))}


def _figure_title(title: str, runs: Sequence[Run], dataset: str, model: str) -> str:
  dm_runs = [r for r in runs if (r.dataset, r.model) == (dataset, model)]
  s = settings_caption(dm_runs)
  head = title.format(dataset=DATASET_NAMES.get(dataset, dataset),
                      model=MODEL_NAMES.get(model, model))
  return head + ("\n" + "\n".join(textwrap.wrap(s, 110)) if s else "")


def _draw_curves(ax, series: Sequence[Series], grid: list[float], styles: dict, logy: bool,
                 ylim: Optional[tuple[float, float]], height_pts: float) -> None:
  """The method x head series on one axis: lines broken where a compression has no run,
  nested markers where points coincide at this axis' scale, ± std bars, collapsed runs."""
  ys = np.array([on_grid(s, grid) for s in series]) if series else np.zeros((0, len(grid)))
  scaled = np.where(ys > 0, np.log10(np.where(ys > 0, ys, 1.0)), np.nan) if logy else ys
  if ylim is not None:
    lo, hi = (np.log10(ylim[0]), np.log10(ylim[1])) if logy else ylim
  else:
    finite = scaled[np.isfinite(scaled)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
  span = max(hi - lo, 1e-12) * 1.1
  base = 6.0
  # Points closer than about a third of a marker on screen would hide each other.
  tol = 0.35 * base * span / height_pts
  sizes = marker_sizes(scaled, tol=tol, base=base)
  for i, s in enumerate(series):
    colour, marker = styles[s.col_key]
    hollow = s.factorize != "none"
    z = 2 + i / max(len(series), 1)
    # One line over the whole grid: NaN where this series has no run breaks it there.
    ax.plot(grid, ys[i], color=colour, linestyle=_LINESTYLE[s.factorize], linewidth=1.4,
            zorder=z, gid=f"line:{s.label}")
    # Smaller markers above larger ones (whatever the series), so a nested or nearby small
    # marker is never covered by a big one drawn later.
    ok = np.isfinite(ys[i])
    for size in sorted(set(sizes[i][ok])):
      at = ok & (sizes[i] == size)
      ax.scatter(np.array(grid)[at], ys[i][at], s=size ** 2, marker=marker,
                 facecolors="white" if hollow else colour, edgecolors=colour,
                 linewidths=1.5 if hollow else 0.6, zorder=5 + (40 - size) + i / 100,
                 gid=f"markers:{s.label}")
    e = np.array(s.std)
    if (e > 0).any():
      ax.errorbar(np.array(s.x)[e > 0], np.array(s.mean)[e > 0], yerr=e[e > 0], fmt="none",
                  ecolor=colour, elinewidth=1.0, capsize=3, zorder=z)
  # Collapsed runs: a thin black x behind the markers, wider than every marker drawn there,
  # so its arms show without covering any series.
  bad = [p for s in series for p in s.collapsed_points]
  if bad:
    bx, by = np.array(bad).T
    bs = []
    for x, y in bad:
      j = grid.index(x)
      yt = np.log10(y) if logy and y > 0 else y
      near = np.isfinite(scaled[:, j]) & (np.abs(scaled[:, j] - yt) <= tol)
      bs.append((sizes[near, j].max() if near.any() else base) + 9.0)
    ax.scatter(bx, by, marker="x", s=np.array(bs) ** 2, linewidths=1.3, color="black",
               zorder=4.5, gid="collapsed")


def _curve_figure(runs: Sequence[Run], dataset: str, model: str, metric: str, ylabel: str,
                  title: str, logy: bool, reference: Optional[str] = None, zoom: bool = False):
  plt = _plt()
  from matplotlib.lines import Line2D
  series = curve_series(runs, dataset, model, metric)
  styles = _styles([s.col_key for s in series])
  grid = sorted({x for s in series for x in s.x})
  means = np.array([m for s in series for m in s.mean], float)
  zr = zoom_range(means) if zoom and not logy else None
  height_in = 4.2
  if zr is None:
    fig, ax = plt.subplots(figsize=(9.0, height_in + 0.8))
    axes = [ax]
  else:
    fig, axes = plt.subplots(1, 2, figsize=(14.0, height_in + 0.8))
  dm_runs = [r for r in runs if (r.dataset, r.model) == (dataset, model) and r.pruner == "none"]
  refs = []
  for fac, style, name in (("none", "-", "Unpruned, dense head"),
                           ("head", "--", "Unpruned, butterfly head"),
                           ("all", ":", "All-factorized, not pruned")):
    cell = make_cell([r for r in dm_runs if r.factorize == fac], metric)
    if cell.n and not (logy and cell.mean <= 0):
      # The value in the label: reference lines at the same height stay identifiable.
      refs.append((cell.mean, style, f"{name}: {cell.mean:.4g}" +
                   (f" {COLLAPSE_MARK}" if cell.n_collapsed else "")))
  for j, ax in enumerate(axes):
    ylim = zr if j == 1 else None
    _draw_curves(ax, series, grid, styles, logy, ylim, height_pts=72 * height_in * 0.8)
    for y, style, _ in refs:
      ax.axhline(y, color="0.45", linestyle=style, linewidth=1.1, zorder=1)
    if reference == "density" and grid:
      xs = np.array(grid)
      ax.plot(xs, 10.0 ** -xs, color="0.7", linewidth=3, alpha=0.6, zorder=0)
    if grid:
      if min(grid) > 0:
        ax.set_xscale("log")
      ax.set_xticks(grid)
      ax.set_xticklabels([f"{x:g}" for x in grid])
      ax.minorticks_off()
    if logy:
      ax.set_yscale("log")
    if ylim is not None:
      ax.set_ylim(*ylim)
      ax.set_title(f"zoom: {ylim[0]:.4g} to {ylim[1]:.4g}", fontsize=9)
    ax.set_xlabel("compression c (density 10^-c)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, which="both")
  handles: list[Any] = []
  for k in sorted({s.col_key for s in series}):
    colour, marker = styles[k]
    handles.append(Line2D([], [], color=colour, marker=marker, linestyle="none",
                          markersize=7, label=k[3]))
  for fac in [f for f in HEADS if any(s.factorize == f for s in series)]:
    hollow = fac != "none"
    handles.append(Line2D([], [], color="black", linestyle=_LINESTYLE[fac], marker="o",
                          markerfacecolor="white" if hollow else "black", markersize=6,
                          label=f"{HEAD_NAMES[fac]} ({'hollow' if hollow else 'filled'})"))
  if any(s.collapsed_points for s in series):
    handles.append(Line2D([], [], color="black", marker="x", linestyle="none", markersize=7,
                          markeredgewidth=1.3, label=f"collapsed run {COLLAPSE_MARK} "
                          "(x behind the marker)"))
  for _, style, name in refs:
    handles.append(Line2D([], [], color="0.45", linestyle=style, linewidth=1.1, label=name))
  if reference == "density" and grid:
    handles.append(Line2D([], [], color="0.7", linewidth=3, alpha=0.6,
                          label="weight density 10^-c"))
  fig.suptitle(_figure_title(title, runs, dataset, model), fontsize=10)
  if handles:
    axes[-1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8,
                    frameon=False)
  if not series and not dm_runs:
    axes[0].text(0.5, 0.5, "no runs", ha="center", va="center", transform=axes[0].transAxes)
  fig.tight_layout()
  return fig


CURVE_CAPTION = (
    "Colour and marker: method; solid line and filled marker: dense head; dashed line and "
    "hollow marker: butterfly head. Points are the mean over seeds with ± sample-std bars where "
    "there are several; points at the same value are drawn as nested markers (the one drawn "
    "first largest), not shifted sideways. A line joins only neighbouring compressions that both "
    "have runs. Black x behind a marker: a collapsed run, at its own value. Grey horizontal "
    "lines: the nets that do not depend on c, with their values in the legend (lines at the same "
    "height overlap). A right-hand panel, where there is one, shows the same data zoomed on the "
    "band where most points crowd.")


def figure1(runs: Sequence[Run], dataset: str, model: str):
  """Top-1 vs compression per method x head (see ``CURVE_CAPTION``)."""
  return _curve_figure(runs, dataset, model, "top1", "top-1 accuracy (%)",
                       "Figure 1: top-1 vs compression, {dataset} / {model}", logy=False,
                       zoom=True)


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


FIG3_COLOURS = {"none": "tab:blue", "head": "tab:orange", "all": "tab:green"}


def figure3(runs: Sequence[Run], dataset: str, model: str, compression: float):
  """Per-layer FLOP density at compression c: one panel per method, grouped bars per layer,
  one colour per head; a collapsed run's bars are hatched and its collapsed layer carries a
  black x. One legend for the figure, built from the same colours and hatch as the bars.
  Returns None when no pruned run at c has layer data."""
  import warnings
  from matplotlib.lines import Line2D
  from matplotlib.patches import Patch
  plt = _plt()
  order, prof = layer_profiles(runs, dataset, model, compression)
  if not prof:
    return None
  keys = sorted(prof)
  ncols = min(3, len(keys))
  nrows = math.ceil(len(keys) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(max(5.0, 0.42 * len(order) + 1.5) * ncols,
                                                  3.2 * nrows + 0.9), squeeze=False,
                           sharey=True)
  facs = [f for f in HEADS if any(f in prof[k] for k in keys)]
  width = 0.8 / len(facs)
  x = np.arange(len(order))
  any_collapsed = False
  for ax, k in zip(axes.flat, keys):
    flags_ = []
    for j, fac in enumerate(facs):
      if fac not in prof[k]:
        continue
      mean, collapsed = prof[k][fac]
      pos = x + (j - (len(facs) - 1) / 2) * width
      ax.bar(pos, np.nan_to_num(mean, nan=0.0), width, color=FIG3_COLOURS[fac],
             label=HEAD_NAMES[fac], hatch="//" if collapsed else None,
             edgecolor="black" if collapsed else FIG3_COLOURS[fac], linewidth=0.4)
      any_collapsed |= bool(collapsed)
      for layer in set(collapsed):
        if layer in order:
          i = order.index(layer)
          ax.scatter([pos[i]], [0.02], marker="x", color="black", s=60, zorder=5)
      if collapsed:
        flags_.append(f"{HEAD_NAMES[fac]}: {COLLAPSE_MARK} {', '.join(sorted(set(collapsed)))}")
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
  handles: list[Any] = [Patch(facecolor=FIG3_COLOURS[f], edgecolor=FIG3_COLOURS[f],
                              label=HEAD_NAMES[f]) for f in facs]
  if any_collapsed:
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                         label=f"collapsed run {COLLAPSE_MARK} (hatched)"))
    handles.append(Line2D([], [], color="black", marker="x", linestyle="none",
                          label="its collapsed layer"))
  handles.append(Line2D([], [], color="0.5", linestyle=":",
                        label=f"weight density {_density_text(_ckey(compression))}"))
  title = _figure_title(f"Figure 3: per-layer FLOP density at c = {compression:g}, "
                        "{dataset} / {model}", runs, dataset, model)
  fig.suptitle(title, fontsize=10)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
             frameon=False, bbox_to_anchor=(0.5, 0.0))
  return fig


FIG3_CAPTION = ("One panel per method, one bar per layer and head (colours in the legend); "
                "dotted: the weight density 10^-c every pruner was asked for.")


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


def default_out(results_file: Path) -> Path:
  """runs/report/<name of the folder holding results.jsonl>: never the results folder itself,
  so regenerating a committed report takes an explicit --out."""
  name = results_file.resolve().parent.name or "results"
  return DEFAULT_OUT_ROOT / name


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
  out_dir = Path(out) if out else default_out(path)
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

  def save(fig, name: str, caption: str) -> None:
    p = out_dir / name
    fig.savefig(p, dpi=130, bbox_inches="tight")
    plt.close(fig)
    written.append(p)
    page.extend([f"![{name}]({name})", "", caption, ""])

  for ds, model in _dm_order(runs):
    save(figure1(runs, ds, model), f"fig1_top1_{ds}_{model}.png", "Figure 1. " + CURVE_CAPTION)
    save(figure2(runs, ds, model), f"fig2_flop_density_{ds}_{model}.png",
         "Figure 2. Same encoding as Figure 1; thick grey: the weight density 10^-c.")
    fig = figure3(runs, ds, model, fig3_compression)
    if fig is None:
      logging.warning("Figure 3: no pruned %s/%s run with layer data at compression %g", ds,
                      model, fig3_compression)
      page += [f"Figure 3 ({ds}/{model}): no pruned run at c = {fig3_compression:g}.", ""]
    else:
      save(fig, f"fig3_layer_flops_{ds}_{model}_c{_slug(fig3_compression)}.png",
           "Figure 3. " + FIG3_CAPTION)
  put("report.md", "\n".join(page))
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    path, out_dir, t1, f3 = validate_flags(FLAGS.results, FLAGS.out, FLAGS.table1_compression,
                                           FLAGS.fig3_compression)
    # A corrupt line, or a row that cannot be placed: one line naming the file and line.
    numbered = results_io.read_numbered_rows(path)
    runs = runs_from_rows([row for _, row in numbered], [f"{path}:{n}" for n, _ in numbered])
  except ValueError as e:  # ReportError, and read_rows' malformed-line error
    sys.exit(f"report.py: error: {e}")
  written = write_report(runs, out_dir, t1, f3)
  logging.info("%d runs from %s -> %d files in %s", len(runs), path, len(written), out_dir)
  print(f"wrote {len(written)} files to {out_dir}")


if __name__ == "__main__":
  app.run(main)
