"""Twiddle initialisers: pure functions ``(key, shape, dtype) -> twiddle``.

``shape`` is the butterfly layout ``(nstacks, nblocks, log2 n, n/2, 2, 2)`` of
``bfprune.structured.butterfly``: factor ``l`` of a block pairs positions ``i`` and ``i + s``
(stride ``s = 2**l`` when the stride increases, ``n / 2**(l+1)`` when it decreases) and maps
``[x_i, x_{i+s}] -> twiddle[..., l, p] @ [x_i, x_{i+s}]``.

* ``random``: i.i.d. entries with ``E|t|^2 = 1/2``. Each 2x2 factor then maps a pair
  ``(x_i, x_j)`` to outputs of expected power ``(|x_i|^2 + |x_j|^2) / 2`` each, so every factor,
  and therefore the whole product of ``nblocks * log2 n`` factors, preserves ``E||x||^2``: the
  per-output variance equals the mean per-input variance, the gain of a dense layer with
  ``Var(W) = 1 / fan_in`` (LeCun). ``scaled`` multiplies the whole product by a gain (spread
  evenly over the factors), which ``ButterflyDense`` uses to undo the zero padding of its input.
* ``orthogonal``: every 2x2 factor a random rotation or reflection (a random unitary for complex
  dtypes), so the butterfly is orthogonal / unitary.
* ``identity``: every factor the identity.
* ``fft``: block 0 is the decimation-in-time FFT, an *increasing*-stride butterfly B with
  ``F = B P``, where ``F[j, k] = exp(-2 pi i j k / n)`` and P is the bit-reversal permutation:
  the layer applying B to the bit-reversed input computes the DFT. Stage ``l`` (half-size
  ``s = 2**l``) maps ``(a, b) -> (a + w^k b, a - w^k b)`` with ``w = exp(-2 pi i / 2s)`` and
  ``k = p mod s``: the Cooley-Tukey step for the even/odd halves, which sit in adjacent
  blocks only once the input is bit-reversed, hence increasing stride.
* ``fft_dif``: decimation in frequency, a *decreasing*-stride butterfly B with ``F = P B``:
  natural-order input, bit-reversed output. Stage with half-size ``s`` maps
  ``(a, b) -> (a + b, (a - b) w^k)``.
* ``ifft``: ``F^{-1} = conj(F) / n`` as an increasing-stride butterfly on bit-reversed input
  (``F^{-1} = B' P``), the ``1/n`` spread as ``1/2`` per factor. Composing ``ifft`` after
  ``fft_dif`` needs no permutation at all (``F^{-1} F = B' P P B``, ``P P = I``), which is
  how ``KOPS2D`` computes a convolution.

The DFT inits fill block 0 of every stack; further blocks are the identity. They need a
complex dtype.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TwiddleInit = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def _check_shape(shape: Sequence[int], who: str) -> tuple[int, int, int, int]:
  """Validates the layout; returns (nstacks, nblocks, log2 n, n)."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 6 or shape[4:] != (2, 2):
    raise ValueError(f"{who}: twiddle shape must be (nstacks, nblocks, log2 n, n/2, 2, 2), "
                     f"got {shape}")
  nstacks, nblocks, log_n, half = shape[:4]
  n = 2 * half
  if n < 2 or 2 ** log_n != n or nstacks < 1 or nblocks < 1:
    raise ValueError(f"{who}: inconsistent twiddle shape {shape}: need n/2 = 2**(log2 n - 1), "
                     "nstacks >= 1, nblocks >= 1")
  return nstacks, nblocks, log_n, n


def random(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Gaussian twiddles, ``E|t|^2 = 1/2``: the product preserves ``E||x||^2`` (see module doc)."""
  _check_shape(shape, "random")
  if jnp.issubdtype(dtype, jnp.complexfloating):
    # Real and imaginary parts each carry half the power (one draw: fewer RNG kernels).
    z = jax.random.normal(key, (*shape, 2), jnp.finfo(dtype).dtype) * 0.5
    return (z[..., 0] + 1j * z[..., 1]).astype(dtype)
  return (jax.random.normal(key, shape, dtype) * math.sqrt(0.5)).astype(dtype)


def orthogonal(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Every 2x2 factor a uniformly random rotation or reflection (complex: times random phases)."""
  _check_shape(shape, "orthogonal")
  real = jnp.finfo(dtype).dtype
  # One uniform draw per 2x2 factor gives angle, rotation/reflection and two phases.
  u = jax.random.uniform(key, (*shape[:4], 4), real)
  theta = 2 * math.pi * u[..., 0]
  sign = jnp.where(u[..., 1] < 0.5, -1.0, 1.0).astype(real)
  c, s = jnp.cos(theta), jnp.sin(theta)
  # Rotation [[c, -s], [s, c]] (sign = +1) or reflection [[c, s], [s, -c]] (sign = -1).
  t = jnp.stack([jnp.stack([c, -sign * s], -1), jnp.stack([s, sign * c], -1)], -2)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    phi = 2 * math.pi * u[..., 2:]
    t = t * jnp.exp(1j * phi)[..., :, None]   # diag(phases) @ t stays unitary
  return t.astype(dtype)


def identity(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Every factor the identity, so the butterfly is the identity (per stack)."""
  del key
  _check_shape(shape, "identity")
  return jnp.broadcast_to(jnp.eye(2, dtype=dtype), tuple(shape))


def _dft_block(log_n: int, increasing: bool, inverse: bool) -> np.ndarray:
  """(log2 n, n/2, 2, 2) complex128 factors of one DFT block (see module doc)."""
  n = 2 ** log_n
  out = np.zeros((log_n, n // 2, 2, 2), np.complex128)
  p = np.arange(n // 2)
  sgn = 1.0 if inverse else -1.0
  for l in range(log_n):
    s = 2 ** l if increasing else n // 2 ** (l + 1)
    w = np.exp(sgn * 2j * np.pi * (p % s) / (2 * s))
    if increasing:   # decimation in time: (a, b) -> (a + w b, a - w b)
      out[l, :, 0, 0], out[l, :, 0, 1] = 1.0, w
      out[l, :, 1, 0], out[l, :, 1, 1] = 1.0, -w
    else:            # decimation in frequency: (a, b) -> (a + b, (a - b) w)
      out[l, :, 0, 0], out[l, :, 0, 1] = 1.0, 1.0
      out[l, :, 1, 0], out[l, :, 1, 1] = w, -w
  if inverse:
    out *= 0.5      # 1/n overall, 1/2 per factor
  return out


def _dft_init(who: str, increasing: bool, inverse: bool) -> TwiddleInit:
  def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.complex64) -> jax.Array:
    del key
    nstacks, nblocks, log_n, _ = _check_shape(shape, who)
    if not jnp.issubdtype(dtype, jnp.complexfloating):
      raise ValueError(f"{who}: the DFT needs a complex twiddle dtype, got {jnp.dtype(dtype)}")
    t = np.broadcast_to(np.eye(2, dtype=np.complex128), tuple(shape)).copy()
    t[:, 0] = _dft_block(log_n, increasing, inverse)
    return jnp.asarray(t, dtype)
  init.__name__ = who
  return init


fft: TwiddleInit = _dft_init("fft", increasing=True, inverse=False)
fft.__doc__ = "DFT as an increasing-stride butterfly on bit-reversed input (F = B P)."
fft_dif: TwiddleInit = _dft_init("fft_dif", increasing=False, inverse=False)
fft_dif.__doc__ = "DFT as a decreasing-stride butterfly with bit-reversed output (F = P B)."
ifft: TwiddleInit = _dft_init("ifft", increasing=True, inverse=True)
ifft.__doc__ = "Inverse DFT conj(F)/n as an increasing-stride butterfly on bit-reversed input."

# Stride direction each DFT init is built for (None: any).
REQUIRED_STRIDE = {"fft": True, "fft_dif": False, "ifft": True}

INITS: dict[str, TwiddleInit] = {
    "random": random, "orthogonal": orthogonal, "identity": identity,
    "fft": fft, "fft_dif": fft_dif, "ifft": ifft,
}
COMPLEX_INITS = frozenset({"fft", "fft_dif", "ifft"})


def scaled(init: TwiddleInit, gain: float) -> TwiddleInit:
  """``init`` with every factor multiplied by ``gain ** (1 / (nblocks log2 n))``: product x gain."""
  def scaled_init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32
                  ) -> jax.Array:
    _, nblocks, log_n, _ = _check_shape(shape, "scaled")
    return init(key, shape, dtype) * jnp.asarray(gain ** (1.0 / (nblocks * log_n)), dtype)
  return scaled_init


def get(init: str | TwiddleInit) -> TwiddleInit:
  """Resolves an init name (see ``INITS``) or passes a callable through."""
  if callable(init):
    return init
  if init not in INITS:
    raise ValueError(f"unknown twiddle init {init!r}; expected one of {sorted(INITS)} "
                     "or a callable (key, shape, dtype) -> twiddle")
  return INITS[init]


def bit_reversal(n: int) -> np.ndarray:
  """The bit-reversal permutation of ``range(n)`` (n a power of 2), an involution."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"bit_reversal: n = {n} must be a power of 2")
  bits = n.bit_length() - 1
  idx = np.arange(n)
  rev = np.zeros(n, np.int64)
  for b in range(bits):
    rev |= ((idx >> b) & 1) << (bits - 1 - b)
  return rev
