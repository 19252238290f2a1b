"""One run's configuration: validated before any work starts, and keyed for resuming."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Optional

DATASETS = ("mnist", "cifar10")
MODELS = ("fc", "vgg16")
DEFAULT_MODEL = {"mnist": "fc", "cifar10": "vgg16"}
FACTORIZE = ("none", "head", "all")
FACTORIZE_WITH = ("butterfly", "kmatrix", "monarch")
PRUNERS = ("none", "rand", "mag", "snip", "grasp", "synflow")
SCHEDULES = ("exponential", "linear")
SCOPES = ("global", "local")
MAG_PRE_EPOCHS = 10
PAPER_PRUNERS = ("rand", "mag", "snip", "grasp", "synflow")
DATA_PRUNERS = ("snip", "grasp")  # the pruners that score with (class-balanced) examples
PAPER_COMPRESSIONS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def _paper_cells() -> list[tuple[str, str, float]]:
  """(factorize, pruner, compression): the study's grid, plus unpruned dense / butterfly-head
  baselines and the all-butterfly/K-matrix model without pruning."""
  cells = [(f, p, c) for f in ("none", "head") for p in PAPER_PRUNERS for c in PAPER_COMPRESSIONS]
  return cells + [("none", "none", 0.0), ("head", "none", 0.0), ("all", "none", 0.0)]


GRIDS = {
    "paper_mnist": {"dataset": "mnist", "model": "fc", "cells": _paper_cells()},
    "paper_cifar10": {"dataset": "cifar10", "model": "vgg16", "cells": _paper_cells()},
}  # the study pre-trains 10 epochs before magnitude pruning

# What a grid sets: giving one of these flags together with --grid is an error.
GRID_FLAGS = ("dataset", "model", "pruner", "compression", "factorize")
FACTORIZE_NAMES = {"none": "dense head", "head": "butterfly head", "all": "all layers butterfly"}


def _unique(items) -> list:
  return list(dict.fromkeys(items))


def describe_grid(name: str) -> str:
  """One sentence saying what a grid runs and how many runs it is, computed from GRIDS,
  e.g. 'paper_mnist (mnist, fc): 5 pruners (...) x 6 compressions (...) x {dense head,
  butterfly head} + 3 unpruned (...) = 63 runs per seed'."""
  grid = GRIDS[name]
  cells = grid["cells"]
  pruned = [cell for cell in cells if cell[1] != "none"]
  fs, ps, cs = (_unique(cell[i] for cell in pruned) for i in range(3))
  if len(pruned) == len(fs) * len(ps) * len(cs) == len(set(pruned)):
    what = (f"{len(ps)} pruners ({', '.join(ps)}) x {len(cs)} compressions "
            f"({', '.join(f'{c:g}' for c in cs)}) x "
            f"{{{', '.join(FACTORIZE_NAMES[f] for f in fs)}}}")
  else:  # not a full product: say how many
    what = f"{len(pruned)} pruned runs"
  unpruned = [FACTORIZE_NAMES[f] for f, p, _ in cells if p == "none"]
  if unpruned:
    what += f" + {len(unpruned)} unpruned ({', '.join(unpruned)})"
  return f"{name} ({grid['dataset']}, {grid['model']}): {what} = {len(cells)} runs per seed"


class ConfigError(ValueError):
  """A configuration that cannot run; the message names the offending setting."""


_KEY_LATER_FIELDS = {"test_examples": 0}


@dataclasses.dataclass(frozen=True)
class RunConfig:
  dataset: str = "mnist"
  model: str = "fc"
  factorize: str = "none"
  factorize_with: str = "butterfly"  # the structured dense layer used by --factorize
  prune_factors: bool = False  # twiddles / Monarch blocks are prunable like kernels
  pruner: str = "none"
  compression: float = 1.0
  pre_epochs: int = 0
  post_epochs: int = 50
  prune_rounds: int = 1
  prune_schedule: str = "exponential"
  prune_scope: str = "global"
  prune_per_class: int = 10
  batch_size: int = 256
  lr: float = 1e-3
  dropout: float = 0.1
  batch_norm: bool = False
  seed: int = 0
  train_examples: int = 0  # 0: the whole training split; else its first n (quick / reduced runs)
  test_examples: int = 0  # 0: the whole test split; else its first n (quick checks)

  @property
  def density(self) -> float:
    return 1.0 if self.pruner == "none" else 10.0 ** (-self.compression)

  def key(self) -> str:
    """A stable id derived from the full configuration (same config => same key). Fields added
    after results were committed (``_KEY_LATER_FIELDS``) count only when not at their default,
    so the keys of existing rows stay valid."""
    fields = dataclasses.asdict(self)
    for name, default in _KEY_LATER_FIELDS.items():
      if fields[name] == default:
        del fields[name]
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

  def validate(self) -> "RunConfig":
    """Raises ConfigError with one clear line for anything that cannot run."""
    def one_of(name, value, choices):
      if value not in choices:
        raise ConfigError(f"--{name}={value!r} is not valid; expected one of {', '.join(choices)}")
    one_of("dataset", self.dataset, DATASETS)
    one_of("model", self.model, MODELS)
    one_of("factorize", self.factorize, FACTORIZE)
    one_of("factorize_with", self.factorize_with, FACTORIZE_WITH)
    one_of("pruner", self.pruner, PRUNERS)
    one_of("prune_schedule", self.prune_schedule, SCHEDULES)
    one_of("prune_scope", self.prune_scope, SCOPES)
    if self.model == "vgg16" and self.dataset != "cifar10":
      raise ConfigError(f"--model=vgg16 needs 32x32 inputs (--dataset=cifar10), got "
                        f"--dataset={self.dataset}")
    if self.batch_norm and self.model != "vgg16":
      raise ConfigError(f"--batch_norm needs --model=vgg16 (the {self.model.upper()} has no "
                        f"BatchNorm); the model here is {self.model} (--dataset={self.dataset})")
    if not 0 <= self.compression <= 9:
      raise ConfigError(f"--compression={self.compression} must be in [0, 9] (density = 10**-c)")
    for name in ("pre_epochs", "post_epochs"):
      if getattr(self, name) < 0:
        raise ConfigError(f"--{name}={getattr(self, name)} must be >= 0")
    if self.prune_rounds < 1:
      raise ConfigError(f"--prune_rounds={self.prune_rounds} must be >= 1")
    if self.prune_per_class < 1:
      raise ConfigError(f"--prune_per_class={self.prune_per_class} must be >= 1")
    if self.train_examples < 0:
      raise ConfigError(f"--train_examples={self.train_examples} must be >= 0 (0 = all)")
    if self.test_examples < 0:
      raise ConfigError(f"--test_examples={self.test_examples} must be >= 0 (0 = all)")
    if self.batch_size < 1:
      raise ConfigError(f"--batch_size={self.batch_size} must be >= 1")
    if not self.lr > 0:
      raise ConfigError(f"--lr={self.lr} must be > 0")
    if not 0 <= self.dropout < 1:
      raise ConfigError(f"--dropout={self.dropout} must be in [0, 1)")
    if (self.factorize == "all" and self.model == "fc" and self.pruner != "none"
        and not self.prune_factors):
      raise ConfigError(f"--factorize=all leaves the FC with no dense kernel to prune; "
                        f"use --pruner=none or --prune_factors (got --pruner={self.pruner})")
    if self.prune_factors and self.factorize == "none":
      raise ConfigError("--prune_factors needs structured layers (--factorize=head or all)")
    if self.pruner == "none" and self.pre_epochs:
      raise ConfigError("--pre_epochs only makes sense with a pruner (they train before pruning)")
    return self


def parse_list(text: str, cast=str, name: str = "value") -> list:
  """Splits a comma list, casting each item; a clear ConfigError on an empty list, an empty
  item (``1,,2``, a trailing comma), an item that does not cast, or an item given twice."""
  text = str(text)
  if not text.strip():
    raise ConfigError(f"--{name} is empty")
  out = []
  for t in (t.strip() for t in text.split(",")):
    if not t:
      raise ConfigError(f"--{name}={text!r} has an empty item (two commas in a row, or one at "
                        "an end)")
    try:
      value = cast(t)
    except ValueError:
      raise ConfigError(f"--{name}: {t!r} is not a valid {cast.__name__}") from None
    if value in out:
      raise ConfigError(f"--{name}={text!r} lists {t!r} twice")
    out.append(value)
  return out


def default_pre_epochs(pruner: str, pre_epochs: Optional[int]) -> int:
  """None (flag not given) means the study's default: 10 for magnitude pruning, 0 otherwise.
  A given value is returned as is (RunConfig.validate refuses a negative one)."""
  if pre_epochs is None:
    return MAG_PRE_EPOCHS if pruner == "mag" else 0
  return pre_epochs


def default_rounds(pruner: str, rounds: Optional[int]) -> int:
  """None (flag not given) means the study's default: SynFlow 100 rounds, the others 1.
  A given value is returned as is (RunConfig.validate refuses one below 1).

  The same rule as the library's ``bfprune.pruning.schedule.default_rounds``, which is not
  called here: importing it imports jax (~3 s), and flags are validated before that so that a
  bad one fails at once; tests/test_sweep.py checks that the two agree for every pruner.
  """
  if rounds is None:
    return 100 if pruner == "synflow" else 1
  return rounds
