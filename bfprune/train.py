"""Masked, sharded, jitted training and evaluation.

The training set lives on the device(s) once; each call of the jitted step function runs a
chunk of optimizer steps with ``lax.scan`` (the FC on MNIST is so small that per-step
dispatch would dominate on CPU). Data parallelism over the ``data`` axis of a
``jax.sharding.Mesh`` spanning every device of every process (``make_mesh``; one device is the
degenerate mesh): the step is a ``shard_map`` in which each device gathers its slice of every
global batch (columns of the host-computed permutation, so the global batch and its order do not
depend on the number of devices or processes), computes the loss and gradients of its slice,
and the gradients, loss and BatchNorm statistics are averaged with one ``pmean`` over the axis.
Parameters and optimizer state are replicated and never partitioned, so structured layers
(butterfly, Monarch) compile to the same per-device program as on one device and the only
collective of a step is that all-reduce (GSPMD partitioning of a jitted step split the
butterfly passes over devices: hundreds of all-gathers, all-to-alls and collective-permutes).

Random streams (dropout, augmentation) are per device slice: on more than one device the key
of a step is folded with the device's position on the mesh, so numbers depend on the number of
devices (not on how they are spread over processes). BatchNorm normalises each device's slice
with that slice's statistics (as data-parallel BatchNorm without cross-device sync does); the
running statistics are averaged over devices after every step, so every replica keeps the same.

Multi-process (``jax.distributed``): every process runs the same calls; ``put`` places host
values as global arrays (each process transfers the shards of its own devices), so the
training set and the state are replicated on every device and each process feeds its devices'
slices of every batch.

Masks: the optimizer is wrapped in ``bfprune.optim.masked_optimizer``, whose state carries the
masks; gradients and updates of pruned weights are zeroed, so with params masked once at init
(``init_state``) or when masks change (``remask``) pruned weights stay exactly zero, and the
forward pass needs no masking.

Models: ``Trainer`` calls ``model.apply(variables, x)``, adding ``train=True`` / ``False`` when
the model's ``__call__`` takes a ``train`` argument, ``deterministic=False`` / ``True`` when it
takes Flax's ``deterministic`` (see ``Trainer.train_kwarg`` for other switches), a ``dropout``
rng while training (unused by models without dropout) and ``mutable=["batch_stats"]`` when the
variables hold BatchNorm statistics.
"""
from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bfprune.data import epoch_permutation
from bfprune.optim import MaskedState, masked_optimizer, masked_update, set_masks
from bfprune.pruning.masks import apply_masks

PyTree = Any
Augment = Callable[[jax.Array, jax.Array], jax.Array]
DATA_AXIS = "data"


class TrainState(NamedTuple):
  """Everything that changes during training (a pytree, checkpointable as is)."""
  step: jax.Array          # () int32, optimizer steps taken
  params: PyTree           # the ``params`` collection, already masked
  batch_stats: PyTree      # the ``batch_stats`` collection ({} without BatchNorm)
  opt_state: MaskedState   # ``masked_optimizer(tx, masks)``'s state: holds the masks


def make_mesh(devices: Optional[list] = None) -> Mesh:
  """A 1-D mesh with axis ``data`` over ``devices`` (default: ``jax.devices()``, every device
  of every process, in process order)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def _place(x: Any, sharding: NamedSharding) -> jax.Array:
  """A host value or array as a global array with ``sharding`` (which may span processes:
  every process passes the same value and transfers its own devices' shards)."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    # Typed keys cannot be device_put across processes: move their raw data.
    data = np.asarray(jax.random.key_data(x))
    return jax.random.wrap_key_data(jax.device_put(data, sharding),
                                    impl=jax.random.key_impl(x))
  return jax.device_put(x, sharding)


def adam(learning_rate: float = 1e-3) -> optax.GradientTransformation:
  """The study's optimizer: Adam with default betas and eps."""
  return optax.adam(learning_rate)


def init_state(variables: PyTree, masks: PyTree, tx: optax.GradientTransformation
               ) -> TrainState:
  """Builds a TrainState from Flax ``variables``: params masked, optimizer state of
  ``masked_optimizer(tx, masks)`` (``tx`` is the plain optimizer ``Trainer`` was given)."""
  # Fresh copies: the train step donates its state, which must never alias caller arrays
  # (masked_optimizer copies the masks itself).
  params = jax.tree.map(jnp.array, apply_masks(variables["params"], masks))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=jax.tree.map(jnp.array, variables.get("batch_stats", {})),
                    opt_state=masked_optimizer(tx, masks).init(params))


def remask(state: TrainState, masks: PyTree) -> TrainState:
  """Trains ``state`` with new ``masks`` from now on (e.g. after pruning a pre-trained network).

  Masks the params and puts the masks into the optimizer state (``bfprune.optim.set_masks``,
  which also zeroes Adam's moments of the newly pruned weights). Pure and jit-able.
  """
  return state._replace(params=apply_masks(state.params, masks),
                        opt_state=set_masks(state.opt_state, masks))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy, logits (batch, classes), labels (batch,) int."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _variables(params: PyTree, batch_stats: PyTree) -> dict:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


AUTO = "auto"
# Switches that are True in evaluation (Flax's usual ``deterministic`` for dropout): a model
# taking one gets ``deterministic=False`` while training and ``True`` in evaluation.
INVERTED_SWITCHES = ("deterministic",)
_SPEC_HELP = ("set Trainer(train_kwarg=...) to the name of the model's train / eval switch "
              "(True while training; 'deterministic' is known to be False while training), to "
              "(name, value while training) for any other switch, e.g. ('eval_mode', False), "
              "or to None to call the model without one")


class TrainSwitch(NamedTuple):
  """The keyword ``Trainer`` passes to the model: ``name=when_training`` while training and
  ``name=not when_training`` in evaluation."""
  name: str
  when_training: bool

  def kwargs(self, training: bool) -> dict[str, bool]:
    return {self.name: training == self.when_training}


def _switch(spec: Any) -> TrainSwitch:
  """A given train_kwarg (a name, or (name, value while training)) as a TrainSwitch."""
  if isinstance(spec, str) and spec:
    return TrainSwitch(spec, spec not in INVERTED_SWITCHES)
  if (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str)
      and spec[0] and isinstance(spec[1], bool)):
    return TrainSwitch(spec[0], spec[1])
  raise ValueError(f"Trainer(train_kwarg={spec!r}) is not valid: expected 'auto', None, a "
                   "keyword name, or (name, value while training) such as "
                   "('deterministic', False)")


def resolve_train_kwarg(model: nn.Module, train_kwarg: Any = AUTO) -> Optional[TrainSwitch]:
  """The train / eval keyword ``Trainer`` passes to ``model`` and its value while training.

  ``train_kwarg``:
    ``"auto"``: ``train`` (True while training) if ``model.__call__`` takes it, else Flax's
      ``deterministic`` (False while training, True in evaluation) if it takes that, else
      ``train`` if it takes ``**kwargs``, else None: the model has no switch and is called
      plainly.
    a name: that keyword, which ``__call__`` must take; True while training, except the
      names in ``INVERTED_SWITCHES`` (``deterministic``), which are False while training.
    ``(name, value_while_training)``: any switch, e.g. ``("eval_mode", False)``.
    None: never pass one.

  Returns a ``TrainSwitch`` or None. Raises ValueError, naming the model and argument, when
  ``__call__`` lacks the named keyword or requires an argument besides the input.
  """
  if train_kwarg is None:
    chosen = None
  elif isinstance(train_kwarg, str) and train_kwarg == AUTO:
    chosen = AUTO
  else:
    chosen = _switch(train_kwarg)
  try:
    sig = inspect.signature(model.__call__)
  except (TypeError, ValueError):  # not introspectable: trust the caller's choice
    return TrainSwitch("train", True) if chosen == AUTO else chosen
  params = list(sig.parameters.values())
  var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
  name = type(model).__name__
  if chosen == AUTO:
    chosen = next((_switch(n) for n in ("train",) + INVERTED_SWITCHES if n in sig.parameters),
                  TrainSwitch("train", True) if var_kw else None)
  elif chosen is not None and chosen.name not in sig.parameters and not var_kw:
    raise ValueError(f"Trainer(train_kwarg={train_kwarg!r}): {name}.__call__{sig} has no "
                     f"argument {chosen.name!r}; {_SPEC_HELP}")
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  required = [p.name for p in params[1:] if p.default is p.empty
              and p.name != (chosen.name if chosen else None)
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
  if not positional or required:
    call = "model.apply(variables, x" + (
        f", {chosen.name}={chosen.when_training} while training, "
        f"{not chosen.when_training} in evaluation)" if chosen else ")")
    raise ValueError(f"Trainer calls {call}, but {name}.__call__{sig} "
                     + (f"also requires {', '.join(required)}" if positional else
                        "takes no positional input")
                     + f"; give it a default, or {_SPEC_HELP}")
  return chosen


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Compiled train / eval functions for one model, optimizer and mesh.

  Attributes:
    model: a Flax module, called as ``model.apply(variables, x[, train=...])`` (x: one batch).
    tx: the plain optax optimizer; the trainer wraps it in ``masked_optimizer`` (the state
      from ``init_state`` carries the masks), so pruned weights stay exactly zero.
    mesh: device mesh (see ``make_mesh``).
    augment: optional ``augment(key, x) -> x`` run on device on every training batch.
    train_kwarg: the model's train / eval keyword: ``"auto"`` (default) passes ``train=True``
      while training and ``False`` in evaluation when ``__call__`` takes ``train``, else
      ``deterministic=False`` / ``True`` when it takes Flax's ``deterministic``, and calls the
      model plainly otherwise; a name picks the keyword (True while training, except
      ``deterministic``); ``(name, value_while_training)`` gives any switch; None never
      passes one (see ``resolve_train_kwarg``).
    compiler_options: XLA options for the train and evaluation programs
      (``jax.jit(..., compiler_options=...)``), e.g. ``platform.small_matmul_options("cpu")``
      for an MLP on a CPU; None: the compiler's defaults.
  """
  model: nn.Module
  tx: optax.GradientTransformation
  mesh: Mesh
  augment: Optional[Augment] = None
  train_kwarg: Any = AUTO
  compiler_options: Optional[dict[str, Any]] = None

  def __post_init__(self):
    rep = NamedSharding(self.mesh, P())
    cols = NamedSharding(self.mesh, P(None, DATA_AXIS))  # (steps | batches, batch, ...)
    object.__setattr__(self, "_mode", resolve_train_kwarg(self.model, self.train_kwarg))
    object.__setattr__(self, "_rep", rep)
    object.__setattr__(self, "_cols", cols)
    # check_vma=False: replication of the outputs is ensured by the pmean of everything a step
    # changes; vma checking rejects the butterfly's custom VJP (its twiddle cotangent is built
    # by an inner jax.vjp from per-device values).
    train = jax.shard_map(self._train_chunk_impl, mesh=self.mesh,
                          in_specs=(P(), P(), P(), P(None, DATA_AXIS), P()),
                          out_specs=(P(), P()), check_vma=False)
    opts = dict(self.compiler_options) if self.compiler_options else None
    object.__setattr__(self, "_train_chunk", jax.jit(
        train, in_shardings=(rep, rep, rep, cols, rep), out_shardings=(rep, rep),
        donate_argnums=(0,), compiler_options=opts))
    object.__setattr__(self, "_remask", jax.jit(
        remask, in_shardings=(rep, rep), out_shardings=rep, donate_argnums=(0,)))
    evaluate = jax.shard_map(self._eval_impl, mesh=self.mesh,
                             in_specs=(P(), P(), P(None, DATA_AXIS), P(None, DATA_AXIS),
                                       P(None, DATA_AXIS)),
                             out_specs=P(), check_vma=False)
    object.__setattr__(self, "_eval_all", jax.jit(
        evaluate, in_shardings=(rep, rep, cols, cols, cols), out_shardings=rep,
        compiler_options=opts))

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  def put(self, tree: PyTree) -> PyTree:
    """Places a pytree (state, masks, dataset arrays) replicated on the mesh (all processes:
    each passes the same values)."""
    return jax.tree.map(lambda x: _place(x, self._rep), tree)

  def put_eval(self, eval_data: "EvalData") -> "EvalData":
    """Places padded batches (``make_eval_data``) for ``evaluate``: every device holds its
    columns of every batch (all processes: each passes the same values)."""
    if np.shape(eval_data.x)[1] % self.num_devices:
      raise ValueError(f"evaluation batch size {np.shape(eval_data.x)[1]} is not divisible by "
                       f"the number of devices ({self.num_devices})")
    return EvalData(*(_place(a, self._cols) for a in eval_data))

  def _mode_kw(self, train: bool) -> dict:
    return {} if self._mode is None else self._mode.kwargs(train)

  # -- training ---------------------------------------------------------------------------
  def _loss(self, params, batch_stats, x, y, key):
    # No masking here: pruned params are exactly zero (masked optimizer), their gradients are
    # zeroed before the optimizer sees them.
    variables = _variables(params, batch_stats)
    kw = self._mode_kw(True)
    if batch_stats:
      logits, updates = self.model.apply(variables, x, rngs={"dropout": key},
                                         mutable=["batch_stats"], **kw)
      new_stats = updates["batch_stats"]
    else:
      logits = self.model.apply(variables, x, rngs={"dropout": key}, **kw)
      new_stats = batch_stats
    return jnp.mean(cross_entropy(logits, y)), new_stats

  def _train_chunk_impl(self, state, x_all, y_all, idx, key):
    """Runs ``idx.shape[0]`` steps on one device (inside ``shard_map``); idx (steps, batch /
    devices) is this device's columns of the global batches, indexing the training set."""
    def step(state, batch_idx):
      k = jax.random.fold_in(key, state.step)
      if self.num_devices > 1:  # one stream per device slice (one device: as before)
        k = jax.random.fold_in(k, jax.lax.axis_index(DATA_AXIS))
      k_aug, k_drop = jax.random.split(k)
      x, y = x_all[batch_idx], y_all[batch_idx]
      if self.augment is not None:
        x = self.augment(k_aug, x)
      (loss, stats), grads = jax.value_and_grad(self._loss, has_aux=True)(
          state.params, state.batch_stats, x, y, k_drop)
      # The one collective: the slices' means average to the global batch's mean.
      loss, stats, grads = jax.lax.pmean((loss, stats, grads), DATA_AXIS)
      updates, opt_state = masked_update(self.tx, grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      return TrainState(state.step + 1, params, stats, opt_state), loss
    if idx.shape[0] == 1:
      # No loop for a single step: convolutions inside XLA:CPU while loops ran ~8x slower.
      state, loss = step(state, idx[0])
      return state, loss[None]
    state, losses = jax.lax.scan(step, state, idx)
    return state, losses

  def remask(self, state: TrainState, masks: PyTree) -> TrainState:
    """``remask`` jitted on the mesh; ``state`` is donated (use the returned one)."""
    return self._remask(state, self.put(masks))

  def train_steps(self, state: TrainState, masks: Optional[PyTree], x_all: jax.Array,
                  y_all: jax.Array, idx: np.ndarray, key: jax.Array
                  ) -> tuple[TrainState, jax.Array]:
    """Runs one optimizer step per row of ``idx`` (steps, batch); returns (state, losses).

    ``masks``: the masks to train with, applied to the state first (``remask``: one masking
    pass over params and moments per call), or None to train with the masks already in
    ``state.opt_state``. ``state`` is donated (its buffers are reused); use the returned one.
    """
    if idx.shape[1] % self.num_devices:
      raise ValueError(f"batch size {idx.shape[1]} is not divisible by the number of devices "
                       f"({self.num_devices})")
    if not isinstance(state.opt_state, MaskedState):
      raise ValueError("state.opt_state is not a masked optimizer state "
                       f"({type(state.opt_state).__name__}); build the state with "
                       "train.init_state(variables, masks, tx)")
    if masks is not None:
      state = self._remask(state, self.put(masks))
    return self._train_chunk(*self._train_args(state, x_all, y_all, idx, key))

  def _train_args(self, state, x_all, y_all, idx, key) -> tuple:
    return (state, x_all, y_all, _place(np.asarray(idx, np.int32), self._cols),
            _place(key, self._rep))

  def lower_train_steps(self, state: TrainState, x_all: jax.Array, y_all: jax.Array,
                        idx: np.ndarray, key: jax.Array) -> jax.stages.Lowered:
    """The lowered program of ``train_steps(state, None, x_all, y_all, idx, key)``, e.g. to
    list the collectives of a step: ``.compile().as_text()``."""
    return self._train_chunk.lower(*self._train_args(state, x_all, y_all, idx, key))

  # -- evaluation -------------------------------------------------------------------------
  def _eval_impl(self, params, batch_stats, x_all, y_all, w_all):
    """Sums of loss, top-1 and top-5 hits over padded batches x_all (nb, batch, ...); per
    device (inside ``shard_map``) over its columns of every batch, then summed over devices."""
    def body(acc, batch):
      x, y, w = batch
      logits = self.model.apply(_variables(params, batch_stats), x, **self._mode_kw(False))
      loss = cross_entropy(logits, y)
      k = min(5, logits.shape[-1])
      topk = jax.lax.top_k(logits, k)[1]
      hit1 = (topk[:, 0] == y)
      hit5 = jnp.any(topk == y[:, None], axis=-1)
      return acc + jnp.stack([jnp.sum(w * loss), jnp.sum(w * hit1), jnp.sum(w * hit5),
                              jnp.sum(w)]), None
    acc, _ = jax.lax.scan(body, jnp.zeros(4, jnp.float32), (x_all, y_all, w_all))
    return jax.lax.psum(acc, DATA_AXIS)

  def evaluate(self, state: TrainState, eval_data: "EvalData") -> dict[str, float]:
    """Loss (mean), top-1 and top-5 (percent) over every example of ``eval_data`` once."""
    loss, h1, h5, n = np.asarray(self._eval_all(state.params, state.batch_stats,
                                                *self.put_eval(eval_data)))
    return {"loss": float(loss / n), "top1": float(100 * h1 / n), "top5": float(100 * h5 / n)}


class EvalData(NamedTuple):
  """A split padded to whole batches: x (nb, batch, ...), y (nb, batch), w (nb, batch) in {0,1}."""
  x: jax.Array
  y: jax.Array
  w: jax.Array


def make_eval_data(x: np.ndarray, y: np.ndarray, batch_size: int) -> EvalData:
  """Pads a split to whole batches; padded rows get weight 0 so each example counts once."""
  n = len(x)
  nb = -(-n // batch_size)
  pad = nb * batch_size - n
  xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
  yp = np.concatenate([y, np.zeros((pad,), y.dtype)])
  w = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  return EvalData(xp.reshape((nb, batch_size) + x.shape[1:]), yp.reshape(nb, batch_size),
                  w.reshape(nb, batch_size))


def epoch_indices(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
  """The (steps, batch) example indices of one epoch: a seeded permutation, remainder dropped."""
  perm = epoch_permutation(n, seed, epoch)
  steps = n // batch_size
  if steps == 0:
    raise ValueError(f"batch size {batch_size} exceeds the training set size {n}")
  return perm[: steps * batch_size].reshape(steps, batch_size)


def fit(trainer: Trainer, state: TrainState, masks: Optional[PyTree], train_x: np.ndarray,
        train_y: np.ndarray, epochs: int, batch_size: int, seed: int,
        eval_data: Optional[EvalData] = None, first_epoch: int = 0,
        chunk_steps: int = 64, log: Optional[Callable[[dict], None]] = print,
        on_epoch_end: Optional[Callable[[int, TrainState, dict], None]] = None
        ) -> tuple[TrainState, list[dict]]:
  """Trains ``epochs`` epochs (numbered from ``first_epoch``); one log record per epoch.

  ``masks``: the masks to train with (the state is re-masked with them once, ``remask``), or
  None to keep those already in ``state.opt_state``.
  Each record holds epoch, train_loss, examples_per_s and, with ``eval_data``, test loss/top1/top5.
  ``on_epoch_end(epoch, state, record)`` runs after each epoch (e.g. to checkpoint).
  ``chunk_steps`` optimizer steps run per jitted call (a ``lax.scan``); small models gain from
  many (less dispatch), convolutional ones should use 1 (see ``Trainer``).
  """
  x_all, y_all = trainer.put((jnp.asarray(train_x), jnp.asarray(train_y, jnp.int32)))
  # The train step donates its input state; copy so the caller's ``state`` stays valid.
  state = trainer.put(jax.tree.map(jnp.array, state))
  if masks is not None:
    state = trainer.remask(state, trainer.put(masks))
  if eval_data is not None:
    eval_data = trainer.put_eval(eval_data)
  key = jax.random.key(seed)
  history = []
  for epoch in range(first_epoch, first_epoch + epochs):
    idx = epoch_indices(len(train_x), batch_size, seed, epoch)
    t0 = time.perf_counter()
    losses = []
    for start in range(0, len(idx), chunk_steps):
      state, loss = trainer.train_steps(state, None, x_all, y_all, idx[start:start + chunk_steps],
                                        jax.random.fold_in(key, epoch))
      losses.append(loss)
    train_loss = float(jnp.mean(jnp.concatenate(losses)))
    seconds = time.perf_counter() - t0
    record = {"epoch": epoch + 1, "train_loss": train_loss,
              "examples_per_s": idx.size / seconds, "epoch_seconds": seconds}
    if eval_data is not None:
      record.update({f"test_{k}": v for k, v in trainer.evaluate(state, eval_data).items()})
    history.append(record)
    if log is not None:
      log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in record.items()))
    if on_epoch_end is not None:
      on_epoch_end(epoch, state, record)
  return state, history
