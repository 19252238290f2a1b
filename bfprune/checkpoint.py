"""Orbax save / restore of a training run's whole state, for runs that resume after a kill.

A checkpoint holds a pytree (e.g. ``{"state": TrainState, "masks": masks}``) and a small JSON
dict of metadata (phase, epochs done, history). The data order and dropout / augmentation keys
are pure functions of (seed, epoch, step), so the epoch counter and ``state.step`` restore them
exactly. Orbax writes into a temporary directory and renames it when complete, so a kill at
any moment leaves the previous checkpoint intact.

A ``train.TrainState`` is saved whole, its optimizer state included: that state is
``optim.MaskedState(inner_state, masks)``, so the masks the optimizer keeps come back with it.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

# Masks use None for unprunable leaves; orbax stores neither None nor empty arrays, so a
# one-byte placeholder stands in (decoded against the target structure).


def _encode_none(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: np.zeros((1,), np.int8) if x is None else x, tree,
                      is_leaf=lambda x: x is None)


def _decode_none(tree: PyTree, target: PyTree) -> PyTree:
  return jax.tree.map(lambda t, x: None if t is None else x, target, tree,
                      is_leaf=lambda x: x is None)


class CheckpointMismatchError(ValueError):
  """A checkpoint's tree does not have the structure of the state it is restored into."""


class RunCheckpointer:
  """Keeps the latest checkpoint of one run in ``directory`` (one step number per save)."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 1):
    self._dir = os.path.abspath(os.fspath(directory))
    self._mngr = ocp.CheckpointManager(
        self._dir, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  @property
  def directory(self) -> str:
    return self._dir

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def save(self, step: int, tree: PyTree, meta: dict) -> None:
    """Saves ``tree`` (arrays) and ``meta`` (JSON-serialisable) as ``step``; blocks until done."""
    self._mngr.save(step, args=ocp.args.Composite(
        tree=ocp.args.StandardSave(_encode_none(jax.device_get(tree))),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._mngr.wait_until_finished()

  def restore(self, target: PyTree, step: Optional[int] = None) -> tuple[PyTree, dict]:
    """Restores (tree, meta) of ``step`` (default: latest) with the structure of ``target``."""
    step = self._mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self._dir}")
    abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype) if
                            hasattr(x, "shape") else x, _encode_none(jax.device_get(target)))
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          tree=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except ValueError as e:
      if "do not match" not in str(e):
        raise
      where = " ".join(str(e).split("\n")[1:3]).strip()
      raise CheckpointMismatchError(
          f"checkpoint {self._dir} (step {step}) does not fit this run's state ({where}); it was "
          "written by another version of bfprune or another configuration: delete that "
          "directory to start the run afresh") from None
    return _decode_none(out["tree"], target), dict(out["meta"])

  def close(self) -> None:
    self._mngr.close()
