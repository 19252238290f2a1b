"""One run of the study: config -> data -> model -> prune -> train -> evaluate -> results row.

Composes the library's pieces; all experiment plumbing lives here, none in ``bfprune``.
"""
from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bfprune import data as data_lib
from bfprune import checkpoint, metrics, models, train
from bfprune.pruning import masks as masks_lib
from bfprune.pruning import schedule
from bfprune.structured import layers, monarch

from experiments.config import RunConfig

Log = Callable[[str], None]


# --factorize_with -> (head / rectangular dense layer, body dense layer for --factorize=all).
STRUCTURED_DENSE = {
    "butterfly": (layers.ButterflyDense, layers.FactorizedDense),  # K-matrix where square
    "kmatrix": (layers.KMatrixDense, layers.KMatrixDense),
    "monarch": (monarch.MonarchDense, monarch.MonarchDense),
}


def build_model(cfg: RunConfig, num_classes: int = 10):
  """The model of ``cfg`` with dense, butterfly, K-matrix or Monarch layers plugged in."""
  head_layer, body_layer = STRUCTURED_DENSE[cfg.factorize_with]
  kw = {"head": head_layer} if cfg.factorize in ("head", "all") else {}
  if cfg.model == "fc":
    if cfg.factorize == "all":
      kw["dense"] = body_layer
    return models.FC(num_classes=num_classes, dropout_rate=cfg.dropout, **kw)
  if cfg.factorize == "all":
    kw["conv"] = layers.KOPS2D
  return models.VGG16(num_classes=num_classes, dropout_rate=cfg.dropout,
                      batch_norm=cfg.batch_norm, **kw)


def timed_evaluation(trainer: train.Trainer, state: train.TrainState,
                     eval_data: train.EvalData, repeats: int = 5) -> tuple[dict, float]:
  """Test metrics and the median wall time of a jitted, warmed-up pass over the whole split."""
  metrics_ = trainer.evaluate(state, eval_data)  # also compiles and warms up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    trainer.evaluate(state, eval_data)
    times.append(time.perf_counter() - t0)
  return metrics_, statistics.median(times)


def prune_masks(cfg: RunConfig, model, dataset: data_lib.Dataset, state: train.TrainState,
                masks, in_shape: tuple[int, ...]):
  """The masks of ``cfg.pruner`` at ``cfg.density``, scored on the current (masked) network."""
  stats = state.batch_stats
  def apply_fn(p, x):  # deterministic forward for scoring: no dropout, norms in inference mode
    return model.apply({"params": p, "batch_stats": stats} if stats else {"params": p}, x,
                       train=False)
  idx = data_lib.class_balanced_sample(dataset.train_y, cfg.prune_per_class, cfg.seed)
  score_fn = schedule.make_score_fn(
      cfg.pruner, apply_fn, batch=(jnp.asarray(dataset.train_x[idx]),
                                   jnp.asarray(dataset.train_y[idx])),
      input_shape=in_shape, key=jax.random.key(cfg.seed))
  return schedule.prune(score_fn, jax.device_get(state.params), masks, cfg.density,
                        rounds=cfg.prune_rounds, schedule=cfg.prune_schedule,
                        scope=cfg.prune_scope)


def run_one(cfg: RunConfig, dataset: data_lib.Dataset, log: Log = print,
            history_log: Optional[Log] = None,
            ckpt_dir: Optional[str] = None) -> dict[str, Any]:
  """Runs one configuration end to end and returns its results row (JSON-serialisable).

  With ``ckpt_dir`` the run checkpoints after every epoch and resumes from the latest
  checkpoint found there.
  """
  cfg.validate()
  in_shape = models.input_shape(cfg.dataset)
  model = build_model(cfg, dataset.num_classes)
  variables = model.init(jax.random.key(cfg.seed), jnp.zeros((1,) + in_shape))
  masks = masks_lib.ones_like(variables["params"], masks_lib.is_kernel_or_twiddle
                              if cfg.prune_factors else masks_lib.is_kernel)

  tx = train.adam(cfg.lr)
  augment = data_lib.augment_cifar if cfg.dataset == "cifar10" else None
  trainer = train.Trainer(model, tx, train.make_mesh(), augment=augment)
  state = train.init_state(variables, masks, tx)
  eval_data = trainer.put(train.EvalData(*(jnp.asarray(a) for a in train.make_eval_data(
      dataset.test_x, dataset.test_y, cfg.batch_size))))
  fit = functools.partial(train.fit, trainer, train_x=dataset.train_x, train_y=dataset.train_y,
                          batch_size=cfg.batch_size, seed=cfg.seed, eval_data=eval_data,
                          log=history_log, chunk_steps=64 if cfg.model == "fc" else 1)

  # Resumable phases: "pre" (training before pruning), then "post" (after pruning). The
  # checkpoint is written after every epoch and right after pruning; data order and keys are
  # functions of (seed, epoch, step), so a resumed run reproduces an uninterrupted one.
  meta = {"phase": "pre", "epochs_done": 0, "history": [], "prune_seconds": 0.0,
          "train_seconds": 0.0}
  ckpt = checkpoint.RunCheckpointer(ckpt_dir) if ckpt_dir else None
  if ckpt is not None and ckpt.latest_step() is not None:
    tree, meta = ckpt.restore({"state": state, "masks": masks})
    state, masks = tree["state"], tree["masks"]
    log(f"resumed from {ckpt.directory} (phase {meta['phase']}, "
        f"{meta['epochs_done']} epochs done)")

  def save() -> None:
    if ckpt is not None:
      step = (ckpt.latest_step() or 0) + 1
      ckpt.save(step, {"state": state, "masks": masks}, meta)

  def run_epochs(until: int) -> None:
    nonlocal state
    def on_epoch_end(epoch, new_state, record):
      nonlocal state
      state = new_state
      meta["epochs_done"] = epoch + 1
      meta["history"].append(record)
      meta["train_seconds"] += record["epoch_seconds"]
      save()
    if until > meta["epochs_done"]:
      fit(state=state, masks=masks, epochs=until - meta["epochs_done"],
          first_epoch=meta["epochs_done"], on_epoch_end=on_epoch_end)

  if meta["phase"] == "pre":
    if cfg.pre_epochs:
      log(f"pre-training {cfg.pre_epochs} epochs before pruning")
      run_epochs(cfg.pre_epochs)
    if cfg.pruner != "none":
      t0 = time.perf_counter()
      masks = prune_masks(cfg, model, dataset, state, masks, in_shape)
      state = train.remask(state, masks)
      meta["prune_seconds"] = time.perf_counter() - t0
      log(f"pruned with {cfg.pruner} to density {masks_lib.density(masks):.4g} "
          f"in {meta['prune_seconds']:.1f} s")
    meta["phase"] = "post"
    save()
  run_epochs(cfg.pre_epochs + cfg.post_epochs)

  final, seconds = timed_evaluation(trainer, state, eval_data)
  variables = {"params": state.params, **({"batch_stats": state.batch_stats}
                                          if state.batch_stats else {})}
  summ = metrics.summary(model, jax.device_get(variables), masks, in_shape)

  row = dataclasses.asdict(cfg)
  row.update({
      "run_key": cfg.key(),
      "top1": final["top1"], "top5": final["top5"], "test_loss": final["loss"],
      "density": masks_lib.density(masks),
      "params": summ["params"],
      "flops": summ["flops"], "flop_density": summ["flop_density"],
      "collapsed": bool(summ["collapsed"]), "collapsed_layer": summ["collapsed_layer"],
      "layers": summ["layers"],
      "prune_seconds": meta["prune_seconds"],
      "train_seconds": meta["train_seconds"],
      "inference_seconds": seconds,
      "history": meta["history"],
      "train_examples": int(len(dataset.train_x)),
      "test_examples": int(len(dataset.test_x)),
      "jax_version": jax.__version__,
      "devices": [str(d) for d in jax.local_devices()],
  })
  return row
