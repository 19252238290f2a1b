"""Real sparse inference: a pruned model's kernels as ``jax.experimental.sparse`` matrices.

Masked-dense inference costs as much as dense inference, whatever the density. Here every masked
kernel becomes a sparse matrix holding exactly its kept weights, and the forward passes of the
project's models (``FC``, ``VGG16`` without BatchNorm, inference mode) multiply by those matrices.

Layout (why the forward passes are written per model instead of intercepting ``nn.Dense`` /
``nn.Conv`` calls): the only fast sparse-times-dense product on CPU in JAX is BCSR with the sparse
matrix on the *left* (``bcsr_dot_general`` lowers to a native CSR kernel, ``cpu_csr_sparse_dense_ffi``;
BCOO and the BCSR fallback lower to an XLA gather + scatter-add that is 5-30x slower than dense).
So a layer computes ``h_out^T = W^T @ h_in^T``: activations are kept *feature-major*, (features,
batch) for dense layers and (C, N, H, W) for convs, from the first layer to the logits. A
flax interceptor would have to transpose the activations at every module boundary, and on this
CPU that transpose alone costs more than the sparse product it feeds (10000 x 784 inputs at
density 0.01: 38 ms transpose vs 13 ms product vs 67 ms dense matmul).

Sparse kernel format (``SparseKernel``): a kernel reshaped to 2-D, K (n_in, n_out) (a conv
kernel (kh, kw, Cin, Cout) is reshaped to (kh*kw*Cin, Cout), i.e. patch feature
``f = (i*kw + j)*Cin + c``), is stored transposed, restricted to the input rows that hold at least
one kept weight: ``matrix`` (n_out, n_rows) sparse, ``rows`` (n_rows,) the original input index of
each of its columns (``None`` when every input row is used, in order). Skipping unused rows means
unused input features / conv patch rows are never gathered: at low density most of a conv's
im2col matrix is never built.

Conv patches: the im2col matrix is built from shifted slices of the zero-padded (C, N, H, W)
activations in the (i, j, c) order above (matching an HWIO kernel's reshape). This is
``lax.conv_general_dilated_patches`` up to the order of the patch features — that function
orders them channel-major, ``f = c*kh*kw + i*kw + j`` — but on XLA CPU it is a grouped
convolution, 2-3x slower than slicing, so it is used only as an independent check in the tests.

Platforms: a BCSR product is XLA:CPU's CSR kernel on CPU and can be cuSPARSE / hipSPARSE on a GPU
(``native_lowering``); a TPU has no native sparse kernel. ``lower_native`` lowers a forward and
says which kernel it got, or why none. Sparse products multiply in full float32; the dense
same-layout path (plain kernels) follows JAX's default matmul precision (TF32 on recent NVIDIA
GPUs, bfloat16 passes on TPU), so compare against references computed under
``jax.default_matmul_precision("highest")``.

Only stride-1 "same" convolutions (the project's ``conv3x3``) and dense layers are supported.
``sparsify`` runs on host (its output shapes depend on the mask); the forward functions are pure
and jit-friendly (a ``SparseKernel`` is a pytree whose shapes are static).
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jax.experimental import sparse as jsparse

from bfprune.models import VGG16_PLAN
from bfprune.pruning.masks import path_names

PyTree = Any
FORMATS = ("bcsr", "bcoo")


@struct.dataclass
class SparseKernel:
  """A masked kernel as a sparse matrix (see the module docstring for the layout).

  matrix: ``jsparse.BCSR`` or ``jsparse.BCOO`` of shape (n_out, n_rows), the kept weights of
    the transposed 2-D kernel restricted to the used input rows; ``nse`` = kept count exactly.
  rows: (n_rows,) int32, the input index (2-D kernel row) of each matrix column, or None when
    the matrix has every input row in order (n_rows = n_in).
  kernel_shape: the original kernel shape, (n_in, n_out) or (kh, kw, Cin, Cout) (static).
  """
  matrix: Any
  rows: Optional[jax.Array]
  kernel_shape: tuple[int, ...] = struct.field(pytree_node=False)

  @property
  def nse(self) -> int:
    """Number of stored entries (= kept weights; no padding is stored)."""
    return int(self.matrix.nse)

  def todense(self) -> jax.Array:
    """The masked kernel back in its original shape (pruned weights are 0)."""
    n_in = int(np.prod(self.kernel_shape[:-1]))
    kt = self.matrix.todense()  # (n_out, n_rows)
    if self.rows is not None:
      kt = jnp.zeros((kt.shape[0], n_in), kt.dtype).at[:, self.rows].set(kt)
    return kt.T.reshape(self.kernel_shape)


def _sparse_kernel(kernel: np.ndarray, mask: np.ndarray, fmt: str) -> SparseKernel:
  """Host-side construction of one SparseKernel from a kernel and its boolean mask."""
  n_out = kernel.shape[-1]
  kt = kernel.reshape(-1, n_out).T  # (n_out, n_in)
  mt = mask.reshape(-1, n_out).T
  used = np.flatnonzero(mt.any(axis=0))
  all_rows = used.size == kt.shape[1]
  if used.size == 0:  # everything pruned: one (empty) column keeps the shapes non-degenerate
    used = np.zeros(1, np.int64)
  r, c = np.nonzero(mt)  # C order: sorted by output row, then input index (CSR order)
  data = kt[r, c]
  col = np.searchsorted(used, c).astype(np.int32)  # compacted column index
  shape = (n_out, used.size)
  if fmt == "bcsr":
    indptr = np.zeros(n_out + 1, np.int32)
    np.cumsum(np.bincount(r, minlength=n_out), out=indptr[1:])
    matrix = jsparse.BCSR((jnp.asarray(data), jnp.asarray(col), jnp.asarray(indptr)),
                          shape=shape, indices_sorted=True, unique_indices=True)
  else:
    idx = np.stack([r.astype(np.int32), col], axis=1)
    matrix = jsparse.BCOO((jnp.asarray(data), jnp.asarray(idx)), shape=shape,
                          indices_sorted=True, unique_indices=True)
  rows = None if all_rows else jnp.asarray(used.astype(np.int32))
  return SparseKernel(matrix=matrix, rows=rows, kernel_shape=tuple(kernel.shape))


def sparsify(params: PyTree, masks: PyTree, fmt: str = "bcsr") -> PyTree:
  """Replaces every masked kernel of ``params`` by a ``SparseKernel`` of ``kernel * mask``.

  Args:
    params: a Flax ``params`` pytree (nested dicts of arrays).
    masks: mirrors ``params``; boolean arrays on the kernels to sparsify, ``None`` elsewhere.
      Masked leaves must be 2-D (dense, (n_in, n_out)) or 4-D (conv, (kh, kw, Cin, Cout)).
    fmt: ``"bcsr"`` (default; the fast one on CPU) or ``"bcoo"``.

  Returns:
    The params pytree with masked leaves replaced (unmasked leaves are the same objects).
    Stored entries equal the mask's kept count exactly, weights that happen to be 0 included.
    Runs on host: not jittable (the number of stored entries depends on the mask's values).
  """
  if fmt not in FORMATS:
    raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
  p_leaves, treedef = jax.tree.flatten_with_path(params)
  m_leaves, m_treedef = jax.tree.flatten(masks, is_leaf=lambda x: x is None)
  if m_treedef != treedef:
    raise ValueError("masks must mirror params (same nested keys, None on unmasked leaves)")
  out = []
  for (path, p), m in zip(p_leaves, m_leaves):
    name = "/".join(path_names(path))
    if m is None:
      out.append(p)
      continue
    p, m = np.asarray(p), np.asarray(m)
    if m.shape != p.shape or m.dtype != np.bool_:
      raise ValueError(f"{name}: mask must be a boolean array of the kernel's shape {p.shape}, "
                       f"got {m.dtype} {m.shape}")
    if p.ndim not in (2, 4):
      raise ValueError(f"{name}: only 2-D dense and 4-D conv kernels can be sparsified, got a "
                       f"{p.ndim}-D leaf {p.shape} (e.g. pruned butterfly twiddles are not)")
    out.append(_sparse_kernel(p, m, fmt))
  return jax.tree.unflatten(treedef, out)


def stored_entries(sparse_params: PyTree) -> int:
  """Total entries stored in the ``SparseKernel`` leaves of a sparsified params pytree."""
  leaves = jax.tree.leaves(sparse_params, is_leaf=lambda x: isinstance(x, SparseKernel))
  return sum(x.nse for x in leaves if isinstance(x, SparseKernel))


def densify(sparse_params: PyTree) -> PyTree:
  """Inverse of ``sparsify``: SparseKernel leaves back to dense masked kernels."""
  return jax.tree.map(lambda x: x.todense() if isinstance(x, SparseKernel) else x,
                      sparse_params, is_leaf=lambda x: isinstance(x, SparseKernel))


# --- native kernels per platform -------------------------------------------------------------

# Custom-call targets of the native sparse x dense kernels a BCSR product lowers to: XLA:CPU's CSR
# kernel, and cuSPARSE / hipSPARSE on GPU (JAX uses those only under its
# ``jax_bcoo_cusparse_lowering`` flag, off by default, and only with a GPU jaxlib). Everywhere
# else (TPU, GPU without the flag) a BCSR product lowers to XLA's generic gather + scatter-add,
# which is slower than the dense product it replaces and so is not "sparse inference".
NATIVE_KERNELS = ("cpu_csr_sparse_dense_ffi", "cusparse_csr_matmat_ffi", "cusparse_csr_matvec_ffi",
                  "hipsparse_csr_matmat_ffi", "hipsparse_csr_matvec_ffi")
_CUSTOM_CALL = re.compile(r"custom_call\s*@([\w.$-]+)")


@contextlib.contextmanager
def native_lowering() -> Iterator[None]:
  """Within the block, BCSR products lower to cuSPARSE / hipSPARSE on GPU (on CPU they always use
  XLA:CPU's CSR kernel; elsewhere nothing changes).

  The flag is read when a function is lowered and is not part of jit's cache key: trace and lower
  a *fresh* function inside the block (``lower_native`` does), not one already compiled outside.
  """
  old = jax.config.jax_bcoo_cusparse_lowering
  jax.config.update("jax_bcoo_cusparse_lowering", True)
  try:
    yield
  finally:
    jax.config.update("jax_bcoo_cusparse_lowering", old)


def native_kernel_calls(module_text: str) -> list[str]:
  """The native sparse kernels (``NATIVE_KERNELS``) called in a lowered module's text, in order."""
  return [t for t in _CUSTOM_CALL.findall(module_text) if t in NATIVE_KERNELS]


def sparse_products(tree: PyTree) -> int:
  """Number of non-empty ``SparseKernel`` leaves in ``tree``, each one sparse product in a
  forward (empty ones are skipped by ``linear_fm`` / ``conv_fm``; BCOO ones count too, and never
  lower to a native kernel)."""
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, SparseKernel))
  return sum(1 for x in leaves if isinstance(x, SparseKernel) and x.nse > 0)


def lower_native(fn: Callable[..., Any], *args: Any, platform: Optional[str] = None
                 ) -> tuple[Optional[jax.stages.Lowered], str]:
  """Lowers ``jax.jit(fn)(*args)`` with native sparse kernels and checks that it got them.

  Args:
    fn: a forward over sparsified params, e.g. ``fc_apply_sparse``, using each non-empty
      ``SparseKernel`` in ``args`` once (only BCSR ones can lower to a native kernel).
    platform: lower for this platform ("cpu", "cuda", "rocm", "tpu"; a cross-platform lowering,
      e.g. to check a GPU from a CPU-only install), or None: where ``args`` live.

  Returns:
    ``(lowered, kernel)`` when every non-empty sparse product in ``args`` lowered to a native kernel
    (``kernel`` names it, or says that there is no product); ``(None, why)`` when the platform
    has none (the lowering failed, e.g. a CPU-only jaxlib has no cuSPARSE, or fell back to XLA's
    generic gather + scatter-add), ``why`` one line.
  """
  where = platform or jax.default_backend()
  with native_lowering():
    traced = jax.jit(lambda *a: fn(*a)).trace(*args)  # a fresh function: see native_lowering
    try:
      lowered = (traced.lower() if platform is None
                 else traced.lower(lowering_platforms=(platform,)))
    except Exception as e:  # pylint: disable=broad-except  # a missing GPU library, any kind
      msg = " ".join(f"{type(e).__name__}: {e}".split())[:200]
      return None, f"no native sparse kernel on {where} in this jaxlib (lowering failed: {msg})"
  needed = sparse_products(args)
  calls = native_kernel_calls(lowered.as_text())
  if len(calls) < needed:
    return None, (f"sparse products lower to XLA's generic gather + scatter-add on {where} "
                  f"({len(calls)} of {needed} use a native sparse kernel): not sparse inference")
  return lowered, (", ".join(sorted(set(calls))) if calls else "no sparse products")


# --- feature-major layers --------------------------------------------------------------------


def linear_fm(kernel: SparseKernel | jax.Array, h: jax.Array) -> jax.Array:
  """``(h^T @ K)^T`` for feature-major h (n_in, batch) -> (n_out, batch), no bias.

  A SparseKernel gathers its used input rows and multiplies its sparse matrix; a dense
  kernel K (n_in, n_out) is contracted over its first axis (the masked-dense same-layout path).
  """
  if not isinstance(kernel, SparseKernel):
    return lax.dot_general(kernel, h, (((0,), (0,)), ((), ())))
  if kernel.matrix.nse == 0:  # static: a collapsed layer outputs zeros
    return jnp.zeros((kernel.matrix.shape[0],) + h.shape[1:], h.dtype)
  if kernel.rows is not None:
    h = jnp.take(h, kernel.rows, axis=0)
  return kernel.matrix @ h


def _same_padding(k: int) -> tuple[int, int]:
  """Stride-1 'SAME' padding of a window of size k (as ``lax.padtype_to_pads``)."""
  return (k - 1) // 2, k - 1 - (k - 1) // 2


def conv_patches(x: jax.Array, kernel_size: tuple[int, int],
                 rows: Optional[jax.Array] = None) -> jax.Array:
  """im2col of a feature-major image batch for a stride-1 'SAME' convolution.

  Args:
    x: (C, N, H, W).
    kernel_size: (kh, kw).
    rows: optional (n_rows,) int indices of the patch features to build (default: all).

  Returns:
    (kh*kw*C or n_rows, N, H, W): feature ``f = (i*kw + j)*C + c`` is
    ``x_padded[c, :, i:i+H, j:j+W]`` (so ``patches.reshape(F, -1).T @ K.reshape(F, Cout)`` is
    the convolution with an HWIO kernel K).
  """
  c, n, h, w = x.shape
  kh, kw = kernel_size
  xp = jnp.pad(x, ((0, 0), (0, 0), _same_padding(kh), _same_padding(kw)))
  if rows is None:
    return jnp.concatenate([xp[:, :, i:i + h, j:j + w] for i in range(kh) for j in range(kw)])
  shift, ch = jnp.divmod(rows, c)
  i, j = jnp.divmod(shift, kw)
  one = lambda ci, ii, jj: lax.dynamic_slice(xp, (ci, 0, ii, jj), (1, n, h, w))[0]
  return jax.vmap(one)(ch, i, j)


def conv_fm(kernel: SparseKernel | jax.Array, x: jax.Array) -> jax.Array:
  """Stride-1 'SAME' convolution of feature-major x (Cin, N, H, W) -> (Cout, N, H, W), no bias.

  kernel: a SparseKernel of a (kh, kw, Cin, Cout) kernel, or the dense HWIO kernel itself.
  """
  kshape = kernel.kernel_shape if isinstance(kernel, SparseKernel) else kernel.shape
  if len(kshape) != 4 or kshape[2] != x.shape[0]:
    raise ValueError(f"conv kernel {kshape} does not fit input channels {x.shape[0]}")
  kh, kw, cin, cout = kshape
  _, n, h, w = x.shape
  if isinstance(kernel, SparseKernel):
    if kernel.matrix.nse == 0:
      return jnp.zeros((cout, n, h, w), x.dtype)
    patches = conv_patches(x, (kh, kw), kernel.rows)
    y = kernel.matrix @ patches.reshape(patches.shape[0], n * h * w)
  else:
    patches = conv_patches(x, (kh, kw))
    y = linear_fm(kernel.reshape(kh * kw * cin, cout), patches.reshape(-1, n * h * w))
  return y.reshape(cout, n, h, w)


def _pool_fm(x: jax.Array, kind: str) -> jax.Array:
  """2x2 stride-2 VALID max / average pool over the last two axes of (C, N, H, W)."""
  if kind == "max":
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
  return lax.reduce_window(x, 0.0, lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4.0


def _bias(layer: dict, name: str, n_out: int) -> jax.Array | None:
  b = layer.get("bias")
  if b is not None and jnp.shape(b) != (n_out,):
    raise ValueError(f"{name}/bias has shape {jnp.shape(b)}, expected ({n_out},)")
  return b


def _layer(sparse_params: PyTree, name: str, ndim: int) -> dict:
  """The params dict of layer ``name`` with a kernel of ``ndim`` dims (SparseKernel or array)."""
  layer = sparse_params.get(name) if isinstance(sparse_params, dict) else None
  if not isinstance(layer, dict) or "kernel" not in layer:
    raise ValueError(f"params have no layer {name!r} with a 'kernel' (only models built from "
                     "plain dense / conv layers are supported, e.g. no butterfly head)")
  k = layer["kernel"]
  shape = k.kernel_shape if isinstance(k, SparseKernel) else jnp.shape(k)
  if len(shape) != ndim:
    raise ValueError(f"{name}/kernel has shape {shape}, expected a {ndim}-D kernel")
  extra = set(layer) - {"kernel", "bias"}
  if extra:
    raise ValueError(f"{name} has unsupported params {sorted(extra)}")
  return layer


def _dense_fm(sparse_params: PyTree, name: str, h: jax.Array) -> jax.Array:
  layer = _layer(sparse_params, name, 2)
  k = layer["kernel"]
  n_in, n_out = k.kernel_shape if isinstance(k, SparseKernel) else k.shape
  if n_in != h.shape[0]:
    raise ValueError(f"{name}: kernel expects {n_in} input features, got {h.shape[0]}")
  y = linear_fm(k, h)
  b = _bias(layer, name, n_out)
  return y if b is None else y + b[:, None]


def _numbered(sparse_params: PyTree, prefix: str) -> list[str]:
  """Layer names ``prefix1, prefix2, ...`` present at the top level, in numeric order."""
  names = [k for k in sparse_params if re.fullmatch(rf"{prefix}\d+", k)]
  names.sort(key=lambda k: int(k[len(prefix):]))
  if names != [f"{prefix}{i + 1}" for i in range(len(names))]:
    raise ValueError(f"layers {names} are not numbered {prefix}1..{prefix}{len(names)}")
  return names


def fc_apply_sparse(sparse_params: PyTree, x: jax.Array) -> jax.Array:
  """Inference forward of ``models.FC`` (ReLU MLP, no dropout) on sparsified params.

  Args:
    sparse_params: ``sparsify`` output (or plain params: the masked-dense same-layout path) of
      an FC with layers ``fc1..fcK`` and ``head``, dense layers only.
    x: (batch, ...) flattened to (batch, n_in), e.g. (batch, 28, 28, 1).

  Returns:
    Logits (batch, num_classes), equal to ``FC.apply({'params': densify(sp)}, x, train=False)``.
  """
  if not isinstance(sparse_params, dict):
    raise ValueError("sparse_params must be a dict of layers (a Flax params collection)")
  names = _numbered(sparse_params, "fc")
  extra = set(sparse_params) - set(names) - {"head"}
  if extra:
    raise ValueError(f"unexpected layers for an FC model: {sorted(extra)}")
  h = x.reshape(x.shape[0], -1).T  # (n_in, batch): the only input transpose
  for name in names:
    h = jax.nn.relu(_dense_fm(sparse_params, name, h))
  return _dense_fm(sparse_params, "head", h).T


def vgg16_apply_sparse(sparse_params: PyTree, x: jax.Array,
                       plan: Sequence[int | str] = VGG16_PLAN) -> jax.Array:
  """Inference forward of ``models.VGG16`` without BatchNorm (no dropout) on sparsified params.

  Args:
    sparse_params: ``sparsify`` output (or plain params: the same-layout dense im2col path) of a
      VGG16 with plain 3x3 conv layers ``conv1..convK`` (K = number of ints in ``plan``) and a
      dense ``head``.
    x: NHWC images (batch, H, W, C).
    plan: the model's plan (ints = conv widths, "M" = 2x2 max-pool), as ``VGG16.plan``.

  Returns:
    Logits (batch, num_classes), equal to ``VGG16(plan=plan).apply({'params': densify(sp)}, x,
    train=False)``: convs + ReLU per plan, 2x2 average pool, flatten (NHWC order), head.
  """
  if not isinstance(sparse_params, dict):
    raise ValueError("sparse_params must be a dict of layers (a Flax params collection)")
  if x.ndim != 4:
    raise ValueError(f"x must be NHWC (batch, H, W, C), got shape {x.shape}")
  names = _numbered(sparse_params, "conv")
  widths = [int(item) for item in plan if item != "M"]
  if len(widths) != len(names):
    raise ValueError(f"plan has {len(widths)} convs but params have {len(names)} "
                     f"(BatchNorm or non-conv layers are not supported)")
  extra = set(sparse_params) - set(names) - {"head"}
  if extra:
    raise ValueError(f"unexpected layers for a VGG16 without BatchNorm: {sorted(extra)}")
  h = jnp.transpose(x, (3, 0, 1, 2))  # (C, N, H, W): the only input transpose
  i = 0
  for item in plan:
    if item == "M":
      h = _pool_fm(h, "max")
      continue
    i += 1
    name = f"conv{i}"
    layer = _layer(sparse_params, name, 4)
    cout = (layer["kernel"].kernel_shape if isinstance(layer["kernel"], SparseKernel)
            else layer["kernel"].shape)[-1]
    if cout != int(item):
      raise ValueError(f"{name} has {cout} output channels, plan says {item}")
    h = conv_fm(layer["kernel"], h)
    b = _bias(layer, name, cout)
    h = jax.nn.relu(h if b is None else h + b[:, None, None, None])
  h = _pool_fm(h, "avg")
  c, n, hh, ww = h.shape
  h = jnp.transpose(h, (2, 3, 0, 1)).reshape(hh * ww * c, n)  # NHWC flatten order (h, w, c)
  return _dense_fm(sparse_params, "head", h).T
