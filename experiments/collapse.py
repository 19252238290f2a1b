r"""Critical compression of each pruner, with a dense head and a butterfly head.

  python experiments/collapse.py --dataset=mnist [--pruners=rand,mag,snip,grasp,synflow]
      [--heads=none,head] [--resolution=0.05] [--c_max=6] [--train_epochs=1]
      [--train_examples=0] [--mag_pre_epochs=1] [--monotone_checks=2] [--seed=0]
      [--factorize_with=butterfly] [--prune_factors] [--searches=collapse,accuracy]
      [--data_dir=...] [--out_dir=runs/collapse/mnist] [--dry_run]
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I | --distributed=auto]

For every pruner x head (``--heads``: ``none`` = dense classifier, ``head`` = butterfly (or
``--factorize_with``) classifier, as ``--factorize`` in sweep.py; its factors are not prunable
unless ``--prune_factors``) two searches over the compression c (density 10^-c of the prunable
weights):

* collapse: c*_collapse = the largest c at which the pruned network has not collapsed
  (``bfprune.metrics.detect_collapse``: a prunable layer keeps nothing, or no path joins input to
  output). Pruning is at initialisation, except magnitude pruning, which first trains the dense
  network ``--mag_pre_epochs`` epochs (default 1 for speed; the study uses 10).
* accuracy: c*_accuracy = the largest c at which test top-1 after ``--train_epochs`` epochs of
  training the pruned network is still >= 2x chance (20% for 10 classes).

Both are bisections on the grid c = k * resolution, k = 0..c_max/resolution. Bisection assumes
the event is monotone in c (once collapsed / below 2x chance, so for every larger c). That need
not hold (pruning at c and at c' are different draws / score rankings), so: the bracket endpoints
are probed first (c = 0 must pass, c_max must fail; otherwise the result is reported as
"fails at 0" or "censored, >= c_max"); after each bisection ``--monotone_checks`` extra grid
points each side of the bracket are probed (just below c*, just above c* + resolution), and every
probe of a pair (the accuracy search also records collapse at its points) is checked against the
monotone assumption; violating pairs are counted in the table. The reported bracket is exact
for the probed points: the net is fine at c* and fails at c* + resolution.

Every probe (pruner, head, c, kind) appends one row atomically to ``<out_dir>/results.jsonl``;
rerunning the command skips probes already there (it replays the bisections from the file).
Pruned masks are cached in memory per (pruner, head, c), so the accuracy search reuses the
collapse search's pruning. Outputs: ``collapse.md``, ``collapse.csv`` and ``collapse.png``.
``--dry_run`` replays each search from results.jsonl and prints how far it gets (finished with
its c*, or the next probe it needs), computing and writing nothing. A flag value is used as given
or refused with one line, also a flag no probe would use (e.g. --train_epochs without the
accuracy search).

With the multi-process flags (``experiments/distributed.py``) every probe runs over all
processes' devices, masks are computed on process 0 and broadcast, and process 0 alone writes
rows and outputs.
"""
from __future__ import annotations

import csv
import io
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import config as cfg_lib  # noqa: E402
from experiments import cpu_flags  # noqa: E402
from experiments import distributed  # noqa: E402
from experiments import results_io  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined on demand (by the script's main) so that importing this module, e.g. for its
  bisection, adds no flags that could clash with other scripts' (sweep.py defines --dataset too)."""
  flags.DEFINE_string("dataset", "mnist", "mnist | cifar10")
  flags.DEFINE_string("model", None, "fc | vgg16 (default: fc for mnist, vgg16 for cifar10)")
  flags.DEFINE_string("pruners", "rand,mag,snip,grasp,synflow", "Comma list of pruners")
  flags.DEFINE_string("heads", "none,head",
                      "Comma list: none (dense head) | head (structured head)")
  flags.DEFINE_string("factorize_with", "butterfly",
                      "Structured head for --heads=head: butterfly | kmatrix | monarch")
  flags.DEFINE_bool("prune_factors", False, "Structured head's factors (twiddles / Monarch "
                    "blocks) prunable like kernels; default: only kernels, as in the study")
  flags.DEFINE_string("searches", "collapse,accuracy", "Comma list: collapse | accuracy")
  flags.DEFINE_float("resolution", 0.05, "Bisection resolution in compression c")
  flags.DEFINE_float("c_max", 6.0,
                     "Upper end of the search bracket [0, c_max] (density 10**-c_max)")
  flags.DEFINE_integer("train_epochs", 1, "Training epochs after pruning (accuracy search)")
  flags.DEFINE_integer("train_examples", 0, "Use only the first n training examples (0: all)")
  flags.DEFINE_integer("mag_pre_epochs", 1, "Dense training epochs before magnitude pruning, "
                       ">= 0 (needs mag in --pruners)")
  flags.DEFINE_integer("prune_rounds", None, "Pruning rounds, >= 1 (default: 100 for synflow, "
                       "1 for the others)")
  flags.DEFINE_integer("monotone_checks", 2, "Extra probes each side of every bracket (the "
                       "grid points just below c* and just above c* + resolution) to test the "
                       "monotone assumption")
  flags.DEFINE_integer("batch_size", 256, "Batch size")
  flags.DEFINE_integer("seed", 0, "Seed (init, pruning data, random scores, data order)")
  flags.DEFINE_string("data_dir", None, "Folder of the standard data files (default: "
                      "$BFPRUNE_DATA_DIR, else tensorflow-datasets)")
  flags.DEFINE_string("out_dir", None,
                      "Output folder (default runs/collapse/<dataset>; the committed results "
                      "are in experiments/results/collapse/<dataset>)")
  flags.DEFINE_bool("dry_run", False, "Print each search (pruner x head x search) and how far "
                    "the probes already in <out_dir>/results.jsonl take it, then exit: no "
                    "training, no data loaded, nothing written")
  flags.DEFINE_string("compilation_cache", "",
                      "JAX persistent compilation cache folder, or 'none' (default: "
                      "$XDG_CACHE_HOME/bfprune/jax). Each probe builds new closures (pruning "
                      "scores, collapse detector), which plain jit recompiles; the on-disk cache, "
                      "keyed by the compiled program, makes repeats cheaper")
  cpu_flags.define_flags()
  distributed.define_flags()


HEADS = ("none", "head")
SEARCHES = ("collapse", "accuracy")
RESULTS = "results.jsonl"
# What the searches read from a stored probe row, by kind (a number: int or float, not bool).
ROW_FIELDS = {
    "collapse": ("probe_key", "pruner", "factorize", "compression", "collapsed"),
    "accuracy": ("probe_key", "pruner", "factorize", "compression", "collapsed", "top1",
                 "below_threshold"),
}
_FIELD_TYPES = {"probe_key": str, "pruner": str, "factorize": str, "compression": "number",
                "top1": "number", "collapsed": bool, "below_threshold": bool}


def read_probe_rows(path: Path) -> list[dict[str, Any]]:
  """The probe rows of a results.jsonl ([] when absent). A row that is not a probe of this
  script, or lacks a field the searches read, raises ResultsError naming file and line."""
  rows = []
  for n, row in results_io.read_numbered_rows(path):
    kind = row.get("kind")
    if kind not in ROW_FIELDS:
      raise results_io.row_error(path, n, f"'kind' is {kind!r}, not a probe of collapse.py "
                                 f"({' or '.join(ROW_FIELDS)})")
    for field in ROW_FIELDS[kind]:
      want, value = _FIELD_TYPES[field], row.get(field)
      ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
            if want == "number" else isinstance(value, want))
      if not ok:
        problem = "has no" if field not in row else f"has {value!r} as"
        article = "an" if kind[0] in "aeiou" else "a"
        raise results_io.row_error(path, n, f"{article} {kind} probe row {problem} {field!r} "
                                   f"(a {want if isinstance(want, str) else want.__name__})")
    rows.append(row)
  return rows


def head_name(head: str) -> str:
  """'dense head', or e.g. 'butterfly head' ('... (pruned)' with --prune_factors)."""
  if head == "none":
    return "dense head"
  return f"{FLAGS.factorize_with} head" + (" (pruned)" if FLAGS.prune_factors else "")


# ----------------------------------------------------------------------------- bisection


class Bracket(NamedTuple):
  """Result of a bisection over c in [0, c_max] on the grid k * resolution.

  Attributes:
    last_ok: largest probed c that passes (None: c = 0 already fails).
    first_fail: smallest probed c that fails (None: c_max still passes).
    probes: the c values probed, in order (each once).
  """
  last_ok: Optional[float]
  first_fail: Optional[float]
  probes: tuple[float, ...]

  @property
  def status(self) -> str:
    """'bracketed' (fine at last_ok, fails at first_fail = last_ok + resolution),
    'censored' (still fine at c_max) or 'fails_at_0'."""
    if self.last_ok is None:
      return "fails_at_0"
    return "censored" if self.first_fail is None else "bracketed"


def grid_point(k: int, resolution: float) -> float:
  """The k-th grid compression, rounded so equal probes give identical floats (cache keys)."""
  return round(k * resolution, 9)


def grid_size(c_max: float, resolution: float) -> int:
  """n with c_max = n * resolution; ValueError unless c_max is a whole multiple of it."""
  if not (math.isfinite(resolution) and resolution > 0):
    raise ValueError(f"resolution must be > 0, got {resolution}")
  if not (math.isfinite(c_max) and c_max > 0):
    raise ValueError(f"c_max must be > 0, got {c_max}")
  n = round(c_max / resolution)
  if n < 1 or abs(n * resolution - c_max) > 1e-6 * max(1.0, c_max):
    raise ValueError(f"c_max={c_max:g} must be a whole multiple (>= 1) of resolution="
                     f"{resolution:g}")
  return n


def bisect_compression(fails: Callable[[float], bool], c_max: float,
                       resolution: float) -> Bracket:
  """The largest grid c in [0, c_max] with ``fails(c)`` False, assuming monotonicity.

  Probes c = 0 and c = c_max first (the bracket endpoints), then bisects on grid indices
  until fail and pass are one grid step apart: about 2 + log2(c_max / resolution) calls of
  ``fails``, never twice at the same c.
  """
  n = grid_size(c_max, resolution)
  probes: list[float] = []

  def probe(k: int) -> bool:
    c = grid_point(k, resolution)
    probes.append(c)
    return bool(fails(c))

  if probe(0):
    return Bracket(None, 0.0, tuple(probes))
  if not probe(n):
    return Bracket(grid_point(n, resolution), None, tuple(probes))
  lo, hi = 0, n  # invariant: passes at lo, fails at hi
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if probe(mid):
      hi = mid
    else:
      lo = mid
  return Bracket(grid_point(lo, resolution), grid_point(hi, resolution), tuple(probes))


def monotone_violations(points: Sequence[tuple[float, bool]]) -> int:
  """Pairs c1 < c2 with a failure at c1 but a pass at c2 (0 when the data is monotone)."""
  pts = sorted(set(points))
  return sum(1 for i, (c1, f1) in enumerate(pts) for c2, f2 in pts[i + 1:]
             if c2 > c1 and f1 and not f2)


# ----------------------------------------------------------------------------- flags


def validate_flags() -> dict[str, Any]:
  """Every flag checked before any heavy work; raises ConfigError naming the bad flag."""
  err = cfg_lib.ConfigError
  if FLAGS.dataset not in cfg_lib.DATASETS:
    raise err(f"--dataset={FLAGS.dataset!r} is not valid; expected one of "
              f"{', '.join(cfg_lib.DATASETS)}")
  model = cfg_lib.DEFAULT_MODEL[FLAGS.dataset] if FLAGS.model is None else FLAGS.model
  if FLAGS.factorize_with not in cfg_lib.FACTORIZE_WITH:
    raise err(f"--factorize_with={FLAGS.factorize_with!r} is not valid; expected one of "
              f"{', '.join(cfg_lib.FACTORIZE_WITH)}")

  def choices(name: str, allowed: Sequence[str]) -> list[str]:
    items = cfg_lib.parse_list(getattr(FLAGS, name), str, name)
    for item in items:
      if item not in allowed:
        raise err(f"--{name}: {item!r} is not valid; expected a comma list of "
                  f"{', '.join(allowed)}")
    return items  # parse_list has refused empty and repeated items

  pruners = choices("pruners", cfg_lib.PAPER_PRUNERS)
  heads = choices("heads", HEADS)
  if FLAGS.prune_factors and "head" not in heads:
    raise err("--prune_factors needs the structured head (--heads must include head)")
  searches = choices("searches", SEARCHES)
  res, c_max = FLAGS.resolution, FLAGS.c_max
  if not (math.isfinite(res) and res > 0):
    raise err(f"--resolution={res:g} must be > 0")
  if not (math.isfinite(c_max) and 0 < c_max <= 9):
    raise err(f"--c_max={c_max:g} must be in (0, 9] (density = 10**-c)")
  if res > c_max:
    raise err(f"--resolution={res:g} exceeds --c_max={c_max:g}")
  try:
    grid_size(c_max, res)
  except ValueError:
    raise err(f"--c_max={c_max:g} must be a whole multiple of --resolution={res:g}") from None
  for name in ("train_epochs",):
    if getattr(FLAGS, name) < 1:
      raise err(f"--{name}={getattr(FLAGS, name)} must be >= 1")
  for name in ("mag_pre_epochs", "train_examples", "seed", "monotone_checks"):
    if getattr(FLAGS, name) < 0:
      raise err(f"--{name}={getattr(FLAGS, name)} must be >= 0")
  if FLAGS.prune_rounds is not None and FLAGS.prune_rounds < 1:
    raise err(f"--prune_rounds={FLAGS.prune_rounds} must be >= 1 (leave it out for the "
              "default: 100 for synflow, 1 for the others)")
  # A flag given explicitly that no probe would use is refused, not silently ignored.
  for name, used, why in (("mag_pre_epochs", "mag" in pruners, "--pruners has no mag"),
                          ("train_epochs", "accuracy" in searches,
                           "only the accuracy search trains (--searches)"),
                          ("factorize_with", "head" in heads,
                           "no structured head (--heads has no head)")):
    if FLAGS[name].present and not used:
      raise err(f"--{name}={FLAGS[name].value} has no effect: {why}")
  if FLAGS.out_dir == "":
    raise err("--out_dir is empty")
  out_dir = Path(FLAGS.out_dir or f"runs/collapse/{FLAGS.dataset}")
  if out_dir.exists() and not out_dir.is_dir():
    raise err(f"--out_dir={str(out_dir)!r} exists and is not a folder")
  settings = dict(dataset=FLAGS.dataset, model=model, pruners=pruners, heads=heads,
                  searches=searches, resolution=res, c_max=c_max, out_dir=out_dir)
  # Every probe configuration must be a valid run (model/dataset pairing, batch size, ...).
  for pruner in pruners:
    for head in heads:
      probe_config(settings, pruner, head, c_max, "accuracy")
  return settings


def probe_config(settings: dict[str, Any], pruner: str, head: str, c: float,
                 kind: str) -> cfg_lib.RunConfig:
  """The RunConfig of one probe (validated). Collapse probes train nothing after pruning, so
  their key does not depend on --train_epochs. The dense head has no factors to prune."""
  return cfg_lib.RunConfig(
      dataset=settings["dataset"], model=settings["model"], factorize=head,
      factorize_with=FLAGS.factorize_with, prune_factors=FLAGS.prune_factors and head == "head",
      pruner=pruner,
      compression=c, pre_epochs=FLAGS.mag_pre_epochs if pruner == "mag" else 0,
      post_epochs=FLAGS.train_epochs if kind == "accuracy" else 0,
      prune_rounds=cfg_lib.default_rounds(pruner, FLAGS.prune_rounds),
      batch_size=FLAGS.batch_size, seed=FLAGS.seed,
      train_examples=FLAGS.train_examples).validate()


# ----------------------------------------------------------------------------- probes


class Prober:
  """Runs (or replays from results.jsonl) the probes of one configuration of flags.

  One model, initialisation and compiled Trainer per head; the magnitude pruner's pre-trained
  state per head; pruned masks per (pruner, head, c) for the pair being searched.
  """

  def __init__(self, settings: dict[str, Any], dataset, results: Path,
               log: Callable[[str], None] = logging.info):
    import jax.numpy as jnp
    from bfprune import models, train
    self.settings, self.dataset, self.results, self.log = settings, dataset, results, log
    self.in_shape = models.input_shape(settings["dataset"])
    self.threshold = 2 * 100.0 / dataset.num_classes  # top-1 percent at 2x chance
    self.rows = {(r.get("kind"), r.get("probe_key")): r for r in read_probe_rows(results)}
    self.computed = 0
    self._replayed: set[tuple[str, str]] = set()  # file rows used by this run
    self._heads: dict[str, Any] = {}
    self._pre: dict[str, Any] = {}
    self._masks: dict[tuple[str, str, float], Any] = {}
    self._eval_np = train.make_eval_data(dataset.test_x, dataset.test_y, FLAGS.batch_size)
    self._jnp = jnp

  # -- shared state ---------------------------------------------------------------------
  def _head(self, head: str):
    """(model, variables, trainer, eval data) of a head, built once."""
    if head not in self._heads:
      import jax
      from bfprune import data as data_lib
      from bfprune import train
      from experiments import pipeline
      cfg = probe_config(self.settings, "rand", head, 0.0, "collapse")
      model = pipeline.build_model(cfg, self.dataset.num_classes)
      variables = model.init(jax.random.key(cfg.seed), self._jnp.zeros((1,) + self.in_shape))
      tx = train.adam(cfg.lr)
      augment = data_lib.augment_cifar if cfg.dataset == "cifar10" else None
      trainer = train.Trainer(model, tx, train.make_mesh(), augment=augment,
                              compiler_options=pipeline.compiler_options(
                                  cfg.model, FLAGS.small_matmul_options))
      eval_data = trainer.put_eval(self._eval_np)
      self._heads[head] = (model, variables, trainer, eval_data, tx)
    return self._heads[head]

  def _fit(self, head: str, state, masks, epochs: int, first_epoch: int):
    from bfprune import train
    from experiments import pipeline
    _, _, trainer, _, _ = self._head(head)
    state, history = train.fit(trainer, state, masks, self.dataset.train_x, self.dataset.train_y,
                               epochs=epochs, batch_size=FLAGS.batch_size, seed=FLAGS.seed,
                               first_epoch=first_epoch, log=None,
                               chunk_steps=pipeline.chunk_steps(self.settings["model"]))
    return state, sum(h["epoch_seconds"] for h in history)

  def _start_state(self, pruner: str, head: str):
    """The state pruning starts from: the initialisation, or for 'mag' after pre-training."""
    from bfprune import train
    from bfprune.pruning import masks as masks_lib
    _, variables, _, _, tx = self._head(head)
    cfg = probe_config(self.settings, pruner, head, 0.0, "collapse")
    ones = masks_lib.ones_like(variables["params"], masks_lib.is_kernel_or_twiddle
                               if cfg.prune_factors else masks_lib.is_kernel)
    state = train.init_state(variables, ones, tx)
    if pruner != "mag" or FLAGS.mag_pre_epochs == 0:
      return state, ones
    if head not in self._pre:
      self.log(f"{head_name(head)}: pre-training {FLAGS.mag_pre_epochs} epoch(s) for mag")
      self._pre[head] = self._fit(head, state, ones, FLAGS.mag_pre_epochs, 0)[0]
    return self._pre[head], ones

  def masks(self, pruner: str, head: str, c: float):
    """(masks, start state, prune seconds) at compression c; cached per (pruner, head, c)."""
    key = (pruner, head, c)
    if key not in self._masks:
      from experiments import pipeline
      cfg = probe_config(self.settings, pruner, head, c, "collapse")
      model = self._head(head)[0]
      state, ones = self._start_state(pruner, head)
      t0 = time.perf_counter()
      # c = 0 is density 1: every pruner keeps every weight, no scoring needed.
      masks = ones if c == 0 else pipeline.prune_masks(cfg, model, self.dataset, state, ones,
                                                       self.in_shape)
      self._masks[key] = (masks, state, time.perf_counter() - t0)
    return self._masks[key]

  def clear_masks(self) -> None:
    self._masks.clear()

  # -- probes ---------------------------------------------------------------------------
  def _base_row(self, kind: str, cfg: cfg_lib.RunConfig) -> dict[str, Any]:
    return {"kind": kind, "probe_key": cfg.key(), "dataset": cfg.dataset, "model": cfg.model,
            "factorize": cfg.factorize, "pruner": cfg.pruner, "compression": cfg.compression,
            "target_density": 10.0 ** -cfg.compression, "seed": cfg.seed,
            "pre_epochs": cfg.pre_epochs, "post_epochs": cfg.post_epochs,
            "prune_rounds": cfg.prune_rounds, "batch_size": cfg.batch_size,
            "train_examples": int(len(self.dataset.train_x))}

  def _cached(self, kind: str, cfg: cfg_lib.RunConfig) -> Optional[dict[str, Any]]:
    row = self.rows.get((kind, cfg.key()))
    if row is not None and not row.get("_new"):
      self._replayed.add((kind, cfg.key()))
    return row

  @property
  def reused(self) -> int:
    return len(self._replayed)

  def _store(self, row: dict[str, Any]) -> dict[str, Any]:
    if distributed.is_main():  # every process computes the same row; process 0 writes it
      results_io.append_row(self.results, row)
    self.rows[(row["kind"], row["probe_key"])] = dict(row, _new=True)
    self.computed += 1
    return row

  def collapse(self, pruner: str, head: str, c: float) -> dict[str, Any]:
    """The collapse probe's row: prune at c, then detect collapse (and FLOP density)."""
    cfg = probe_config(self.settings, pruner, head, c, "collapse")
    row = self._cached("collapse", cfg)
    if row is not None:
      return row
    import jax
    from bfprune import metrics
    from bfprune.pruning import masks as masks_lib
    masks, state, prune_s = self.masks(pruner, head, c)
    model = self._head(head)[0]
    summ = metrics.summary(model, {"params": jax.device_get(state.params)}, masks, self.in_shape)
    row = self._base_row("collapse", cfg)
    row.update({
        "density": masks_lib.density(masks), "flop_density": summ["flop_density"],
        "collapsed": bool(summ["collapsed"]), "collapsed_layer": summ["collapsed_layer"],
        "layer_density": {l["name"]: l["density"] for l in summ["layers"] if l["weights"]},
        "prune_seconds": prune_s})
    self.log(f"{pruner} {head_name(head)} c={c:g}: density {row['density']:.3g}, collapsed="
             f"{row['collapsed']}" + (f" ({row['collapsed_layer']})" if row["collapsed"] else ""))
    return self._store(row)

  def accuracy(self, pruner: str, head: str, c: float) -> dict[str, Any]:
    """The accuracy probe's row: prune at c, train --train_epochs, test top-1."""
    cfg = probe_config(self.settings, pruner, head, c, "accuracy")
    row = self._cached("accuracy", cfg)
    if row is not None:
      return row
    from bfprune import train
    col = self.collapse(pruner, head, c)  # also records collapse at this c (monotone check)
    masks, state, prune_s = self.masks(pruner, head, c)
    _, _, trainer, eval_data, _ = self._head(head)
    state, train_s = self._fit(head, train.remask(state, masks), masks, cfg.post_epochs,
                               cfg.pre_epochs)
    final = trainer.evaluate(state, eval_data)
    row = self._base_row("accuracy", cfg)
    row.update({"density": col["density"], "collapsed": col["collapsed"],
                "top1": final["top1"], "top5": final["top5"], "test_loss": final["loss"],
                "threshold_top1": self.threshold, "below_threshold": final["top1"] < self.threshold,
                "prune_seconds": prune_s, "train_seconds": train_s})
    self.log(f"{pruner} {head_name(head)} c={c:g}: top1 {final['top1']:.2f}% after "
             f"{cfg.post_epochs} epoch(s) ({train_s:.1f} s)")
    return self._store(row)


# ----------------------------------------------------------------------------- summary


class Result(NamedTuple):
  pruner: str
  head: str
  search: str
  bracket: Bracket
  violations: int      # monotone violations among every probe of this (pruner, head, kind)
  points: int          # distinct c probed for this (pruner, head, kind): bisection + checks
  detail: str          # collapse: the layer that collapses at first_fail; accuracy: top-1 there
  top1_at_critical: Optional[float]


def check_points(bracket: Bracket, n: int, c_max: float, resolution: float) -> list[float]:
  """Up to ``n`` grid points below ``last_ok`` and ``n`` above ``first_fail`` (within
  [0, c_max], not probed yet): where a non-monotone event would move c* at this resolution."""
  k_max = grid_size(c_max, resolution)
  out = []
  if bracket.last_ok is not None:
    k0 = round(bracket.last_ok / resolution)
    out += [grid_point(k0 - i, resolution) for i in range(1, n + 1) if k0 - i >= 0]
  if bracket.first_fail is not None:
    k1 = round(bracket.first_fail / resolution)
    out += [grid_point(k1 + i, resolution) for i in range(1, n + 1) if k1 + i <= k_max]
  return [c for c in out if c not in bracket.probes]


def search_pair(prober: Prober, pruner: str, head: str, searches: Sequence[str],
                c_max: float, resolution: float, checks: int = 0) -> list[Result]:
  """Runs the requested searches for one (pruner, head) and summarises them; ``checks``
  extra probes each side of every bracket test the monotone assumption (``check_points``)."""
  out = []
  if "collapse" in searches:
    b = bisect_compression(lambda c: prober.collapse(pruner, head, c)["collapsed"], c_max,
                           resolution)
    for c in check_points(b, checks, c_max, resolution):
      prober.collapse(pruner, head, c)
    fail = prober.collapse(pruner, head, b.first_fail) if b.first_fail is not None else None
    out.append(("collapse", b, (fail or {}).get("collapsed_layer") or "", None))
  if "accuracy" in searches:
    b = bisect_compression(lambda c: prober.accuracy(pruner, head, c)["below_threshold"], c_max,
                           resolution)
    for c in check_points(b, checks, c_max, resolution):
      prober.accuracy(pruner, head, c)
    ok = prober.accuracy(pruner, head, b.last_ok) if b.last_ok is not None else None
    fail = prober.accuracy(pruner, head, b.first_fail) if b.first_fail is not None else None
    detail = f"top1 {fail['top1']:.1f}% at c={b.first_fail:g}" if fail else ""
    out.append(("accuracy", b, detail, ok["top1"] if ok else None))
  # The monotone check uses every probe of this pair in this configuration: both searches'
  # bisections, their check points, and rows left by earlier runs (e.g. other resolutions).
  points = {"collapse": [], "accuracy": []}
  for (kind, key), r in prober.rows.items():
    if (r.get("pruner"), r.get("factorize")) != (pruner, head):
      continue
    if key == probe_config(prober.settings, pruner, head, r["compression"], kind).key():
      points[kind].append((r["compression"],
                           r["collapsed"] if kind == "collapse" else r["below_threshold"]))
  prober.clear_masks()
  return [Result(pruner, head, s, b, monotone_violations(points[s]),
                 len({c for c, _ in points[s]}), d, t) for s, b, d, t in out]


def _c_text(c: Optional[float], censored: bool = False) -> str:
  if c is None:
    return "—"
  return (">= " if censored else "") + f"{c:g}"


def _d_text(c: Optional[float], censored: bool = False) -> str:
  return "—" if c is None else ("<= " if censored else "") + f"{10.0 ** -c:.3g}"


CSV_FIELDS = ("pruner", "head", "search", "status", "c_star", "density_star", "c_fail",
              "density_fail", "probes", "checked_points", "monotone_violations", "detail",
              "top1_at_c_star")


def csv_rows(results: Sequence[Result]) -> list[dict[str, Any]]:
  return [{
      "pruner": r.pruner, "head": r.head, "search": r.search, "status": r.bracket.status,
      "c_star": r.bracket.last_ok, "density_star": None if r.bracket.last_ok is None
      else 10.0 ** -r.bracket.last_ok,
      "c_fail": r.bracket.first_fail, "density_fail": None if r.bracket.first_fail is None
      else 10.0 ** -r.bracket.first_fail,
      "probes": len(r.bracket.probes), "checked_points": r.points,
      "monotone_violations": r.violations, "detail": r.detail,
      "top1_at_c_star": r.top1_at_critical} for r in results]


def to_csv(results: Sequence[Result]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
  w.writeheader()
  for row in csv_rows(results):
    w.writerow({k: "" if v is None else v for k, v in row.items()})
  return buf.getvalue()


def to_markdown(results: Sequence[Result], settings: dict[str, Any], threshold: float) -> str:
  by = {(r.pruner, r.head, r.search): r for r in results}
  lines = [
      f"# Critical compression — {settings['model'].upper()} / {settings['dataset']}",
      "",
      f"c* = largest compression (density 10^-c*) on the grid k·{settings['resolution']:g} in "
      f"[0, {settings['c_max']:g}] before the network collapses (empty layer or no input-output "
      f"path), resp. before test top-1 after {FLAGS.train_epochs} training epoch(s) falls below "
      f"2× chance ({threshold:g}%). Found by bisection, assuming monotone failure in c; "
      f"{FLAGS.monotone_checks} extra probe(s) each side of every bracket; 'viol.' counts "
      f"probe pairs (c1 < c2, failing at c1, fine at c2) contradicting that assumption. "
      f"Pruning at initialisation "
      f"(mag: after {FLAGS.mag_pre_epochs} dense epoch(s)); seed {FLAGS.seed}; "
      f"{'all' if not FLAGS.train_examples else FLAGS.train_examples} training examples; "
      f"structured head: {FLAGS.factorize_with}, "
      f"{'its factors pruned too' if FLAGS.prune_factors else 'factors not prunable'}.",
      "",
      "| pruner | head | c* collapse | density | first collapse | c* accuracy | density | "
      "top-1 at c* | first below 2× chance | probes | viol. |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for pruner in settings["pruners"]:
    for head in settings["heads"]:
      cells = [pruner, head_name(head)]
      probes, viol = 0, 0
      for s in ("collapse", "accuracy"):
        r = by.get((pruner, head, s))
        if r is None:
          cells += ["n/a"] * (3 if s == "collapse" else 4)
          continue
        b = r.bracket
        probes += r.points
        viol += r.violations
        censored = b.status == "censored"
        cells += [_c_text(b.last_ok, censored), _d_text(b.last_ok, censored)]
        if s == "collapse":
          cells.append("none up to c_max" if b.first_fail is None else
                       f"c={b.first_fail:g} ({r.detail or 'disconnected'})")
        else:
          cells.append("—" if r.top1_at_critical is None else f"{r.top1_at_critical:.1f}%")
          cells.append("none up to c_max" if b.first_fail is None else r.detail)
      cells += [str(probes), str(viol)]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def figure(results: Sequence[Result], settings: dict[str, Any], threshold: float):
  """Two panels (collapse, accuracy): per pruner, c* of the dense head beside the butterfly
  head; the whisker spans the bracket [c*, c* + resolution]; hatched bars are censored (>= c_max),
  an 'x' at 0 marks a net already failing at c = 0."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.lines  # noqa: F401  (legend handles)
  import matplotlib.patches  # noqa: F401
  import matplotlib.pyplot as plt
  import numpy as np
  searches = [s for s in SEARCHES if s in settings["searches"]]
  fig, axes = plt.subplots(1, len(searches), figsize=(5.2 * len(searches), 4.2), squeeze=False)
  by = {(r.pruner, r.head, r.search): r for r in results}
  pruners, heads = settings["pruners"], settings["heads"]
  width = 0.8 / len(heads)
  colours = {"none": "tab:blue", "head": "tab:orange"}
  titles = {"collapse": "layer collapse",
            "accuracy": f"top-1 < 2× chance ({threshold:g}%) after {FLAGS.train_epochs} ep."}
  for ax, s in zip(axes[0], searches):
    for j, head in enumerate(heads):
      xs = np.arange(len(pruners)) + (j - (len(heads) - 1) / 2) * width
      for x, pruner in zip(xs, pruners):
        r = by.get((pruner, head, s))
        if r is None:
          continue
        b = r.bracket
        if b.status == "fails_at_0":
          ax.scatter([x], [0], marker="x", color=colours[head], s=60, zorder=3)
          continue
        ax.bar(x, b.last_ok, width * 0.9, color=colours[head],
               hatch="//" if b.status == "censored" else None, edgecolor="white")
        if b.first_fail is not None:
          ax.errorbar(x, b.last_ok, yerr=[[0], [b.first_fail - b.last_ok]], color="black",
                      capsize=3, linewidth=1)
        else:
          ax.text(x, b.last_ok, "≥", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(np.arange(len(pruners)))
    ax.set_xticklabels(pruners)
    ax.set_ylim(0, settings["c_max"] * 1.08)
    ax.set_ylabel("critical compression c*  (density 10^-c*)")
    ax.set_title(titles[s])
    ax.grid(True, axis="y", alpha=0.3)
  handles = [matplotlib.patches.Patch(color=colours[h], label=head_name(h)) for h in heads]
  handles.append(matplotlib.lines.Line2D([], [], color="black", linewidth=1,
                                         label="whisker: up to first failing c"))
  axes[0][-1].legend(handles=handles, loc="upper right", fontsize=8)
  fig.suptitle(f"Critical compression, {settings['model'].upper()} / {settings['dataset']} "
               f"(resolution {settings['resolution']:g})", fontsize=10)
  fig.tight_layout()
  return fig


def write_outputs(results: Sequence[Result], settings: dict[str, Any], threshold: float) -> None:
  out = settings["out_dir"]
  (out / "collapse.md").write_text(to_markdown(results, settings, threshold))
  (out / "collapse.csv").write_text(to_csv(results))
  fig = figure(results, settings, threshold)
  fig.savefig(out / "collapse.png", dpi=120)


# ----------------------------------------------------------------------------- dry run


class _NotStored(Exception):
  """The replay needs a probe that results.jsonl does not hold."""

  def __init__(self, c: float):
    super().__init__(c)
    self.c = c


class _Replay:
  """Stands in for Prober in ``search_pair``: answers probes from stored rows only and raises
  _NotStored at the first one missing, so a search replays exactly as far as the file goes."""

  def __init__(self, settings: dict[str, Any], rows: Sequence[dict[str, Any]]):
    self.settings = settings
    self.rows = {(r.get("kind"), r.get("probe_key")): r for r in rows}

  def _get(self, kind: str, pruner: str, head: str, c: float) -> dict[str, Any]:
    row = self.rows.get((kind, probe_config(self.settings, pruner, head, c, kind).key()))
    if row is None:
      raise _NotStored(c)
    return row

  def collapse(self, pruner: str, head: str, c: float) -> dict[str, Any]:
    return self._get("collapse", pruner, head, c)

  def accuracy(self, pruner: str, head: str, c: float) -> dict[str, Any]:
    return self._get("accuracy", pruner, head, c)

  def clear_masks(self) -> None:
    pass


def dry_run(settings: dict[str, Any], rows: Sequence[dict[str, Any]], results: Path) -> None:
  """Prints how many searches the flags ask for, then one line per search: finished (its c*)
  or the next probe it needs, and how many of its probes results.jsonl holds."""
  replay = _Replay(settings, rows)
  lines, finished = [], 0
  for pruner in settings["pruners"]:
    for head in settings["heads"]:
      for search in settings["searches"]:
        stored = sum(1 for (kind, key), r in replay.rows.items() if kind == search
                     and (r.get("pruner"), r.get("factorize")) == (pruner, head)
                     and isinstance(r.get("compression"), (int, float))
                     and key == probe_config(settings, pruner, head, r["compression"],
                                             kind).key())
        try:
          (res,) = search_pair(replay, pruner, head, [search], settings["c_max"],
                               settings["resolution"], FLAGS.monotone_checks)
          state = f"finished  c* = {_c_text(res.bracket.last_ok)} ({res.bracket.status})"
          finished += 1
        except _NotStored as e:
          state = f"to do     next probe c = {e.c:g}"
        lines.append(f"{pruner:8s} {head_name(head):28s} {search:9s} {state}; "
                     f"{stored} probe(s) stored")
  def count(n: int, word: str, plural: str = "s") -> str:
    return f"{n} {word}{plural if n != 1 else ''}"

  n = len(lines)
  print(f"collapse: {count(n, 'search', 'es')} ({count(len(settings['pruners']), 'pruner')} x "
        f"{count(len(settings['heads']), 'head')} x "
        f"{count(len(settings['searches']), 'search', 'es')}, c in [0, {settings['c_max']:g}] "
        f"step {settings['resolution']:g}): {finished} finished in {results}, {n - finished} to "
        "do; dry run, nothing computed or written")
  print("\n".join(lines))


# ----------------------------------------------------------------------------- main


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    settings = validate_flags()
    dist = distributed.validate_flags()
    rows = read_probe_rows(settings["out_dir"] / RESULTS)
  except (cfg_lib.ConfigError, results_io.ResultsError) as e:
    sys.exit(f"collapse.py: error: {e}")
  if FLAGS.dry_run:
    dry_run(settings, rows, settings["out_dir"] / RESULTS)
    return

  cpu_flags.apply_keep_freed_memory()  # before the first computation
  distributed.initialize(dist)  # heavy imports after validation
  import jax
  if FLAGS.batch_size % jax.device_count():
    sys.exit(f"collapse.py: error: --batch_size={FLAGS.batch_size} is not divisible by the "
             f"{jax.device_count()} devices the batch is split over")
  lead = distributed.is_main()
  if not lead:  # process 0 logs and writes; the others compute alongside
    logging.set_verbosity(logging.WARNING)
  from bfprune import data as data_lib
  from experiments import pipeline
  try:
    pipeline.enable_compilation_cache(FLAGS.compilation_cache)
  except pipeline.CompilationCacheError as e:
    sys.exit(f"collapse.py: error: {e}")
  try:
    dataset = pipeline.load_training_data(settings["dataset"], FLAGS.data_dir,
                                          FLAGS.train_examples, FLAGS.batch_size)
    for pruner in set(cfg_lib.DATA_PRUNERS) & set(settings["pruners"]):
      per_class = probe_config(settings, pruner, "none", 0.0, "collapse").prune_per_class
      pipeline.check_prune_examples(dataset, per_class, f"--train_examples={FLAGS.train_examples}",
                                    "raise it, or leave snip and grasp out of --pruners")
  except data_lib.DataError as e:
    sys.exit(f"collapse.py: data error: {e}")
  except pipeline.DataSizeError as e:
    sys.exit(f"collapse.py: error: {e}")

  out = settings["out_dir"]
  if lead:
    out.mkdir(parents=True, exist_ok=True)
  try:
    prober = Prober(settings, dataset, out / RESULTS)
  except results_io.ResultsError as e:  # changed since it was checked above
    sys.exit(f"collapse.py: error: {e}")
  results: list[Result] = []
  t0 = time.perf_counter()
  for pruner in settings["pruners"]:
    for head in settings["heads"]:
      for r in search_pair(prober, pruner, head, settings["searches"], settings["c_max"],
                           settings["resolution"], FLAGS.monotone_checks):
        results.append(r)
        logging.info("%s %s %s: c* = %s (%s, %d probes, %d monotone violations)", pruner,
                     head_name(head), r.search, r.bracket.last_ok, r.bracket.status,
                     len(r.bracket.probes), r.violations)
  if not lead:
    return
  write_outputs(results, settings, prober.threshold)
  logging.info("%d probes computed, %d reused from %s; %.0f s; wrote %s/collapse.{md,csv,png}",
               prober.computed, prober.reused, out / RESULTS, time.perf_counter() - t0, out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
