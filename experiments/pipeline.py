"""One run of the study: config -> data -> model -> prune -> train -> evaluate -> results row.

Composes the library's pieces; all experiment plumbing lives here, none in ``bfprune``.

``run_one`` is built from ``build_run`` (model, initialisation, trainer, test batches),
``prune_step`` (prune and re-mask) and ``sparse_inference`` (the row's
``inference_seconds_sparse`` and ``inference_sparse_note``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bfprune import data as data_lib
from bfprune import checkpoint, metrics, models, platform, train
from bfprune import sparse as sparse_lib
from bfprune.pruning import masks as masks_lib
from bfprune.pruning import schedule
from bfprune.structured import layers, monarch

from experiments import distributed
from experiments import config as cfg_lib
from experiments.config import RunConfig
from experiments.cpu_flags import SMALL_MATMUL_DEFAULT

Log = Callable[[str], None]


# --factorize_with -> (head / rectangular dense layer, body dense layer for --factorize=all).
STRUCTURED_DENSE = {
    "butterfly": (layers.ButterflyDense, layers.FactorizedDense),  # K-matrix where square
    "kmatrix": (layers.KMatrixDense, layers.KMatrixDense),
    "monarch": (monarch.MonarchDense, monarch.MonarchDense),
}


def chunk_steps(model: str) -> int:
  """Optimizer steps per jitted call for a model name: 64 for MLPs (one ``lax.scan``), 1 for
  conv nets, whose convolutions ran ~8x slower inside an XLA:CPU while loop."""
  return 64 if model == "fc" else 1


# Programs that took at least this long to compile go to the persistent cache: every train / eval /
# scoring step of a run (about 0.3-6 s each on this CPU for FC / MNIST), not the eager single-op
# programs (20-60 ms, barely more than reading an entry back).
CACHE_MIN_COMPILE_SECONDS = 0.1


class CompilationCacheError(ValueError):
  """The ``--compilation_cache`` folder cannot be used (one line naming it)."""


def default_compilation_cache_dir() -> Path:
  """``$XDG_CACHE_HOME/bfprune/jax``, else ``~/.cache/bfprune/jax``: shared by every sweep."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "bfprune" / "jax"


def enable_compilation_cache(path: Optional[str]) -> Optional[Path]:
  """Turns on JAX's persistent compilation cache (process-wide) for a script's runs.

  Each run of a sweep builds new jitted closures (train / eval steps, pruning scores), so a second
  run of the same shapes retraces them; with the cache its compiles become disk reads, keyed by
  the compiled program (HLO, compile options, jaxlib, device kind: a stale or foreign entry is
  never used). Call it once, early, from a script's main.

  Args:
    path: the ``--compilation_cache`` flag: a folder (created if missing), ``""`` / None for
      ``default_compilation_cache_dir()``, or ``"none"`` to leave the cache off.

  Returns:
    The folder in use, or None when off.

  Raises:
    CompilationCacheError: the folder cannot be created or written.
  """
  if path is not None and path.strip().lower() == "none":
    return None
  folder = Path(path).expanduser() if path else default_compilation_cache_dir()
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise CompilationCacheError(f"--compilation_cache={str(folder)!r}: cannot create the folder "
                                f"({e.strerror or e}); pass another folder or 'none'") from None
  if not os.access(folder, os.W_OK | os.X_OK):
    raise CompilationCacheError(f"--compilation_cache={str(folder)!r}: folder is not writable; "
                                "pass another folder or 'none'")
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # any size, no override
  return folder


class DataSizeError(ValueError):
  """A split is too small for the requested examples / batch (names the flag)."""


def load_training_data(dataset: str, data_dir: Optional[str], train_examples: int = 0,
                       batch_size: int = 0, test_examples: int = 0) -> data_lib.Dataset:
  """``data_lib.load_dataset`` with the training split cut to its first ``train_examples``
  (0: all of it), checked to hold at least one batch of ``batch_size`` (0: no check), and the
  test split cut to its first ``test_examples`` (0: all of it).

  Raises ``data_lib.DataError`` (missing / corrupt files) or ``DataSizeError`` naming the flag
  (``--train_examples`` / ``--test_examples`` / ``--batch_size``) that asks for more examples
  than there are.
  """
  ds = data_lib.load_dataset(dataset, data_dir)
  if train_examples:
    if train_examples > len(ds.train_x):
      raise DataSizeError(f"--train_examples={train_examples} exceeds the "
                          f"{len(ds.train_x)} training examples available")
    ds = ds._replace(train_x=ds.train_x[:train_examples], train_y=ds.train_y[:train_examples])
  if test_examples:
    if test_examples > len(ds.test_x):
      raise DataSizeError(f"--test_examples={test_examples} exceeds the "
                          f"{len(ds.test_x)} test examples available")
    ds = ds._replace(test_x=ds.test_x[:test_examples], test_y=ds.test_y[:test_examples])
  if batch_size > len(ds.train_x):
    raise DataSizeError(f"--batch_size={batch_size} exceeds the {len(ds.train_x)} training "
                        "examples")
  return ds


def check_prune_examples(dataset: data_lib.Dataset, per_class: int, flag: str, hint: str) -> None:
  """DataSizeError unless every class has ``per_class`` training examples, the number SNIP and
  GraSP score with (``data_lib.class_balanced_sample``). The one-line message starts with
  ``flag`` (the setting to blame, as given, e.g. ``--prune_per_class=100``) and ends with
  ``hint`` (what to change)."""
  counts = np.bincount(np.asarray(dataset.train_y), minlength=dataset.num_classes)
  c = int(np.argmin(counts))
  if counts[c] < per_class:
    raise DataSizeError(f"{flag}: snip and grasp prune with {per_class} examples of every "
                        f"class, but class {c} has {counts[c]} of the {len(dataset.train_y)} "
                        f"training examples; {hint}")


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
  """The masks of ``cfg.pruner`` at ``cfg.density``, scored on the current (masked) network.

  In a multi-process run they are computed on process 0 and broadcast, so every process trains
  with the same masks (``distributed.from_main``).
  """
  return distributed.from_main(
      lambda: _score_and_prune(cfg, model, dataset, state, masks, in_shape),
      like=jax.tree.map(np.asarray, masks))


def mask_digest(masks) -> str:
  """sha256 of the masks (leaf order, shapes and kept bits): equal digests, equal masks."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(masks):
    m = np.asarray(leaf, bool)
    h.update(repr(m.shape).encode())
    h.update(np.packbits(m.reshape(-1)).tobytes())
  return h.hexdigest()


def _score_and_prune(cfg: RunConfig, model, dataset: data_lib.Dataset,
                     state: train.TrainState, masks, in_shape: tuple[int, ...]):
  stats = state.batch_stats
  def apply_fn(p, x):  # deterministic forward for scoring: no dropout, norms in inference mode
    return model.apply({"params": p, "batch_stats": stats} if stats else {"params": p}, x,
                       train=False)
  batch = None
  if cfg.pruner in cfg_lib.DATA_PRUNERS:
    idx = data_lib.class_balanced_sample(dataset.train_y, cfg.prune_per_class, cfg.seed)
    batch = (jnp.asarray(dataset.train_x[idx]), jnp.asarray(dataset.train_y[idx]))
  score_fn = schedule.make_score_fn(cfg.pruner, apply_fn, batch=batch, input_shape=in_shape,
                                    key=jax.random.key(cfg.seed))
  return schedule.prune(score_fn, jax.device_get(state.params), masks, cfg.density,
                        rounds=cfg.prune_rounds, schedule=cfg.prune_schedule,
                        scope=cfg.prune_scope)


class RunParts(NamedTuple):
  """What a run builds before any training (``build_run``).

  ``masks`` are the all-kept masks on the prunable leaves and ``state`` the initial (masked)
  TrainState; ``fit`` is ``train.fit`` bound to this run's trainer, training data, batch size,
  seed, test batches and chunking (pass ``state``, ``masks``, ``epochs``, ``first_epoch``).
  """
  model: Any
  in_shape: tuple[int, ...]
  variables: Any
  masks: Any
  trainer: train.Trainer
  state: train.TrainState
  eval_data: train.EvalData
  fit: Callable[..., tuple[train.TrainState, list[dict]]]


def compiler_options(model: str, small_matmul: bool = SMALL_MATMUL_DEFAULT) -> Optional[dict[str, str]]:
  """The XLA options a run's trainer compiles with: with ``small_matmul`` the FC (small
  matmuls) gets ``platform.small_matmul_options`` of the backend (on CPU: Eigen dots instead of
  YNNPACK); VGG16, and everything without it, the compiler's defaults (None). The default is
  ``sweep.py``'s (``cpu_flags.SMALL_MATMUL_DEFAULT``)."""
  if model != "fc" or not small_matmul:
    return None
  return platform.small_matmul_options(jax.default_backend()) or None


def build_run(cfg: RunConfig, dataset: data_lib.Dataset,
              history_log: Optional[Log] = None, small_matmul: bool = SMALL_MATMUL_DEFAULT) -> RunParts:
  """Model, initialisation (``cfg.seed``), all-kept masks, trainer and test batches of a run
  (``small_matmul``: see ``compiler_options``)."""
  cfg.validate()
  in_shape = models.input_shape(cfg.dataset)
  model = build_model(cfg, dataset.num_classes)
  variables = model.init(jax.random.key(cfg.seed), jnp.zeros((1,) + in_shape))
  masks = masks_lib.ones_like(variables["params"], masks_lib.is_kernel_or_twiddle
                              if cfg.prune_factors else masks_lib.is_kernel)
  tx = train.adam(cfg.lr)
  augment = data_lib.augment_cifar if cfg.dataset == "cifar10" else None
  trainer = train.Trainer(model, tx, train.make_mesh(), augment=augment,
                          compiler_options=compiler_options(cfg.model, small_matmul))
  state = train.init_state(variables, masks, tx)
  eval_data = trainer.put_eval(train.make_eval_data(dataset.test_x, dataset.test_y,
                                                    cfg.batch_size))
  fit = functools.partial(train.fit, trainer, train_x=dataset.train_x, train_y=dataset.train_y,
                          batch_size=cfg.batch_size, seed=cfg.seed, eval_data=eval_data,
                          log=history_log, chunk_steps=chunk_steps(cfg.model))
  return RunParts(model, in_shape, variables, masks, trainer, state, eval_data, fit)


def prune_step(cfg: RunConfig, parts: RunParts, dataset: data_lib.Dataset,
               state: train.TrainState, masks, log: Log = print
               ) -> tuple[train.TrainState, Any, float]:
  """Prunes the (pre-trained) ``state`` with ``cfg.pruner`` and re-masks it.

  Returns (state, masks, seconds); with ``--pruner=none`` the inputs unchanged and 0 s.
  """
  if cfg.pruner == "none":
    return state, masks, 0.0
  t0 = time.perf_counter()
  masks = prune_masks(cfg, parts.model, dataset, state, masks, parts.in_shape)
  state = train.remask(jax.device_get(state), masks)  # on the host: masks are host arrays
  seconds = time.perf_counter() - t0
  log(f"pruned with {cfg.pruner} to density {masks_lib.density(masks):.4g} in {seconds:.1f} s")
  return state, masks, seconds


def sparse_unsupported(cfg: RunConfig) -> Optional[str]:
  """Why ``bfprune.sparse`` cannot run ``cfg``'s model, or None when it can."""
  if cfg.factorize != "none":
    return (f"--factorize={cfg.factorize}: {cfg.factorize_with} layers have no sparse export "
            "(bfprune.sparse handles plain dense and 3x3 conv kernels only)")
  if cfg.batch_norm:
    return "--batch_norm: bfprune.sparse's VGG16 forward has no BatchNorm"
  if cfg.model not in ("fc", "vgg16"):
    return f"--model={cfg.model}: no sparse forward"
  return None


class SparseCheckError(AssertionError):
  """The sparse forward disagrees with the masked-dense model: a wrong export, not a timing."""


class SparseTiming(NamedTuple):
  """``seconds``: median wall seconds of a real sparse pass over the test set, or None;
  ``note``: the native kernel that was timed, or one line on why nothing was timed."""
  seconds: Optional[float]
  note: str


def sparse_inference(cfg: RunConfig, params, masks, test_x: np.ndarray,
                     test_y: Optional[np.ndarray] = None, *, model=None,
                     dense_top1: Optional[float] = None, repeats: int = 5,
                     log: Log = print, check_examples: int = 64,
                     logit_rtol: float = 1e-3, logit_atol: float = 1e-5,
                     top1_tol: Optional[float] = None) -> SparseTiming:
  """Times a real sparse (BCSR) pass over the test set; the row's ``inference_seconds_sparse``
  and ``inference_sparse_note``.

  ``params * masks`` is exported with ``bfprune.sparse.sparsify(params, masks, "bcsr")`` (every
  masked kernel a BCSR matrix holding exactly its kept weights) and run through
  ``fc_apply_sparse`` / ``vgg16_apply_sparse`` (inference mode), jitted. The test set is cut into
  batches of ``cfg.batch_size`` with the last one zero-padded, as the dense evaluation
  (``train.make_eval_data``) does; one untimed pass warms up, then ``repeats`` passes (every
  batch's logits, blocked on) are timed and the median returned. Unlike the dense
  ``inference_seconds`` (one jitted scan that also sums loss / top-k) the batches are separate
  jitted calls, as in ``experiments/bench_sparse.py``; the loss / top-k sums are negligible next
  to the forward pass. A net with an empty layer is still timed (its forward is then little more
  than the head's bias).

  Not timed (``seconds`` None, ``note`` says why, also logged):
  - the model: only ``--model=fc`` and ``--model=vgg16`` with plain dense / 3x3 conv kernels,
    i.e. ``--factorize=none`` and no ``--batch_norm`` (see ``sparse_unsupported``);
  - the backend: every BCSR product must lower to a native sparse kernel
    (``bfprune.sparse.lower_native``): XLA:CPU's CSR kernel, or cuSPARSE / hipSPARSE on a GPU
    with a GPU jaxlib. On TPU, or a GPU whose jaxlib lacks them, a BCSR product is XLA's generic
    gather + scatter-add, slower than the dense product, and timing it would not be sparse
    inference.

  Checks (a wrong export must not pass as a fast number): the sparse logits of the first
  ``check_examples`` test examples must equal the masked-dense ``model.apply``'s to
  ``logit_rtol`` x max |logit| + ``logit_atol`` (relative: an initialised net's logits can be
  ~1e-3), which checks the export and the sparse forward. The masked-dense reference is computed
  at ``precision="highest"``: the sparse kernels multiply in full float32, while a GPU's default
  (TF32) or a TPU's (bfloat16 passes) matmul would put the reference's own error above the
  tolerance. Given ``test_y`` and ``dense_top1`` (the dense evaluation's top-1 %), the sparse
  top-1 over the whole test set must be within ``top1_tol`` points of it (default: 5 test
  examples' worth, 0.05 points of 10,000: float32 near-ties may flip a few argmaxes), which
  checks that the export is the evaluated model. Either failure raises ``SparseCheckError``.

  Args:
    cfg: the run's config (model, factorize, batch_norm, batch_size).
    params: the params collection (masked or not: ``params * masks`` is what is exported).
    masks: boolean masks on the kernels (``None`` elsewhere), mirroring ``params``.
    test_x, test_y: the test split (unpadded).
    model: the Flax model for the logit check (default ``build_model(cfg)``).
  """
  why = sparse_unsupported(cfg)
  if why is not None:
    log(f"sparse inference: not timed ({why})")
    return SparseTiming(None, why)
  num_classes = int(np.shape(params["head"]["kernel"])[-1])
  model = build_model(cfg, num_classes) if model is None else model
  masked = masks_lib.apply_masks(params, masks)
  sparse_params = sparse_lib.sparsify(params, masks, fmt="bcsr")
  apply = sparse_lib.fc_apply_sparse if cfg.model == "fc" else sparse_lib.vgg16_apply_sparse
  n = len(test_x)
  ev = train.make_eval_data(test_x, np.zeros(n, np.int32), cfg.batch_size)
  batches = [jnp.asarray(b) for b in ev.x]
  lowered, kernel = sparse_lib.lower_native(apply, sparse_params, batches[0])
  if lowered is None:
    log(f"sparse inference: not timed ({kernel})")
    return SparseTiming(None, kernel)
  fwd = lowered.compile()  # every batch has the same shape (the last one is padded)

  logits = jax.block_until_ready([fwd(sparse_params, b) for b in batches])  # warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready([fwd(sparse_params, b) for b in batches])
    times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)

  k = min(check_examples, n)
  # The first k rows over as many batches as they span (a batch may be smaller than k).
  got = np.concatenate([np.asarray(l) for l in logits[:-(-k // cfg.batch_size)]])[:k]
  with jax.default_matmul_precision("highest"):  # part of jit's key: compiles a HIGHEST program
    ref = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(
        masked, jnp.asarray(test_x[:k])))
  diff = float(np.max(np.abs(got - ref)))
  tol = logit_rtol * float(np.max(np.abs(ref))) + logit_atol
  if not diff <= tol:
    raise SparseCheckError(f"sparse logits differ from the masked-dense model's by {diff:.3g} "
                           f"(> {tol:.3g}) on the first {k} test examples")
  msg = f"max |logit diff| {diff:.2g} on {k} examples"
  if test_y is not None:
    pred = np.concatenate([np.argmax(np.asarray(l), axis=-1) for l in logits])[:n]
    top1 = float(100.0 * np.mean(pred == np.asarray(test_y)))
    msg += f", top-1 {top1:.2f}%"
    if dense_top1 is not None:
      if top1_tol is None:
        top1_tol = 100.0 * 5 / n
      if not abs(top1 - dense_top1) <= top1_tol:
        raise SparseCheckError(f"sparse top-1 {top1:.4f}% differs from the dense evaluation's "
                               f"{dense_top1:.4f}% by more than {top1_tol:.3g} points")
      msg += f" (dense {dense_top1:.2f}%)"
  log(f"sparse inference: {seconds:.4g} s per test-set pass (BCSR via {kernel}, "
      f"{sparse_lib.stored_entries(sparse_params)} stored weights; {msg})")
  return SparseTiming(seconds, f"BCSR via {kernel}")


def timed_sparse_inference(cfg: RunConfig, params, masks, test_x: np.ndarray,
                           test_y: Optional[np.ndarray] = None, **kwargs) -> Optional[float]:
  """``sparse_inference(...).seconds``: median seconds of a real sparse pass, or None where the
  model or the backend has none (the reason is logged)."""
  return sparse_inference(cfg, params, masks, test_x, test_y, **kwargs).seconds


def run_one(cfg: RunConfig, dataset: data_lib.Dataset, log: Log = print,
            history_log: Optional[Log] = None,
            ckpt_dir: Optional[str] = None, time_sparse: bool = True,
            small_matmul: bool = SMALL_MATMUL_DEFAULT) -> dict[str, Any]:
  """Runs one configuration end to end and returns its results row (JSON-serialisable).

  With ``ckpt_dir`` the run checkpoints after every epoch and resumes from the latest
  checkpoint found there. The row's ``inference_seconds`` times the masked-dense model,
  ``inference_seconds_sparse`` the real sparse one (``sparse_inference``; None where
  ``bfprune.sparse`` does not support the model or the backend has no native sparse kernel,
  ``inference_sparse_note`` says which; ``time_sparse=False`` skips it: a VGG16 pass takes
  10-45 s on a 2-core CPU, six passes per run). Raises ``SparseCheckError`` when the sparse
  forward disagrees with the dense evaluation (the checkpoint is kept: a rerun only evaluates).

  Multi-process (``experiments/distributed.py``): every process calls ``run_one`` with the same
  arguments; the mesh spans all processes' devices, masks come from process 0, and every process
  takes part in the checkpoint saves / restores (``ckpt_dir`` on a file system they share). The
  sparse timing runs on process 0 only (elsewhere the row says None); the caller writes process
  0's row. The row's ``devices`` lists every process's devices, ``mask_sha256`` identifies the
  masks trained with.
  """
  parts = build_run(cfg, dataset, history_log, small_matmul)
  model, in_shape, trainer, eval_data = parts.model, parts.in_shape, parts.trainer, parts.eval_data
  state, masks, fit = parts.state, parts.masks, parts.fit

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
    state, masks, meta["prune_seconds"] = prune_step(cfg, parts, dataset, state, masks, log)
    meta["phase"] = "post"
    save()
  run_epochs(cfg.pre_epochs + cfg.post_epochs)

  if ckpt is not None:
    ckpt.close()
  final, seconds = timed_evaluation(trainer, state, eval_data)
  # Process-local work, done by process 0 alone: only its row is written.
  if not time_sparse:
    sparse = SparseTiming(None, "not timed (--nosparse_inference)")
  elif distributed.is_main():
    sparse = sparse_inference(
        cfg, jax.device_get(state.params), jax.device_get(masks), dataset.test_x,
        dataset.test_y, model=model, dense_top1=final["top1"], log=log)
  else:
    sparse = SparseTiming(None, f"not timed on process {jax.process_index()} (process 0 "
                                "times it)")
  variables = {"params": state.params, **({"batch_stats": state.batch_stats}
                                          if state.batch_stats else {})}
  summ = metrics.summary(model, jax.device_get(variables), masks, in_shape)

  row = dataclasses.asdict(cfg)
  row.update({
      "run_key": cfg.key(),
      "top1": final["top1"], "top5": final["top5"], "test_loss": final["loss"],
      "density": masks_lib.density(masks),
      # All parameters, and those left after pruning (unprunable ones + kept prunable ones).
      "params_total": summ["params"],
      "params_kept": (summ["params"] - masks_lib.count_prunable(masks)
                      + masks_lib.count_kept(masks)),
      "flops": summ["flops"], "flop_density": summ["flop_density"],
      "collapsed": bool(summ["collapsed"]), "collapsed_layer": summ["collapsed_layer"],
      "layers": summ["layers"],
      "prune_seconds": meta["prune_seconds"],
      "train_seconds": meta["train_seconds"],
      "inference_seconds": seconds,
      "inference_seconds_sparse": sparse.seconds,
      "inference_sparse_note": sparse.note,
      "history": meta["history"],
      "train_examples": int(len(dataset.train_x)),
      "test_examples": int(len(dataset.test_x)),
      "jax_version": jax.__version__,
      "compiler_options": dict(trainer.compiler_options or {}),
      "devices": [str(d) for d in jax.devices()],  # every process's, in mesh order
      "processes": jax.process_count(),
      "mask_sha256": mask_digest(masks),
  })
  return row
