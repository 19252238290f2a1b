"""The 3x3, stride-1, zero-padded ("same") convolution of VGG16, with a CPU-tuned backward pass.

``conv3x3(x, kernel, impl=...)`` computes ``lax.conv_general_dilated(x, kernel, (1, 1),
((1, 1), (1, 1)))`` in NHWC / HWIO layout: x (N, H, W, Cin), kernel (3, 3, Cin, Cout) ->
(N, H, W, Cout). The one switch ``impl`` chooses how:

* ``"generic"``: XLA's convolution and XLA's own derivatives; what GPUs and TPUs run.
* ``"cpu"``: the same function with a custom VJP whose formulation is chosen per spatial size
  for XLA:CPU (measured on a 2-core x86-64 CPU, batch 256, VGG16's layers):

  - forward and input gradient (the input gradient is the "same" convolution of the output
    gradient with the flipped, in/out-transposed kernel): at H, W <= 2 (VGG16's 2x2 layers),
    where XLA:CPU's convolution takes seconds, every output pixel sees the whole image, so the
    convolution is one (N, H W Cin) @ (H W Cin, H W Cout) matmul against the kernel's taps laid
    out per pixel pair (16 pixel pairs at 2x2 where im2col multiplies 36: forward 2x faster
    than im2col); at other H*W <= 4 (1x3 to 4x1) one im2col matmul; at
    even H and W from 4x4 on with >= 16 input channels (32/64-bit floats), Winograd F(2x2, 3x3)
    in chunks of a few images (16 batched (c H W / 4, Cin) @ (Cin, Cout) matmuls: 16/36 of the
    multiplies, 1.2-4x faster than XLA:CPU's convolution on VGG16's layers); otherwise
    (VGG16's conv1, odd sizes, 16-bit floats) XLA's convolution;
  - kernel gradient: XLA:CPU lowers it to a convolution with an HxW window that runs 2-6x
    slower than the forward pass (1.5 s vs 0.26 s of CPU time at 16x16, 128 channels). Here it
    is a sum of matmuls over chunks of a few images (a ``lax.scan``), each chunk's operands
    built in cache: where the forward uses Winograd and H*W <= 256 (VGG16's 16x16 to 4x4
    layers), the transpose of Winograd F(2x2, 3x3) (16 (Cin, c H W / 4) @ (c H W / 4, Cout)
    products, 1.2-2x faster than the next formulation there); otherwise at H*W >= 64 the three
    W-shifted copies of the padded input (c, H+2, W, 3 Cin) against the three H-shifted copies
    of the output gradient (c, H+2, W, 3 Cout), one (3 Cin, 3 Cout) product holding all nine
    taps; at 4x4 the nine-tap im2col patches (c, H, W, 9 Cin) against the output gradient; at
    H, W <= 2 the whole-image matmul's gradient X^T dY, each (Cin, Cout) block added to its tap;
    at other sizes up to 4 pixels XLA's own kernel gradient.

* ``"auto"`` (default): ``"cpu"`` in a program lowered for a CPU, ``"generic"`` elsewhere
  (``bfprune.platform.platform_call`` for the forward and for the backward pass, so a program
  lowered for one platform, e.g. a CUDA export, holds only that platform's code and no
  conditional).

All three compute the same function; the custom VJP is differentiable again (its backward pass
is made of convolutions, pads, concatenations, Winograd transforms and matmuls), so
forward-over-reverse products such as GraSP's Hessian-gradient product work through it. Plain
forward mode (``jax.jvp`` of the convolution itself) is not defined for a custom VJP: use
``impl="generic"`` for that.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from bfprune.platform import platform_call

IMPLS = ("auto", "cpu", "generic")
# H * W up to which the CPU path's forward / input gradient is one im2col matmul (where the
# whole-image matmul, H, W <= 2, does not apply).
IM2COL_MAX_PIXELS = 4
# H * W from which the CPU path's kernel gradient uses the shifted-copies matmul; between
# IM2COL_MAX_PIXELS and this it uses chunked im2col patches.
SHIFTED_MIN_PIXELS = 64
# Bytes of one chunk's expanded operand: small enough to stay in cache while it is multiplied.
SHIFTED_CHUNK_BYTES = 4 << 20
IM2COL_CHUNK_BYTES = 16 << 20
# The CPU path's forward / input gradient uses Winograd F(2x2, 3x3) from this H * W on (even H
# and W) with at least WINOGRAD_MIN_CHANNELS input channels (VGG16's conv1, 3 channels, keeps
# XLA's), in chunks whose transformed input or output (4 H W max(Cin, Cout) floats per image)
# stays within WINOGRAD_CHUNK_BYTES.
WINOGRAD_MIN_PIXELS = 16
WINOGRAD_MIN_CHANNELS = 16
# ... and its kernel gradient too up to this H * W (at 32x32 the shifted copies are as fast).
WINOGRAD_KERNEL_GRAD_MAX_PIXELS = 256
WINOGRAD_CHUNK_BYTES = 8 << 20

_DIMS = ("NHWC", "HWIO", "NHWC")


def _check(x: jax.Array, kernel: jax.Array) -> None:
  if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[:2] != (3, 3) \
      or kernel.shape[2] != x.shape[3]:
    raise ValueError(f"conv3x3 expects x (N, H, W, Cin) and kernel (3, 3, Cin, Cout), got x "
                     f"{x.shape} and kernel {kernel.shape}")


def xla_conv(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
  """XLA's "same" 3x3 convolution, NHWC x HWIO -> NHWC."""
  return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMS,
                                  precision=precision)


def _patches(x: jax.Array) -> jax.Array:
  """(N, H, W, C) -> (N, H, W, 9 C): the zero-padded 3x3 neighbourhood, taps (a, b) major."""
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.concatenate([xp[:, a:a + h, b:b + w] for a in range(3) for b in range(3)], -1)


def im2col_conv(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
  """The same convolution as one matmul (N*H*W, 9 Cin) @ (9 Cin, Cout); for tiny H*W only
  (the patches take 9x the input's memory)."""
  cin, cout = kernel.shape[2:]
  return jnp.dot(_patches(x), kernel.reshape(9 * cin, cout), precision=precision)


def uses_whole_image(x_shape: tuple) -> bool:
  """Whether the image is so small (H, W <= 2) that every output pixel's 3x3 window covers all
  of it, which makes the convolution one matmul over whole images (``whole_image_conv``)."""
  return x_shape[1] <= 2 and x_shape[2] <= 2


def _whole_image_blocks(h: int, w: int) -> list:
  """(input pixel, output pixel, kernel tap) of every block of the whole-image kernel."""
  return [((a, b), (i, j), (a - i + 1, b - j + 1))
          for a in range(h) for b in range(w) for i in range(h) for j in range(w)]


def whole_image_kernel(kernel: jax.Array, h: int, w: int) -> jax.Array:
  """(3, 3, Cin, Cout) -> (H W Cin, H W Cout) for H, W <= 2: block (input pixel (a, b), output
  pixel (i, j)) is the tap kernel[a - i + 1, b - j + 1] that connects them."""
  cin, cout = kernel.shape[2:]
  blocks = {(src, dst): kernel[tap] for src, dst, tap in _whole_image_blocks(h, w)}
  pixels = [(a, b) for a in range(h) for b in range(w)]
  rows = [jnp.concatenate([blocks[src, dst] for dst in pixels], 1) for src in pixels]
  return jnp.concatenate(rows, 0).reshape(h * w * cin, h * w * cout)


def whole_image_conv(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
  """The same convolution for H, W <= 2 as one (N, H W Cin) @ (H W Cin, H W Cout) matmul: at
  2x2 the 16 pixel pairs that the zero padding leaves, where im2col multiplies 36 (2.2x fewer
  multiplies, and no patches to build)."""
  n, h, w, cin = x.shape
  cout = kernel.shape[-1]
  y = jnp.dot(x.reshape(n, h * w * cin), whole_image_kernel(kernel, h, w), precision=precision)
  return y.reshape(n, h, w, cout)


def _kernel_grad_whole_image(x: jax.Array, dy: jax.Array, precision=None) -> jax.Array:
  """dL/dkernel for H, W <= 2: the (H W Cin, H W Cout) gradient of the whole-image kernel,
  X^T dY, with each block added to the tap it came from (the transpose of
  ``whole_image_kernel``)."""
  n, h, w, cin = x.shape
  cout = dy.shape[-1]
  g = lax.dot_general(x.reshape(n, h * w * cin), dy.reshape(n, h * w * cout),
                      (((0,), (0,)), ((), ())), precision=precision)
  g = g.reshape(h, w, cin, h, w, cout)
  taps: dict = {}
  for (a, b), (i, j), tap in _whole_image_blocks(h, w):
    block = g[a, b, :, i, j]
    taps[tap] = block if tap not in taps else taps[tap] + block
  zero = jnp.zeros((cin, cout), g.dtype)
  return jnp.stack([jnp.stack([taps.get((p, q), zero) for q in range(3)]) for p in range(3)])


def _chunking(n: int, target: int) -> tuple[int, int]:
  """(chunk, padded n): the largest divisor of n up to ``target``, or ``target`` with n
  zero-padded to a multiple of it when n's divisors are all much smaller."""
  target = max(1, min(target, n))
  best = max(d for d in range(1, target + 1) if n % d == 0)
  if 4 * best >= target:
    return best, n
  return target, -(-n // target) * target


def _scan_chunks(body, x: jax.Array, dy: jax.Array, chunk: int, padded: int, init: jax.Array):
  """Sums ``body(x_chunk, dy_chunk)`` over batch chunks (zero padding contributes nothing)."""
  n = x.shape[0]
  if padded != n:
    x = jnp.pad(x, ((0, padded - n),) + ((0, 0),) * 3)
    dy = jnp.pad(dy, ((0, padded - n),) + ((0, 0),) * 3)
  xs = x.reshape((padded // chunk, chunk) + x.shape[1:])
  ds = dy.reshape((padded // chunk, chunk) + dy.shape[1:])
  if xs.shape[0] == 1:
    return init + body(xs[0], ds[0])
  acc, _ = lax.scan(lambda acc, xd: (acc + body(*xd), None), init, (xs, ds))
  return acc


_CONTRACT_NHW = (((0, 1, 2), (0, 1, 2)), ((), ()))


# Winograd F(2x2, 3x3): a 2x2 output tile from a 4x4 input tile in 16 multiplies per channel
# pair instead of 36. Y = A^T [(G g G^T) * (B^T d B)] A, with these (Lavin & Gray, 2016):
# B^T rows combine input rows (d0 - d2, d1 + d2, d2 - d1, d1 - d3), G maps the 3 kernel taps to
# 4, A^T rows combine the 4 products into 2 outputs (m0 + m1 + m2, m1 - m2 - m3).
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _winograd_in(d: list) -> list:
  """B^T along one axis: four strided input slices -> four transformed ones."""
  return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _winograd_out(m: list) -> list:
  """A^T along one axis: four products -> the tile's two outputs."""
  return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def winograd_kernel(kernel: jax.Array) -> jax.Array:
  """(3, 3, Cin, Cout) -> (16, Cin, Cout): G g G^T per channel pair, tile positions flattened."""
  g = jnp.asarray(_WINOGRAD_G, kernel.dtype)
  u = jnp.einsum("pa,abio,qb->pqio", g, kernel, g, precision=lax.Precision.HIGHEST)
  return u.reshape((16,) + kernel.shape[2:])


def _winograd_input(x: jax.Array) -> jax.Array:
  """(n, H, W, Cin) -> (16, n H W / 4, Cin): B^T d B of every 4x4 input tile (stride 2)."""
  _, h, w, cin = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = _winograd_in([xp[:, r:r + h:2] for r in range(4)])  # 4 x (n, H/2, W+2, Cin)
  v = jnp.stack([t for row in rows
                 for t in _winograd_in([row[:, :, c:c + w:2] for c in range(4)])])
  return v.reshape(16, -1, cin)


def _winograd_chunk(x: jax.Array, u: jax.Array, precision=None) -> jax.Array:
  n, h, w, _ = x.shape
  cout = u.shape[-1]
  m = lax.dot_general(_winograd_input(x), u, (((2,), (1,)), ((0,), (0,))),
                      precision=precision).reshape(4, 4, n, h // 2, w // 2, cout)
  # y[n, 2i + a, 2j + b] = Y_ab[n, i, j]
  y = jnp.stack([jnp.stack(_winograd_out([r[q] for q in range(4)]), 3)
                 for r in _winograd_out([m[p] for p in range(4)])], 2)
  return y.reshape(n, h, w, cout)


def _winograd_out_transposed(y: list) -> list:
  """A along one axis (the transpose of ``_winograd_out``): a tile's two output gradients ->
  the four products' gradients."""
  return [y[0], y[0] + y[1], y[0] - y[1], -y[1]]


def _kernel_grad_winograd(x: jax.Array, dy: jax.Array, precision=None) -> jax.Array:
  """dL/dkernel by the transpose of Winograd F(2x2, 3x3), even H and W.

  The forward is linear in the kernel g: Y = A^T [(G g G^T) * V] A per tile, so
  dL/dg = G^T [sum over tiles and images of V * (A dY A^T)] G: 16 (Cin, c H W / 4) @
  (c H W / 4, Cout) products per chunk of c images (a ``lax.scan``), 16/36 of the multiplies.
  """
  n, h, w, cin = x.shape
  cout = dy.shape[-1]

  def body(xc, dc):
    rows = _winograd_out_transposed([dc[:, a::2] for a in range(2)])  # 4 x (c, H/2, W, Cout)
    d = jnp.stack([t for row in rows
                   for t in _winograd_out_transposed([row[:, :, b::2] for b in range(2)])])
    return lax.dot_general(_winograd_input(xc), d.reshape(16, -1, cout),
                           (((1,), (1,)), ((0,), (0,))), precision=precision)

  per_image = 4 * h * w * max(cin, cout) * x.dtype.itemsize
  chunk, padded = _chunking(n, max(1, WINOGRAD_CHUNK_BYTES // per_image))
  du = _scan_chunks(body, x, dy, chunk, padded, jnp.zeros((16, cin, cout), jnp.result_type(x, dy)))
  g = jnp.asarray(_WINOGRAD_G, du.dtype)
  return jnp.einsum("pa,pqio,qb->abio", g, du.reshape(4, 4, cin, cout), g,
                    precision=lax.Precision.HIGHEST)


def winograd_conv(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
  """The same convolution by Winograd F(2x2, 3x3), for even H and W.

  Per chunk of c images (``lax.map``): the 16 transformed input planes (16, c H W / 4, Cin)
  times the transformed kernel (16, Cin, Cout) as one batched matmul, 16/36 of the direct
  convolution's multiplies, then the output transform. Its float32 rounding differs from the
  direct sum by ~1e-6 relative (the transforms only add, subtract and halve).
  """
  n, h, w, cin = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"winograd_conv needs even H and W, got x {x.shape}")
  u = winograd_kernel(kernel)
  per_image = 4 * h * w * max(cin, kernel.shape[-1]) * x.dtype.itemsize
  chunk, padded = _chunking(n, max(1, WINOGRAD_CHUNK_BYTES // per_image))
  if padded == chunk:
    return _winograd_chunk(x, u, precision)
  xs = jnp.pad(x, ((0, padded - n),) + ((0, 0),) * 3)
  ys = lax.map(lambda xc: _winograd_chunk(xc, u, precision),
               xs.reshape((padded // chunk, chunk) + x.shape[1:]))
  return ys.reshape((padded, h, w, kernel.shape[-1]))[:n]


def _kernel_grad_shifted(x: jax.Array, dy: jax.Array, precision=None) -> jax.Array:
  """dL/dkernel (3, 3, Cin, Cout) from x (N, H, W, Cin) and dy (N, H, W, Cout).

  dk[a, b, i, o] = sum_{n,h,w} xp[n, h+a, w+b, i] dy[n, h, w, o] (xp: x zero-padded by 1).
  With xw[n, r, w, (b, i)] = xp[n, r, w+b, i] (r < H+2) and dd[n, r, w, (a, o)] = dy[n, r-a, w, o]
  (zero outside), sum_{n,r,w} xw[n,r,w,(b,i)] dd[n,r,w,(a,o)] = dk[a, b, i, o] for all nine taps.
  """
  n, h, w, cin = x.shape
  cout = dy.shape[-1]

  def body(xc, dc):
    xp = jnp.pad(xc, ((0, 0), (1, 1), (1, 1), (0, 0)))
    xw = jnp.concatenate([xp[:, :, b:b + w] for b in range(3)], -1)
    dd = jnp.concatenate([jnp.pad(dc, ((0, 0), (a, 2 - a), (0, 0), (0, 0))) for a in range(3)],
                         -1)
    return lax.dot_general(xw, dd, _CONTRACT_NHW, precision=precision)

  per_image = (h + 2) * w * 3 * max(cin, cout) * x.dtype.itemsize
  chunk, padded = _chunking(n, max(1, SHIFTED_CHUNK_BYTES // per_image))
  acc = _scan_chunks(body, x, dy, chunk, padded,
                     jnp.zeros((3 * cin, 3 * cout), jnp.result_type(x, dy)))
  return acc.reshape(3, cin, 3, cout).transpose(2, 0, 1, 3)


def _kernel_grad_im2col(x: jax.Array, dy: jax.Array, precision=None) -> jax.Array:
  """dL/dkernel as chunked patches^T @ dy: (9 Cin, c*H*W) @ (c*H*W, Cout) per chunk."""
  n, h, w, cin = x.shape
  cout = dy.shape[-1]
  body = lambda xc, dc: lax.dot_general(_patches(xc), dc, _CONTRACT_NHW, precision=precision)
  chunk, padded = _chunking(n, max(1, IM2COL_CHUNK_BYTES // (h * w * 9 * cin * x.dtype.itemsize)))
  acc = _scan_chunks(body, x, dy, chunk, padded,
                     jnp.zeros((9 * cin, cout), jnp.result_type(x, dy)))
  return acc.reshape(3, 3, cin, cout)


def _kernel_grad_xla(x: jax.Array, dy: jax.Array, precision=None) -> jax.Array:
  kshape = jax.ShapeDtypeStruct((3, 3, x.shape[-1], dy.shape[-1]), x.dtype)
  return jax.linear_transpose(lambda k: xla_conv(x, k, precision), kshape)(dy)[0]


def kernel_grad(x: jax.Array, dy: jax.Array, precision=None) -> jax.Array:
  """The CPU path's dL/dkernel, formulation chosen by shape (see the module docstring)."""
  hw = x.shape[1] * x.shape[2]
  if uses_whole_image(x.shape):
    return _kernel_grad_whole_image(x, dy, precision)
  if uses_winograd(x.shape, x.dtype) and hw <= WINOGRAD_KERNEL_GRAD_MAX_PIXELS:
    return _kernel_grad_winograd(x, dy, precision)
  if hw >= SHIFTED_MIN_PIXELS:
    return _kernel_grad_shifted(x, dy, precision)
  if hw > IM2COL_MAX_PIXELS:
    return _kernel_grad_im2col(x, dy, precision)
  return _kernel_grad_xla(x, dy, precision)


def uses_winograd(x_shape: tuple, dtype=jnp.float32) -> bool:
  """Whether the CPU path computes the forward of a convolution of an (N, H, W, Cin) input by
  Winograd F(2x2, 3x3). Not in 16-bit floats, where its transforms' rounding would show."""
  _, h, w, cin = x_shape
  return (h % 2 == 0 and w % 2 == 0 and h * w >= WINOGRAD_MIN_PIXELS
          and cin >= WINOGRAD_MIN_CHANNELS and jnp.dtype(dtype).itemsize >= 4)


def _forward_cpu(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
  if uses_whole_image(x.shape):
    return whole_image_conv(x, kernel, precision)
  if x.shape[1] * x.shape[2] <= IM2COL_MAX_PIXELS:
    return im2col_conv(x, kernel, precision)
  if uses_winograd(x.shape, x.dtype):
    return winograd_conv(x, kernel, precision)
  return xla_conv(x, kernel, precision)


def transposed_kernel(kernel: jax.Array) -> jax.Array:
  """(3, 3, Cin, Cout) -> (3, 3, Cout, Cin) flipped: the input gradient's "same" kernel."""
  return kernel[::-1, ::-1].transpose(0, 1, 3, 2)


def _backward_cpu(x, kernel, dy, precision=None):
  dx = _forward_cpu(dy, transposed_kernel(kernel), precision)
  return dx, kernel_grad(x, dy, precision).astype(kernel.dtype)


def _backward_generic(x, kernel, dy, precision=None):
  """What autodiff of ``xla_conv`` computes: XLA's input- and kernel-gradient convolutions."""
  return jax.vjp(lambda x, k: xla_conv(x, k, precision), x, kernel)[1](dy)


def _forward(x, kernel, impl, precision):
  if impl == "cpu":
    return _forward_cpu(x, kernel, precision)
  return platform_call(x, kernel, cpu=functools.partial(_forward_cpu, precision=precision),
                       default=functools.partial(xla_conv, precision=precision))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, kernel: jax.Array, impl: str, precision) -> jax.Array:
  return _forward(x, kernel, impl, precision)


def _conv_fwd(x, kernel, impl, precision):
  return _forward(x, kernel, impl, precision), (x, kernel)


def _conv_bwd(impl, precision, res, dy):
  x, kernel = res
  if impl == "cpu":
    return _backward_cpu(x, kernel, dy, precision)
  # Forward and backward are separate platform calls, so a first-order gradient lowered for
  # one platform holds no conditional.
  return platform_call(x, kernel, dy, cpu=functools.partial(_backward_cpu, precision=precision),
                       default=functools.partial(_backward_generic, precision=precision))


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv3x3(x: jax.Array, kernel: jax.Array, impl: str = "auto",
            precision: Optional[lax.Precision] = None) -> jax.Array:
  """3x3 stride-1 "same" convolution, x (N, H, W, Cin) @ kernel (3, 3, Cin, Cout) -> (N, H, W,
  Cout); ``impl`` in ``IMPLS`` (see the module docstring)."""
  if impl not in IMPLS:
    raise ValueError(f"conv3x3 impl must be one of {IMPLS}, got {impl!r}")
  _check(x, kernel)
  if impl == "generic":
    return xla_conv(x, kernel, precision)
  return _conv(x, kernel, impl, precision)
