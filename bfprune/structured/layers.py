"""Structured Flax layers: ButterflyDense, KMatrixDense, FactorizedDense, KOPS2D.

All twiddles follow the layout of ``bfprune.structured.butterfly`` and are params named
``twiddle`` (not prunable by default; ``masks.is_kernel_or_twiddle`` selects them). KOPS2D's
spatial kernel is a real param named ``kernel`` (prunable like a conv kernel).

FLOP convention (``flops_per_example``, multiply-adds): dense ``in * out``; a butterfly factor
``2 n`` per stack, so a butterfly of ``b`` blocks, ``c`` stacks, size ``n`` costs
``c * b * log2(n) * 2n``; bias ``out``. A multiply-add with complex numbers counts as 4 real
ones (also for a complex twiddle acting on a real input, an upper bound).

Implementation switch: every layer has ``impl`` ("auto" default, "cpu", "generic"), passed
to ``butterfly_multiply``: "auto" lowers the CPU-tuned passes on CPU and the portable ones on
GPU / TPU; the other two force one (tests run both on CPU).

Complex twiddles and optimizers: for a real loss, ``jax.grad`` w.r.t. a complex parameter
returns the *conjugate* of the steepest-ascent direction, and optax (which does not conjugate)
would then climb along the imaginary parts. Every complex twiddle is therefore used through
``descent_grad``, an identity whose VJP conjugates the cotangent, so the gradient a stock
optimizer sees is ``dL/dRe + i dL/dIm``. Consequence: forward-mode AD (``jax.jvp``) through a
complex twiddle is unsupported (reverse mode, reverse-over-reverse and forward-over-reverse
Hessian-vector products work).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bfprune.structured import inits
from bfprune.structured.butterfly import butterfly_multiply, butterfly_to_dense, check_impl

Dtype = Any
Initializer = Callable[..., jax.Array]
TwiddleInit = inits.TwiddleInit

# As the VGG conv it replaces (torch kaiming_normal_: fan_in = kh * kw * Cin, gain sqrt 2).
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


@jax.custom_vjp
def descent_grad(t: jax.Array) -> jax.Array:
  """Identity; its VJP conjugates the cotangent (see module docstring)."""
  return t


descent_grad.defvjp(lambda t: (t, None), lambda _, g: (jnp.conj(g),))


def padded_size(m: int) -> int:
  """Smallest power of 2 that is >= max(m, 2) (the butterfly size for an input of size m)."""
  if m < 1:
    raise ValueError(f"input size must be >= 1, got {m}")
  return max(2, 1 << (m - 1).bit_length())


def _log2(n: int) -> int:
  return n.bit_length() - 1


def _is_complex(dtype: Dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.complexfloating)


def _complex_dtype(dtype: Dtype) -> Dtype:
  return jnp.result_type(dtype, jnp.complex64)


def _resolve_init(init: str | TwiddleInit, increasing_stride: bool, who: str) -> TwiddleInit:
  """Looks up ``init`` and checks a DFT init matches the stride direction it is built for."""
  if isinstance(init, str):
    need = inits.REQUIRED_STRIDE.get(init)
    if need is not None and need != increasing_stride:
      raise ValueError(
          f"{who}: init {init!r} is an {'increasing' if need else 'decreasing'}-stride "
          f"butterfly, but increasing_stride={increasing_stride}")
  return inits.get(init)


def _use_twiddle(t: jax.Array) -> jax.Array:
  return descent_grad(t) if _is_complex(t.dtype) else t


# ----------------------------------------------------------------------------- dense layers


def _dense_layout(in_features: int, features: int) -> tuple[int, int, int]:
  """(n, log2 n, nstacks) of a butterfly dense layer in_features -> features."""
  if features < 1:
    raise ValueError(f"features must be >= 1, got {features}")
  n = padded_size(in_features)
  return n, _log2(n), -(-features // n)


def _dense_flops(input_shape: Sequence[int], features: int, nblocks: int, complex_: bool,
                 use_bias: bool) -> int:
  """Multiply-adds per example of a butterfly dense layer applied along the last axis."""
  if len(input_shape) < 1:
    raise ValueError("input_shape must end with the feature axis, got ()")
  n, log_n, nstacks = _dense_layout(int(input_shape[-1]), features)
  per_vector = nstacks * nblocks * log_n * 2 * n * (4 if complex_ else 1)
  per_vector += features if use_bias else 0
  return int(math.prod(input_shape[:-1])) * per_vector


def _butterfly_dense(mdl: nn.Module, x: jax.Array, nblocks: int, increasing_stride: bool,
                     init: str | TwiddleInit, complex_twiddle: bool, bit_reversal: bool
                     ) -> jax.Array:
  """Shared body of the dense layers; creates params ``twiddle`` and ``bias`` on ``mdl``.

  x: (..., in) -> (..., features): zero-pad to n, (bit-reverse), butterfly with
  ceil(features / n) stacks, keep the first ``features`` outputs, add the bias.
  """
  who = type(mdl).__name__
  impl = check_impl(mdl.impl, who)
  if x.ndim < 1:
    raise ValueError(f"{who}: input must have a feature axis, got a scalar")
  if nblocks < 1:
    raise ValueError(f"{who}: nblocks must be >= 1, got {nblocks}")
  in_features = x.shape[-1]
  n, log_n, nstacks = _dense_layout(in_features, mdl.features)
  init_fn = _resolve_init(init, increasing_stride, who)
  if init == "random":
    # Zero padding keeps only in/n of the input power; give it back so the output variance
    # matches the per-input variance (LeCun-like gain).
    init_fn = inits.scaled(init_fn, math.sqrt(n / in_features))
  dtype = _complex_dtype(mdl.param_dtype) if complex_twiddle else mdl.param_dtype
  twiddle = mdl.param("twiddle", init_fn, (nstacks, nblocks, log_n, n // 2, 2, 2), dtype)
  lead = x.shape[:-1]
  x2 = x.reshape((-1, in_features))
  if n != in_features:
    x2 = jnp.pad(x2, ((0, 0), (0, n - in_features)))
  if bit_reversal:
    x2 = x2[:, inits.bit_reversal(n)]
  y = butterfly_multiply(_use_twiddle(twiddle), x2, increasing_stride, impl)[:, :mdl.features]
  if _is_complex(y.dtype) and not getattr(mdl, "return_complex", False):
    y = y.real
  if mdl.use_bias:
    y = y + mdl.param("bias", mdl.bias_init, (mdl.features,), mdl.param_dtype)
  return y.reshape((*lead, mdl.features))


class ButterflyDense(nn.Module):
  """Dense layer with a butterfly weight: (..., in) -> (..., features), any in and features.

  The input is zero-padded to n = next power of 2 >= in, multiplied by ``ceil(features / n)``
  stacked n x n butterflies (param ``twiddle`` (nstacks, nblocks, log2 n, n/2, 2, 2)), cut to
  ``features``, plus ``bias`` (features,). Equivalently ``y = x_pad @ M.T[:, :features] + b``
  with ``M = butterfly_to_dense(twiddle, increasing_stride)``.

  Attributes:
    twiddle_init: twiddle init name (``inits.INITS``) or callable (``init`` would shadow
      ``Module.init``). ``'random'`` is scaled by
      sqrt(n / in) to undo the padding. ``'fft'`` needs ``increasing_stride=True``, makes the
      twiddles complex and bit-reverses the input, so the layer computes the DFT of the padded
      input (first ``features`` frequencies; with nblocks > 1 the extra blocks start as identity).
    complex_twiddle: complex twiddles; None means "iff twiddle_init is a DFT init".
    return_complex: with complex twiddles, return the complex output (default: its real part,
      what a real network needs; the bias is real either way).
    bit_reversal: permute the padded input by bit reversal first; None means
      "iff twiddle_init='fft'".
    impl: butterfly implementation, "auto" (by platform), "cpu" or "generic" (see
      ``butterfly.butterfly_multiply``); same function either way.
  """
  features: int
  nblocks: int = 1
  increasing_stride: bool = True
  use_bias: bool = True
  twiddle_init: str | TwiddleInit = "random"
  complex_twiddle: Optional[bool] = None
  return_complex: bool = False
  bit_reversal: Optional[bool] = None
  param_dtype: Dtype = jnp.float32
  bias_init: Initializer = nn.initializers.zeros
  impl: str = "auto"

  def _complex(self) -> bool:
    if self.complex_twiddle is not None:
      return self.complex_twiddle
    return isinstance(self.twiddle_init, str) and self.twiddle_init in inits.COMPLEX_INITS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    bit_rev = self.twiddle_init == "fft" if self.bit_reversal is None else self.bit_reversal
    return _butterfly_dense(self, x, self.nblocks, self.increasing_stride, self.twiddle_init,
                            self._complex(), bit_rev)

  def flops_per_example(self, input_shape: Sequence[int]) -> int:
    """Multiply-adds for one example of shape ``input_shape`` (..., in)."""
    return _dense_flops(input_shape, self.features, self.nblocks, self._complex(),
                        self.use_bias)


class KMatrixDense(nn.Module):
  """K-matrix dense layer: (..., in) -> (..., features), weight B2 B1 per width unit.

  A decreasing-stride butterfly followed by an increasing-stride one (B B*-shaped), i.e. the
  butterfly layout with ``nblocks = 2 * width`` and ``increasing_stride=False`` (blocks
  alternate direction). Padding, stacking, cutting and params as ``ButterflyDense``.
  Real twiddles (twiddle_init 'random', 'orthogonal', 'identity' or a callable). ``impl``
  as in ``ButterflyDense``.
  """
  features: int
  width: int = 1
  use_bias: bool = True
  twiddle_init: str | TwiddleInit = "random"
  param_dtype: Dtype = jnp.float32
  bias_init: Initializer = nn.initializers.zeros
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.width < 1:
      raise ValueError(f"KMatrixDense: width must be >= 1, got {self.width}")
    return _butterfly_dense(self, x, 2 * self.width, False, self.twiddle_init, False, False)

  def flops_per_example(self, input_shape: Sequence[int]) -> int:
    """Multiply-adds for one example of shape ``input_shape`` (..., in)."""
    return _dense_flops(input_shape, self.features, 2 * self.width, False, self.use_bias)


class FactorizedDense(nn.Module):
  """KMatrixDense when the layer is square (in == features), ButterflyDense otherwise.

  The input size is only known at call time, so the choice is made there; params are those
  of the chosen layer (``twiddle``, ``bias``). ``impl`` as in ``ButterflyDense``.
  """
  features: int
  width: int = 1
  nblocks: int = 1
  use_bias: bool = True
  twiddle_init: str | TwiddleInit = "random"
  param_dtype: Dtype = jnp.float32
  bias_init: Initializer = nn.initializers.zeros
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim >= 1 and x.shape[-1] == self.features:
      return _butterfly_dense(self, x, 2 * self.width, False, self.twiddle_init, False, False)
    return _butterfly_dense(self, x, self.nblocks, True, self.twiddle_init, False, False)

  def flops_per_example(self, input_shape: Sequence[int]) -> int:
    """Multiply-adds for one example of shape ``input_shape`` (..., in)."""
    square = len(input_shape) >= 1 and input_shape[-1] == self.features
    return _dense_flops(input_shape, self.features, 2 * self.width if square else self.nblocks,
                        False, self.use_bias)


# ----------------------------------------------------------------------------- KOPS2D


class _Twiddle(nn.Module):
  """Holds one square butterfly's ``twiddle`` (1, nblocks, log2 n, n/2, 2, 2)."""
  n: int
  nblocks: int
  twiddle_init: TwiddleInit
  dtype: Dtype

  @nn.compact
  def __call__(self) -> jax.Array:
    shape = (1, self.nblocks, _log2(self.n), self.n // 2, 2, 2)
    return _use_twiddle(self.param("twiddle", self.twiddle_init, shape, self.dtype))


def _check_spatial(who: str, h: int, w: int) -> None:
  for name, s in (("height", h), ("width", w)):
    if s < 2 or s & (s - 1):
      raise ValueError(f"{who}: spatial {name} {s} must be a power of 2 >= 2 (the butterfly "
                       "transforms are radix-2); resize or pad the input")


def _matmul_axis(m: jax.Array, x: jax.Array, axis: int) -> jax.Array:
  """Applies m (n_out, n) along ``axis`` of x: y[..., u, ...] = sum_h m[u, h] x[..., h, ...]."""
  return jnp.moveaxis(jnp.tensordot(m, x, axes=([1], [axis])), 0, axis)


def _butterfly_axis(t: jax.Array, x: jax.Array, axis: int, increasing: bool,
                    impl: str) -> jax.Array:
  """Applies the butterfly ``t`` along ``axis`` of x without materialising it."""
  xm = jnp.moveaxis(x, axis, -1)
  y = butterfly_multiply(t, xm.reshape((-1, xm.shape[-1])), increasing, impl)
  return jnp.moveaxis(y.reshape(xm.shape), -1, axis)


def _complex_block(m: jax.Array) -> jax.Array:
  """Complex (a, b) -> real (2a, 2b) acting on planar (re, im): rows (re/im, i), cols (re/im, j)."""
  blk = jnp.stack([jnp.stack([m.real, -m.imag], 1), jnp.stack([m.imag, m.real], 1)], 0)
  return blk.reshape(2 * m.shape[0], 2 * m.shape[1])   # [[Re, -Im], [Im, Re]]


def _shared_bmm(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  """lhs (m, k) applied to every rhs[i] (k, N): (B, k, N) -> (B, m, N), as one batched GEMM."""
  lb = jnp.broadcast_to(lhs, (rhs.shape[0],) + lhs.shape)
  return jax.lax.dot_general(lb, rhs, (((2,), (1,)), ((0,), (0,))))


def _kops_dense(x: jax.Array, mats: dict[str, jax.Array], coef: jax.Array,
                kernel: jax.Array) -> jax.Array:
  """KOPS2D with materialised (H x H, W x W) transforms, in real "planar" arithmetic.

  x (B, H, W, Cin) real; mats: complex input_h/input_w (forward) and output_h/output_w
  (inverse) matrices acting as y = M x; coef (HW, kh kw) complex maps kernel taps to
  frequencies; kernel (kh kw, Cin Cout). Returns Re(out) (B, H, W, Cout).

  Why this layout (measured on CPU: 1.2-1.8x faster per layer than complex einsums in NHWC):
  XLA's complex dots are several times slower than real ones, so complex values are kept as
  separate real and imaginary planes; activations are frequency-major (H, W, B, C) so the
  per-frequency product is one batched GEMM and every transform contracts a leading axis
  (no transposes inside XLA's dots); only the real part of the last transform is computed.
  """
  b, h, w, cin = x.shape
  cout = kernel.shape[1] // cin
  hw = h * w
  # Per-frequency kernels Re, Im and Re + Im (for the 3-multiplication complex product).
  cr, ci = coef.real, coef.imag
  k3 = (jnp.concatenate([cr, ci, cr + ci], 0).astype(kernel.dtype) @ kernel
        ).reshape(3, hw, cin, cout)
  # H transform of the real input: rows (u, re/im).
  mh = mats["input_h"]
  xt = jnp.transpose(x, (1, 2, 0, 3)).reshape(h, w * b * cin)
  t = (jnp.stack([mh.real, mh.imag], 1).reshape(2 * h, h).astype(x.dtype) @ xt)
  t = t.reshape(h, 2 * w, b * cin)                        # (u, (re/im, w), (b, c))
  # W transform, complex on planar data, batched over u: -> (u, (re/im, v), (b, c)).
  s = _shared_bmm(_complex_block(mats["input_w"]).astype(x.dtype), t).reshape(h, 2, w, b, cin)
  xr, xi = s[:, 0].reshape(hw, b, cin), s[:, 1].reshape(hw, b, cin)
  # Per-frequency product Y = X K with 3 real batched GEMMs (Gauss).
  def bmm(a, k):
    return jax.lax.dot_general(a, k, (((2,), (1,)), ((0,), (0,))))
  t1, t2, t3 = bmm(xr, k3[0]), bmm(xi, k3[1]), bmm(xr + xi, k3[2])
  y = jnp.stack([(t1 - t2).reshape(h, w, b * cout), (t3 - t1 - t2).reshape(h, w, b * cout)], 1)
  y = y.reshape(h, 2 * w, b * cout)                       # (u, (re/im, v), (b, o))
  # Inverse W transform (complex), then the real part of the inverse H transform.
  z = _shared_bmm(_complex_block(mats["output_w"]).astype(x.dtype), y)
  z = z.reshape(2 * h, w * b * cout)                      # ((u, re/im), (w, b, o))
  dh = mats["output_h"]
  out = jnp.stack([dh.real, -dh.imag], -1).reshape(h, 2 * h).astype(x.dtype) @ z
  return jnp.transpose(out.reshape(h, w, b, cout), (2, 0, 1, 3))


class KOPS2D(nn.Module):
  """K-matrix convolution: a circular "same" conv computed FFT-style with learnable butterflies.

  For x (batch, H, W, Cin), H and W powers of 2, and kernel (kh, kw, Cin, Cout):
    X = B_w B_h x                     (input transform: decreasing-stride butterflies, H then W)
    K = C_w C_h pad(kernel)           (the kernel zero-padded / wrapped to H x W, own butterflies)
    Y[u, v, o] = sum_i X[u, v, i] K[u, v, i, o]    (per-frequency complex Cin -> Cout product)
    out = Re(D_w D_h Y) + bias        (inverse transform: increasing-stride butterflies)
  With ``twiddle_init='fft'`` (B, C = decimation-in-frequency DFT, output bit-reversed) and
  ``inverse_init='ifft'`` (D = inverse DFT with 1/n, taking bit-reversed input) no permutation
  is needed and the layer equals ``nn.Conv(features, kernel_size, padding='CIRCULAR')`` with
  the same kernel: out[y, x] = sum_{a,b} in[(y + a - lo_h) mod H, (x + b - lo_w) mod W] k[a, b],
  lo = (k - 1) // 2 (for 3x3: centred, 1-pixel wrap-around).

  Params: ``kernel`` (kh, kw, Cin, Cout) real, ``bias`` (Cout,), and complex ``twiddle`` of
  shape (1, nblocks, log2 n, n/2, 2, 2) in submodules ``input_h``, ``input_w``, ``kernel_h``,
  ``kernel_w``, ``output_h``, ``output_w``. Any twiddle init works for ``twiddle_init`` (e.g.
  'orthogonal', 'random'); ``'fft'`` here means the decreasing-stride ``inits.fft_dif``.

  Attributes:
    materialize: multiply by the dense n x n matrix of each butterfly (one GEMM per axis, fast
      for the small n of CIFAR) instead of applying its log2 n factors; None = when n <= 64.
      Same function either way.
    impl: butterfly implementation, "auto" (by platform), "cpu" or "generic" (see
      ``butterfly.butterfly_multiply``); same function either way.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  use_bias: bool = True
  nblocks: int = 1
  twiddle_init: str | TwiddleInit = "fft"
  inverse_init: str | TwiddleInit = "ifft"
  kernel_init: Initializer = kaiming_normal
  bias_init: Initializer = nn.initializers.zeros
  param_dtype: Dtype = jnp.float32
  materialize: Optional[bool] = None
  impl: str = "auto"

  def _kops_init(self, init: str | TwiddleInit, increasing: bool) -> TwiddleInit:
    if init == "fft":
      init = "fft_dif" if not increasing else "fft"
    if init == "ifft" and not increasing:
      raise ValueError("KOPS2D: 'ifft' is an increasing-stride init; it can only be the "
                       "inverse_init")
    return _resolve_init(init, increasing, "KOPS2D")

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"KOPS2D: input must be NHWC (batch, H, W, C), got shape {x.shape}")
    kh, kw = (int(k) for k in self.kernel_size)
    if kh < 1 or kw < 1 or self.nblocks < 1:
      raise ValueError(f"KOPS2D: need kernel_size >= 1 and nblocks >= 1, got "
                       f"{self.kernel_size}, {self.nblocks}")
    _, h, w, cin = x.shape
    _check_spatial("KOPS2D", h, w)
    impl = check_impl(self.impl, "KOPS2D")
    cdtype = _complex_dtype(self.param_dtype)
    fwd = self._kops_init(self.twiddle_init, False)
    inv = self._kops_init(self.inverse_init, True)
    tw = {name: _Twiddle(n, self.nblocks, fn, cdtype, name=name)()
          for name, n, fn in (("input_h", h, fwd), ("input_w", w, fwd),
                              ("kernel_h", h, fwd), ("kernel_w", w, fwd),
                              ("output_h", h, inv), ("output_w", w, inv))}
    kernel = self.param("kernel", self.kernel_init, (kh, kw, cin, self.features),
                        self.param_dtype)

    # Kernel transform: the padded kernel is nonzero only in rows (lo - a) mod H, so C_h pad(k)
    # needs just those columns of C_h (repeated rows add up, as wrap-around demands).
    rows = (((kh - 1) // 2 - np.arange(kh)) % h)
    cols = (((kw - 1) // 2 - np.arange(kw)) % w)
    ch = butterfly_multiply(tw["kernel_h"], jnp.eye(h, dtype=cdtype)[rows], False, impl)  # (kh, H)
    cw = butterfly_multiply(tw["kernel_w"], jnp.eye(w, dtype=cdtype)[cols], False, impl)  # (kw, W)
    coef = jnp.einsum("au,bv->uvab", ch, cw).reshape(h * w, kh * kw)   # complex, tiny

    materialize = max(h, w) <= 64 if self.materialize is None else self.materialize
    if materialize:
      mats = {k: butterfly_to_dense(t, k.startswith("output"), impl) for k, t in tw.items()}
      y = _kops_dense(x, mats, coef, kernel.reshape(kh * kw, cin * self.features))
    else:
      khat = (coef @ kernel.reshape(kh * kw, -1).astype(cdtype)).reshape(h, w, cin, -1)
      bfa = functools.partial(_butterfly_axis, impl=impl)
      xf = bfa(tw["input_w"], bfa(tw["input_h"], x, 1, False), 2, False)
      y = jnp.einsum("buvi,uvio->buvo", xf, khat)
      y = bfa(tw["output_w"], bfa(tw["output_h"], y, 1, True), 2, True)
      y = y.real
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    return y

  def flops_per_example(self, input_shape: Sequence[int]) -> int:
    """Real multiply-adds for one (H, W, Cin) example; complex multiply-add = 4.

    input transform 4 * Cin * 2HW * b (log2 H + log2 W); per-frequency product
    4 * HW * Cin * Cout; inverse transform 4 * Cout * 2HW * b (log2 H + log2 W); bias HW * Cout.
    The kernel transform is excluded: it depends only on the params (once per forward pass,
    not per example; cacheable for inference).
    """
    if len(input_shape) != 3:
      raise ValueError(f"KOPS2D: input_shape must be (H, W, Cin), got {tuple(input_shape)}")
    h, w, cin = (int(s) for s in input_shape)
    _check_spatial("KOPS2D", h, w)
    hw, logs = h * w, self.nblocks * (_log2(h) + _log2(w))
    transforms = 4 * 2 * hw * logs * (cin + self.features)
    product = 4 * hw * cin * self.features
    return transforms + product + (hw * self.features if self.use_bias else 0)


# ----------------------------------------------------------------------------- factories


def butterfly_dense(**kw: Any) -> Callable[..., nn.Module]:
  """Layer constructor ``(features, name=None) -> ButterflyDense(features, **kw)``."""
  return functools.partial(ButterflyDense, **kw)


def kmatrix_dense(**kw: Any) -> Callable[..., nn.Module]:
  """Layer constructor ``(features, name=None) -> KMatrixDense(features, **kw)``."""
  return functools.partial(KMatrixDense, **kw)


def factorized_dense(**kw: Any) -> Callable[..., nn.Module]:
  """Layer constructor ``(features, name=None) -> FactorizedDense(features, **kw)``."""
  return functools.partial(FactorizedDense, **kw)


def kops2d(**kw: Any) -> Callable[..., nn.Module]:
  """Layer constructor ``(features, name=None) -> KOPS2D(features, **kw)``."""
  return functools.partial(KOPS2D, **kw)
