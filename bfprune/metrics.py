"""Parameter and FLOP counts, FLOP density and layer collapse, for any ``flax.linen`` model.

Layers are discovered by tracing one forward pass (``jax.eval_shape``, so nothing is computed)
with ``flax.linen.intercept_methods``: every module call is recorded with its path, type and
input / output shapes. A *layer* is a module that owns parameters directly (a structured module,
one that defines ``flops_per_example``, owns its whole parameter subtree).

FLOP convention (per example, multiply-adds counted once):

* dense: ``in * out`` per output position, bias ``out`` per position;
* conv: ``Cin/groups * Cout * kh * kw * Hout * Wout`` (strides and padding enter through the
  recorded output shape), bias ``Cout * Hout * Wout``; transposed conv: kernel size times the
  number of *input* positions;
* norms: one FLOP per element of the normalised tensor (``C * H * W``);
* structured layers: ``module.flops_per_example(input_shape)``; their kept FLOPs are
  ``d * (FLOPs - bias FLOPs) + bias FLOPs`` with ``d`` the density of the layer's masked leaves
  (twiddles under ``is_kernel_or_twiddle``, KOPS2D's kernel). This is a proportional
  convention: pruning KOPS2D's spatial kernel does not actually sparsify its frequency-domain
  product;
* anything else (embeddings, custom parameters the tracer cannot interpret): 0.

Pruned FLOPs follow the mask density of the tensor they come from; parameters without a mask
(biases, norms, unpruned kernels / twiddles) count at density 1.

Shapes called ``input_shape`` here are per example, without the batch axis: ``(28, 28, 1)`` for
MNIST, ``(32, 32, 3)`` for CIFAR-10. The forward is traced with a batch of 1.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bfprune import float64 as float64_lib
from bfprune.pruning import masks as masks_lib

PyTree = Any
Path = tuple[str, ...]

KINDS = ("dense", "conv", "norm", "structured", "other")
_NORMS = (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_BIAS_NAMES = ("bias",)


class MetricsError(ValueError):
  """Bad input to a metrics function (a ValueError with a one-line explanation)."""


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """One row of the per-layer table (counts and FLOPs are per example).

  Attributes:
    name: module path joined by '/', e.g. ``"conv3"`` or ``"block1/Dense_0"``.
    kind: one of ``dense | conv | norm | structured | other``.
    module_type: the module's class name.
    input_shape / output_shape: per-example shapes (no batch axis) of the first call.
    param_shapes: parameter name (relative to the layer, '/'-joined) -> shape.
    params: number of parameters owned by the layer.
    weights: number of prunable parameters (leaves with a non-None mask).
    kept: number of prunable parameters kept by the mask.
    density: ``kept / weights`` (1.0 when nothing in the layer is prunable).
    flops: FLOPs per example (weights plus biases / norm work), summed over calls.
    flops_kept: FLOPs per example that survive the mask (unpruned parts at density 1).
    calls: how many times the module ran in the forward pass (shared modules > 1).
  """
  name: str
  kind: str
  module_type: str
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  param_shapes: dict[str, tuple[int, ...]]
  params: int
  weights: int
  kept: int
  density: float
  flops: int
  flops_kept: float
  calls: int = 1

  def as_dict(self) -> dict[str, Any]:
    """JSON-serialisable plain dict (shapes become lists of ints)."""
    return {
        "name": self.name, "kind": self.kind, "module_type": self.module_type,
        "input_shape": [int(d) for d in self.input_shape],
        "output_shape": [int(d) for d in self.output_shape],
        "param_shapes": {k: [int(d) for d in v] for k, v in self.param_shapes.items()},
        "params": int(self.params), "weights": int(self.weights), "kept": int(self.kept),
        "density": float(self.density), "flops": int(self.flops),
        "flops_kept": float(self.flops_kept), "calls": int(self.calls),
    }


# ----------------------------------------------------------------------------- pytree helpers


def _flat(tree: PyTree) -> dict[Path, Any]:
  """Nested dict -> {path tuple: leaf}; ``None`` leaves are kept."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  return {masks_lib.path_names(p): x for p, x in leaves}


def count_params(params: PyTree) -> int:
  """Total number of parameters (elements of every array leaf; ``None`` leaves ignored)."""
  return int(sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(params)))


def _split_variables(variables: PyTree) -> dict[str, Any]:
  """Accepts either a full variables dict (with a 'params' collection) or a bare params tree."""
  if not isinstance(variables, Mapping):
    raise MetricsError(f"variables must be a dict of collections or a params dict, got "
                     f"{type(variables).__name__}")
  if "params" in variables:
    return dict(variables)
  return {"params": variables}


def _check_masks(params: PyTree, masks: PyTree | None) -> dict[Path, Any]:
  """Validates that ``masks`` mirrors ``params``; returns {path: mask leaf or None}."""
  flat_p = {k: v for k, v in _flat(params).items() if v is not None}
  if masks is None:
    return {k: None for k in flat_p}
  flat_m = _flat(masks)
  out: dict[Path, Any] = {k: None for k in flat_p}
  for k, m in flat_m.items():
    if m is None:
      continue
    if k not in flat_p:
      raise MetricsError(f"mask leaf {'/'.join(k)!r} has no matching parameter")
    if tuple(jnp.shape(m)) != tuple(jnp.shape(flat_p[k])):
      raise MetricsError(f"mask leaf {'/'.join(k)!r} has shape {tuple(jnp.shape(m))}, parameter "
                       f"has shape {tuple(jnp.shape(flat_p[k]))}")
    out[k] = m
  return out


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
  try:
    shape = tuple(int(d) for d in input_shape)
  except TypeError as e:
    raise MetricsError(f"input_shape must be a sequence of ints (per example, no batch axis), "
                     f"got {input_shape!r}") from e
  if not shape or any(d <= 0 for d in shape):
    raise MetricsError(f"input_shape must be non-empty positive ints (per example, no batch axis), "
                     f"got {input_shape!r}")
  return shape


def _default_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
  """Puts the model in inference mode when its call takes a train/deterministic flag."""
  kwargs = dict(kwargs)
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return kwargs
  for name, value in (("train", False), ("training", False), ("deterministic", True)):
    if name in sig.parameters and name not in kwargs:
      kwargs[name] = value
  return kwargs


def _complete_variables(model: nn.Module, variables: dict[str, Any], x: jax.ShapeDtypeStruct,
                        kwargs: dict[str, Any]) -> dict[str, Any]:
  """Adds collections the model needs but ``variables`` lacks (e.g. batch_stats), as shapes."""
  try:
    shapes = jax.eval_shape(lambda xx: model.init(jax.random.key(0), xx, **kwargs), x)
  except Exception:  # pylint: disable=broad-except  # init is only a convenience here
    return variables
  out = dict(variables)
  for col, tree in shapes.items():
    if col not in out:
      out[col] = tree
  return out


def _leaf_size(x: Any) -> int:
  return int(np.prod(jnp.shape(x)))


def _kept(mask: Any) -> int:
  return int(np.count_nonzero(np.asarray(mask)))


def _out_arrays(out: Any) -> list[Any]:
  return [l for l in jax.tree.leaves(out) if hasattr(l, "shape") and hasattr(l, "dtype")]


# ----------------------------------------------------------------------------- tracing


@dataclasses.dataclass
class _Call:
  path: Path
  module: nn.Module
  in_shape: tuple[int, ...]        # with batch axis
  out_shape: tuple[int, ...] = ()  # with batch axis, first array output
  structured_flops: int | None = None


def _is_structured(module: nn.Module) -> bool:
  return callable(getattr(module, "flops_per_example", None))


def _make_recorder(calls: list[_Call]) -> Callable[..., Any]:
  """Interceptor recording the outermost call of each module (skipping nested self-calls and
  anything inside a structured module, which accounts for its own work)."""
  stack: list[tuple[Path, bool]] = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    path = tuple(module.path)
    inside = any(p == path or s for p, s in stack)
    if inside or not args or not hasattr(args[0], "shape"):
      stack.append((path, False))
      try:
        return next_fun(*args, **kwargs)
      finally:
        stack.pop()
    call = _Call(path, module, tuple(args[0].shape))
    calls.append(call)
    structured = _is_structured(module)
    if structured:
      try:
        call.structured_flops = int(module.flops_per_example(tuple(args[0].shape[1:])))
      except Exception as e:  # pylint: disable=broad-except
        raise MetricsError(f"{type(module).__name__}.flops_per_example({tuple(args[0].shape[1:])}) "
                         f"failed for layer {'/'.join(path)!r}: {e}") from e
    stack.append((path, structured))
    try:
      out = next_fun(*args, **kwargs)
    finally:
      stack.pop()
    arrays = _out_arrays(out)
    call.out_shape = tuple(arrays[0].shape) if arrays else ()
    return out

  return interceptor


def _trace(model: nn.Module, variables: dict[str, Any], input_shape: tuple[int, ...],
           kwargs: dict[str, Any]) -> list[_Call]:
  x = jax.ShapeDtypeStruct((1,) + input_shape, jnp.float32)
  variables = _complete_variables(model, variables, x, kwargs)
  calls: list[_Call] = []
  try:
    with nn.intercept_methods(_make_recorder(calls)):
      jax.eval_shape(lambda v, xx: model.apply(v, xx, **kwargs), variables, x)
  except MetricsError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # turn deep JAX errors into one line
    raise MetricsError(f"could not run {type(model).__name__} on an input of shape "
                     f"(1, *{input_shape}) (input_shape is per example, without the batch axis): "
                     f"{type(e).__name__}: {e}") from e
  return calls


# ----------------------------------------------------------------------------- layer table


def _subtree(params: Mapping[str, Any], path: Path) -> Any:
  node: Any = params
  for name in path:
    if not isinstance(node, Mapping) or name not in node:
      return None
    node = node[name]
  return node


def _kind(module: nn.Module, own: dict[str, Any], in_shape: tuple[int, ...],
          out_shape: tuple[int, ...]) -> str:
  if _is_structured(module):
    return "structured"
  if isinstance(module, (nn.Dense, nn.DenseGeneral)):
    return "dense"
  if isinstance(module, (nn.Conv, nn.ConvTranspose)):
    return "conv"
  if isinstance(module, _NORMS):
    return "norm"
  # Duck typing for user modules holding a plain 'kernel'.
  k = own.get("kernel")
  if k is not None and in_shape and out_shape:
    ks = jnp.shape(k)
    if len(ks) == 2 and ks[0] == in_shape[-1] and ks[1] == out_shape[-1]:
      return "dense"
    if len(ks) >= 3 and ks[-1] == out_shape[-1] and len(ks) == len(in_shape) - 1:
      return "conv"
  return "other"


def _leaf_flops(kind: str, module: nn.Module, own: dict[str, Any], in_shape: tuple[int, ...],
                out_shape: tuple[int, ...]) -> tuple[dict[str, int], int]:
  """FLOPs per example of one call: ({leaf name: flops}, flops not tied to a leaf)."""
  out_size = math.prod(out_shape[1:]) if out_shape else 0
  in_size = math.prod(in_shape[1:]) if in_shape else 0
  flops: dict[str, int] = {}
  if kind == "norm":
    return flops, in_size
  if kind not in ("dense", "conv") or "kernel" not in own:
    return flops, 0
  kernel = jnp.shape(own["kernel"])
  if kind == "dense":
    feats = getattr(module, "features", kernel[-1])
    n_out = math.prod(feats) if isinstance(feats, (tuple, list)) else int(feats)
    positions = out_size // max(n_out, 1)
  elif isinstance(module, nn.ConvTranspose):
    positions = in_size // max(kernel[-2], 1)
  else:
    positions = out_size // max(kernel[-1], 1)
  flops["kernel"] = math.prod(kernel) * positions
  if "bias" in own:
    # Conv-transpose bias is added at every *output* position.
    bias_positions = out_size // max(kernel[-1], 1) if kind == "conv" else positions
    flops["bias"] = _leaf_size(own["bias"]) * bias_positions
  return flops, 0


def layer_table(model: nn.Module, variables: PyTree, masks: PyTree | None,
                input_shape: Sequence[int], **apply_kwargs: Any) -> list[LayerInfo]:
  """Per-layer parameter / FLOP table of ``model`` under ``masks``, in forward order.

  Args:
    model: any ``flax.linen`` module.
    variables: ``{'params': ..., other collections}`` or a bare params tree.
    masks: mirrors params (bool arrays on prunable leaves, None elsewhere), or None (nothing
      prunable).
    input_shape: per-example input shape (no batch axis), e.g. ``(32, 32, 3)``.
    **apply_kwargs: passed to ``model.apply``; ``train=False`` / ``deterministic=True`` are
      added when the model's ``__call__`` takes them and they are not given.
  Returns:
    One ``LayerInfo`` per module that owns parameters; parameters owned by no called module get
    an ``other`` row named after their parent path (0 FLOPs), so rows add up to the totals.
  """
  if not isinstance(model, nn.Module):
    raise MetricsError(f"layer_table needs a flax.linen Module, got {type(model).__name__}")
  shape = _check_input_shape(input_shape)
  variables = _split_variables(variables)
  params = variables["params"]
  flat_masks = _check_masks(params, masks)
  kwargs = _default_kwargs(model.__call__, apply_kwargs)
  calls = _trace(model, variables, shape, kwargs)

  rows: dict[Path, dict[str, Any]] = {}
  owned: set[Path] = set()
  for call in calls:
    node = _subtree(params, call.path)
    if not isinstance(node, Mapping):
      continue
    structured = _is_structured(call.module)
    if structured:
      own = {k[len(call.path):]: v for k, v in _flat(params).items()
             if k[:len(call.path)] == call.path and v is not None}
    else:
      own = {(k,): v for k, v in node.items() if not isinstance(v, Mapping) and v is not None}
    if not own:
      continue
    own_named = {"/".join(k): v for k, v in own.items()}
    kind = _kind(call.module, own_named, call.in_shape, call.out_shape)
    row = rows.get(call.path)
    if row is None:
      row = rows[call.path] = dict(
          kind=kind, module=call.module, in_shape=call.in_shape, out_shape=call.out_shape,
          own=own, leaf_flops={}, extra_flops=0, bias_flops=0, calls=0)
      owned.update(call.path + k for k in own)
    row["calls"] += 1
    if structured:
      row["extra_flops"] += call.structured_flops or 0
      row["bias_flops"] += math.prod(call.out_shape[1:]) if call.out_shape else 0
    else:
      leaf, extra = _leaf_flops(kind, call.module, own_named, call.in_shape, call.out_shape)
      for k, v in leaf.items():
        row["leaf_flops"][k] = row["leaf_flops"].get(k, 0) + v
      row["extra_flops"] += extra

  # Parameters no traced module claimed (unused or created outside a call): 0-FLOP rows.
  for k, v in _flat(params).items():
    if v is None or k in owned:
      continue
    parent = k[:-1]
    row = rows.setdefault(parent, dict(kind="other", module=None, in_shape=(), out_shape=(),
                                       own={}, leaf_flops={}, extra_flops=0, bias_flops=0,
                                       calls=0))
    row["own"][k[-1:]] = v

  table = []
  for path, row in rows.items():
    own = row["own"]
    weights = kept = 0
    leaf_kept_flops = 0.0
    for rel, v in own.items():
      m = flat_masks.get(path + rel)
      name = "/".join(rel)
      f = row["leaf_flops"].get(name, 0)
      if m is None:
        leaf_kept_flops += f
        continue
      n, kk = _leaf_size(m), _kept(m)
      weights += n
      kept += kk
      leaf_kept_flops += f * kk / n if n else 0.0
    dens = kept / weights if weights else 1.0
    extra = row["extra_flops"]
    if row["kind"] == "structured":
      # Structured FLOPs include the bias (one FLOP per output element): only the rest follows
      # the density of the layer's prunable leaves.
      bias_f = 0
      if ("bias",) in own and flat_masks.get(path + ("bias",)) is None:
        bias_f = min(extra, row["bias_flops"])
      extra_kept = dens * (extra - bias_f) + bias_f
    else:
      extra_kept = extra  # norm work is never pruned
    total = int(sum(row["leaf_flops"].values()) + extra)
    module = row["module"]
    table.append(LayerInfo(
        name="/".join(path) if path else type(model).__name__,
        kind=row["kind"],
        module_type=type(module).__name__ if module is not None else "-",
        input_shape=tuple(row["in_shape"][1:]),
        output_shape=tuple(row["out_shape"][1:]),
        param_shapes={"/".join(k): tuple(jnp.shape(v)) for k, v in own.items()},
        params=sum(_leaf_size(v) for v in own.values()),
        weights=weights, kept=kept, density=float(dens), flops=total,
        flops_kept=float(leaf_kept_flops + extra_kept), calls=row["calls"]))
  return table


# ----------------------------------------------------------------------------- collapse


def _empty_layer(flat_masks: dict[Path, Any], order: Sequence[Path]) -> str | None:
  """First layer (forward order, then tree order) whose prunable leaves keep nothing."""
  groups: dict[Path, list[Any]] = {}
  for k, m in flat_masks.items():
    if m is not None:
      groups.setdefault(k[:-1], []).append(m)
  rank = {p: i for i, p in enumerate(order)}

  def key(p: Path) -> tuple[int, int]:
    # A layer's rank is that of its nearest traced ancestor-or-self.
    for n in range(len(p), -1, -1):
      if p[:n] in rank:
        return rank[p[:n]], 0
    return len(rank), 0

  for p in sorted(groups, key=key):
    ms = groups[p]
    if sum(_leaf_size(m) for m in ms) > 0 and sum(_kept(m) for m in ms) == 0:
      return "/".join(p)
  return None


def _connectivity_params(params: PyTree, flat_masks: dict[Path, Any]) -> PyTree:
  """Mask (0/1) on prunable leaves, 0 on biases, 1 on every other parameter (float64)."""
  def fn(p, x):
    if x is None:
      return None
    k = masks_lib.path_names(p)
    m = flat_masks.get(k)
    if m is not None:
      return jnp.asarray(m, jnp.float64)
    if k and k[-1] in _BIAS_NAMES:
      return jnp.zeros(jnp.shape(x), jnp.float64)
    return jnp.ones(jnp.shape(x), jnp.float64)
  return jax.tree_util.tree_map_with_path(fn, params, is_leaf=lambda x: x is None)


def _connectivity_state(tree: PyTree) -> PyTree:
  """Non-param collections: running means 0 (no offset paths), variances 1, the rest kept."""
  def fn(p, x):
    k = masks_lib.path_names(p)
    name = k[-1] if k else ""
    if name == "mean":
      return jnp.zeros(jnp.shape(x), jnp.float64)
    if name == "var":
      return jnp.ones(jnp.shape(x), jnp.float64)
    if isinstance(x, jax.ShapeDtypeStruct):
      return jnp.zeros(x.shape, x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(fn, tree)


def _make_normaliser(record: list[tuple[Path, Any]], owners: Callable[[Path], bool]):
  """Interceptor rescaling every module output to max |y| = 1 (keeps the zero pattern of a
  nonnegative, positively homogeneous forward while preventing overflow / underflow) and
  recording, in completion order, whether each parameter-owning layer's output is all zero."""
  stack: list[tuple[Path, bool]] = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    path = tuple(module.path)
    inside = any(p == path or s for p, s in stack)
    stack.append((path, _is_structured(module)))
    try:
      out = next_fun(*args, **kwargs)
    finally:
      stack.pop()
    if inside:
      return out

    def rescale(y):
      if not (hasattr(y, "dtype") and jnp.issubdtype(y.dtype, jnp.floating)):
        return y
      peak = jnp.max(jnp.abs(y)) if y.size else jnp.zeros((), y.dtype)
      return jnp.where(peak > 0, y / jnp.where(peak > 0, peak, 1), y)

    out = jax.tree.map(rescale, out)
    if owners(path):
      arrays = [a for a in _out_arrays(out) if jnp.issubdtype(a.dtype, jnp.floating)]
      if arrays:
        record.append((path, jnp.all(jnp.stack([jnp.all(a == 0) for a in arrays]))))
    return out

  return interceptor


def detect_collapse(apply_fn_or_model: nn.Module | Callable[[PyTree, jax.Array], Any],
                    params: PyTree, masks: PyTree | None, input_shape: Sequence[int],
                    **apply_kwargs: Any) -> tuple[bool, str | None]:
  """Layer collapse: some prunable layer keeps nothing, or no path joins input to output.

  Connectivity is a SynFlow-style forward in float64 with every prunable weight replaced by its
  mask (0/1), biases zeroed, every other parameter set to 1 (complex twiddles too: an all-ones
  butterfly connects every input to every output), norms in inference mode with running
  mean 0 / variance 1, and a (1, *input_shape) all-ones input. Every module output is rescaled to
  max 1, so R = Σ|outputs| is exactly 0 iff the net is disconnected, however deep or sparse it is.
  (Assumes zero-preserving activations and pooling, as in ReLU nets; the model must return
  pre-softmax outputs.) x64 is on for this call only, and the forward runs on
  ``bfprune.float64.float64_device()``: the default device on CPU / GPU, the host CPU where the
  default device has no float64 (TPU; masks and state are copied there).

  Args:
    apply_fn_or_model: a ``flax.linen`` Module (run as ``model.apply({'params': p, ...}, x,
      **apply_kwargs)``, inference flags added as in ``layer_table``), or a function
      ``fn(params, x) -> outputs`` already in inference mode.
    params: the params tree (or a full variables dict when a Module is given).
    masks: mirrors params; None means nothing is pruned.
    input_shape: per-example input shape, without the batch axis.
  Returns:
    ``(collapsed, layer)``: the empty layer's name, else the first layer (forward order) whose
    output is all zero, else None.
  """
  shape = _check_input_shape(input_shape)
  is_module = isinstance(apply_fn_or_model, nn.Module)
  if not is_module and not callable(apply_fn_or_model):
    raise MetricsError(f"detect_collapse needs a flax Module or a callable fn(params, x), got "
                     f"{type(apply_fn_or_model).__name__}")
  variables = _split_variables(params) if is_module else {"params": params}
  p = variables["params"]
  flat_masks = _check_masks(p, masks)
  owners = {k[:-1] for k, v in _flat(p).items() if v is not None}

  def owns(path: Path) -> bool:
    return path in owners

  record: list[tuple[Path, Any]] = []
  with float64_lib.float64_scope() as device:  # x64 for this call only, on a float64 device
    x = jnp.ones((1,) + shape, jnp.float64)
    new_p = _connectivity_params(p, float64_lib.place(flat_masks, device))
    if is_module:
      model = apply_fn_or_model
      kwargs = _default_kwargs(model.__call__, apply_kwargs)
      full = _complete_variables(model, variables, jax.ShapeDtypeStruct(x.shape, x.dtype), kwargs)
      state = float64_lib.place(
          {c: _connectivity_state(t) for c, t in full.items() if c != "params"}, device)
      run = lambda q, xx: model.apply({"params": q, **state}, xx, **kwargs)
    else:
      run = lambda q, xx: apply_fn_or_model(q, xx, **apply_kwargs)

    def forward(q, xx):
      record.clear()
      with nn.intercept_methods(_make_normaliser(record, owns)):
        out = run(q, xx)
      r = sum(jnp.sum(jnp.abs(a.astype(jnp.float64))) for a in _out_arrays(out))
      return r, [z for _, z in record]

    try:
      r, zeros = jax.jit(forward)(new_p, x)
    except Exception as e:  # pylint: disable=broad-except
      raise MetricsError(f"detect_collapse: forward pass on an all-ones input of shape "
                       f"(1, *{shape}) failed: {type(e).__name__}: {e}") from e
    r = float(r)
    zeros = [bool(z) for z in zeros]
  paths = [path for path, _ in record]

  empty = _empty_layer(flat_masks, _first_order(paths))
  if empty is not None:
    return True, empty
  if not math.isfinite(r):
    raise MetricsError(f"detect_collapse: connectivity forward gave non-finite R = {r}")
  if r > 0:
    return False, None
  for path, z in zip(paths, zeros):
    if z:
      return True, "/".join(path)
  return True, None


def _first_order(paths: Sequence[Path]) -> list[Path]:
  seen: dict[Path, None] = {}
  for p in paths:
    seen.setdefault(p, None)
  return list(seen)


# ----------------------------------------------------------------------------- summary


def summary(model: nn.Module, variables: PyTree, masks: PyTree | None,
            input_shape: Sequence[int], **apply_kwargs: Any) -> dict[str, Any]:
  """Whole-model metrics as a JSON-serialisable dict.

  Keys: ``params`` (all parameters), ``prunable``, ``kept``, ``density`` (kept / prunable),
  ``flops`` and ``flops_kept`` (per example), ``flop_density`` = Σ density_i·FLOPs_i / Σ FLOPs_i
  (unpruned parameters at density 1), ``layers`` (``LayerInfo.as_dict`` rows), ``collapsed``,
  ``collapsed_layer`` (str or None). Arguments as in ``layer_table``.
  """
  table = layer_table(model, variables, masks, input_shape, **apply_kwargs)
  params = _split_variables(variables)["params"]
  prunable = sum(r.weights for r in table)
  kept = sum(r.kept for r in table)
  flops = sum(r.flops for r in table)
  flops_kept = float(sum(r.flops_kept for r in table))
  collapsed, layer = detect_collapse(model, variables, masks, input_shape, **apply_kwargs)
  return {
      "params": count_params(params),
      "prunable": int(prunable),
      "kept": int(kept),
      "density": float(kept / prunable) if prunable else 1.0,
      "flops": int(flops),
      "flops_kept": flops_kept,
      "flop_density": flops_kept / flops if flops else 1.0,
      "layers": [r.as_dict() for r in table],
      "collapsed": bool(collapsed),
      "collapsed_layer": layer,
  }
