"""Iterative pruning: density schedules, ``prune()`` and named score functions.

``prune`` alternates scoring the currently masked network and keeping the top scores, over
``rounds`` rounds whose densities follow an exponential (d^(r/R)) or linear schedule. A
``score_fn(params, masks) -> scores`` closes over whatever the pruner needs (apply_fn, data,
key); ``make_score_fn`` builds one for each of the study's pruners.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax

from bfprune.pruning import scores as S
from bfprune.pruning.masks import (
    PyTree, SCOPES, _check_density, check_not_empty, count_kept, count_prunable,
    masks_from_scores, ones_like)

ScoreFn = Callable[[PyTree, PyTree], PyTree]

SCHEDULES = ("exponential", "linear")
PRUNERS = ("rand", "mag", "snip", "grasp", "synflow")
PRUNER_ALIASES = {"random": "rand", "magnitude": "mag"}


def density_schedule(density: float, rounds: int, kind: str = "exponential",
                     start: float = 1.0) -> list[float]:
  """Target density after each of ``rounds`` rounds, ending exactly at ``density``.

  exponential: start · (density/start)^(r/R); linear: start - (start - density) · r/R, for
  r = 1..R. With start = 1 (nothing pruned yet) these are d^(r/R) and 1 - (1-d)·r/R.
  """
  d = _check_density(density)
  s = _check_density(start)
  if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
    raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
  if kind not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
  if d > s:
    raise ValueError(f"target density {d} exceeds the starting density {s}: pruning never "
                     "re-grows weights")
  if kind == "exponential":
    if d == 0.0 and rounds > 1:
      raise ValueError("an exponential schedule cannot reach density 0; use 'linear'")
    out = [s * (d / s) ** (r / rounds) if s > 0 else 0.0 for r in range(1, rounds + 1)]
  else:
    out = [s - (s - d) * r / rounds for r in range(1, rounds + 1)]
  out[-1] = d  # exact, whatever the float rounding above
  return out


def default_rounds(pruner_name: str) -> int:
  """The study's number of pruning rounds: 100 for SynFlow, 1 for the others."""
  return 100 if pruner_name_of(pruner_name) == "synflow" else 1


def pruner_name_of(name: str) -> str:
  """The canonical pruner name (``PRUNERS``) of ``name`` or of an alias (``PRUNER_ALIASES``)."""
  canonical = PRUNER_ALIASES.get(name, name)
  if canonical not in PRUNERS:
    aliases = ", ".join(f"{a} = {c}" for a, c in PRUNER_ALIASES.items())
    raise ValueError(f"unknown pruner {name!r}; expected one of {', '.join(PRUNERS)} "
                     f"(aliases: {aliases})")
  return canonical


def make_score_fn(name: str, apply_fn: S.ApplyFn | None = None, batch: S.Batch | None = None,
                  input_shape: Sequence[int] | None = None, key: jax.Array | None = None,
                  temperature: float = 200.0) -> ScoreFn:
  """A ``score_fn(params, masks) -> scores`` for one of 'rand', 'mag', 'snip', 'grasp', 'synflow'.

  'random' and 'magnitude' are accepted for 'rand' and 'mag'; any other name raises
  ValueError listing the names. ``scores`` mirrors the params, ``None`` where ``masks`` is
  ``None`` (leaves that are not prunable).

  Needs: rand -> ``key``; snip, grasp -> ``apply_fn`` and ``batch`` (x, y); synflow ->
  ``apply_fn`` and ``input_shape`` (one example, no batch dim). ``apply_fn`` must be the
  caller's deterministic forward. The jitted kernels compile once per ``apply_fn`` object, so
  keep using the returned function (or the same apply_fn) across rounds and calls.

  Rand draws fresh scores each round from ``fold_in(key, number of weights still kept)``: a
  pure function of the seed and the masks (so the same seed gives the same masks) that
  changes from round to round as the masks shrink.
  """
  name = pruner_name_of(name)

  def need(**kw):
    missing = [k for k, v in kw.items() if v is None]
    if missing:
      raise ValueError(f"pruner {name!r} needs {', '.join(missing)}")

  if name == "rand":
    need(key=key)
    return lambda params, masks: S.random_scores(
        jax.random.fold_in(key, count_kept(masks)), params, masks)
  if name == "mag":
    return S.magnitude_scores
  if name == "snip":
    need(apply_fn=apply_fn, batch=batch)
    return lambda params, masks: S.snip_scores(apply_fn, params, masks, batch)
  if name == "grasp":
    need(apply_fn=apply_fn, batch=batch)
    return lambda params, masks: S.grasp_scores(apply_fn, params, masks, batch, temperature)
  need(apply_fn=apply_fn, input_shape=input_shape)
  shape = tuple(input_shape)
  return lambda params, masks: S.synflow_scores(apply_fn, params, masks, shape)


def prune(score_fn: ScoreFn, params: PyTree, masks: PyTree | None, density: float,
          rounds: int = 1, schedule: str = "exponential", scope: str = "global",
          allow_empty: bool = False) -> PyTree:
  """Prunes to ``density`` in ``rounds`` rounds; returns the final masks.

  ``masks`` (and the result) mirror the params: bool arrays (True = kept) on prunable leaves,
  ``None`` on leaves that are never pruned; ``masks=None`` means ``ones_like(params)`` (every
  kernel prunable). ``density`` must be > 0 unless ``allow_empty`` (see ``masks_from_scores``).

  Each round scores the network masked by the previous round's masks and keeps the top
  ``round(d_r · N)`` weights (``masks_from_scores``), d_r following ``density_schedule``
  from the masks' current density (1 when ``masks`` is None, i.e. ``ones_like(params)``,
  kernels prunable) to ``density``. Densities count all prunable weights; in 'local' scope
  the schedule applies to every tensor.
  """
  check_not_empty(density, allow_empty)
  if scope not in SCOPES:
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
  if masks is None:
    masks = ones_like(params)
  n = count_prunable(masks)
  if n == 0:
    raise ValueError("no prunable weights: every mask leaf is None")
  start = count_kept(masks) / n
  targets = density_schedule(density, rounds, schedule, start=min(1.0, start))
  for d in targets:
    masks = masks_from_scores(score_fn(params, masks), d, scope, masks, allow_empty=allow_empty)
  return masks

