"""The study's models, FC-6 (MNIST) and VGG16 (CIFAR-10), with their layers passed in.

Layer constructors are arguments, so a butterfly / K-matrix layer replaces a dense or conv layer
without editing this file:

* ``dense(features, name=...)`` -> module mapping (batch, in) -> (batch, features);
* ``conv(features, name=...)``  -> module mapping NHWC -> NHWC (3x3, "same" padding, stride 1);
* ``head(num_classes, name=...)`` -> the classifier, a dense-like module.

Layers are named ``fc1..fc5, head`` (FC) and ``conv1..conv13, head`` (VGG16) so masks, metrics and
tables refer to them by stable names.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bfprune import conv as conv_lib

LayerFn = Callable[..., nn.Module]

# torch.nn.init.kaiming_normal_ (fan_in, gain sqrt 2, untruncated normal), as in the reference VGG.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

dense_layer: LayerFn = nn.Dense


class Conv3x3(nn.Conv):
  """A 3x3, stride-1, zero-padded "same" ``nn.Conv`` computed by ``bfprune.conv.conv3x3``.

  Same parameters (``kernel`` (3, 3, Cin, Cout), ``bias`` (Cout,)), same outputs and the same
  FLOP accounting as ``nn.Conv(features, (3, 3), padding=1)``. ``impl`` ("auto" | "cpu" |
  "generic", see ``bfprune.conv``) picks the computation: on a CPU, "auto" uses formulations
  tuned for XLA:CPU (Winograd F(2x2, 3x3) from 4x4 on, im2col at 2x2, chunked-matmul kernel
  gradients), elsewhere XLA's convolution. Input NHWC (batch, H, W, Cin); output (batch, H, W,
  features).
  """
  impl: str = "auto"

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    if tuple(self.kernel_size) != (3, 3) or self.strides not in (None, 1, (1, 1)) \
        or self.padding not in (1, "SAME", ((1, 1), (1, 1))) \
        or self.input_dilation not in (None, 1, (1, 1)) \
        or self.kernel_dilation not in (None, 1, (1, 1)) or self.feature_group_count != 1:
      raise ValueError(
          f"Conv3x3 supports only a 3x3 stride-1 'same' ungrouped conv, got kernel_size="
          f"{self.kernel_size}, strides={self.strides}, padding={self.padding}")
    if inputs.ndim != 4:
      raise ValueError(f"Conv3x3 expects NHWC input (batch, H, W, C), got shape {inputs.shape}")
    if self.impl not in conv_lib.IMPLS:
      raise ValueError(f"Conv3x3 impl must be one of {conv_lib.IMPLS}, got {self.impl!r}")
    cin = inputs.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (3, 3, cin, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = conv_lib.conv3x3(x, kernel, impl=self.impl, precision=self.precision)
    return y if bias is None else y + bias


DROPOUT_IMPLS = ("hash", "jax")
_GOLDEN = 0x9E3779B9


def _mix32(h: jax.Array) -> jax.Array:
  """A bijective 32-bit finalizer (xor-shift / multiply rounds) that spreads every input bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def hash_bits(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """uint32 pseudo-random bits of ``shape``: a keyed hash of each element's flat index.

  Two mixing rounds, the first on index * golden-ratio + key word 0, the second after xoring key
  word 1. Counter-based like ``jax.random`` (same key, same bits, on every backend), but one
  fused elementwise expression: on XLA:CPU ~7x cheaper than ``jax.random.bernoulli`` (threefry),
  whose cost is that of a VGG16 convolution per step. Not a cryptographic generator.
  """
  size = math.prod(shape)
  if size >= 1 << 32:
    raise ValueError(f"hash_bits: {size} elements exceed the 2**32 counter range")
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  data = data.reshape(-1).astype(jnp.uint32)
  idx = lax.iota(jnp.uint32, size).reshape(tuple(shape)) if size else jnp.zeros(shape, jnp.uint32)
  h = _mix32(idx * jnp.uint32(_GOLDEN) + data[0])
  return _mix32(h ^ data[-1])


class Dropout(nn.Module):
  """Inverted dropout like ``nn.Dropout``: zeroes each element with probability ``rate`` and
  scales the rest by 1 / (1 - rate); the identity when ``deterministic``.

  ``impl="hash"`` draws the keep mask from ``hash_bits`` (keep iff bits < (1 - rate) * 2**32),
  ``"jax"`` from ``jax.random.bernoulli`` exactly as ``nn.Dropout``. Both take the key from the
  ``dropout`` rng collection, so the same key gives the same mask.
  """
  rate: float
  impl: str = "hash"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if self.impl not in DROPOUT_IMPLS:
      raise ValueError(f"Dropout impl must be one of {DROPOUT_IMPLS}, got {self.impl!r}")
    if deterministic or self.rate == 0:
      return x
    if self.rate == 1:
      return jnp.zeros_like(x)
    keep = 1.0 - self.rate
    key = self.make_rng("dropout")
    if self.impl == "jax":  # nn.Dropout's draw (same module path, so the same masks)
      mask = jax.random.bernoulli(key, keep, x.shape)
    else:
      threshold = min(round(keep * 2.0 ** 32), (1 << 32) - 1)
      mask = hash_bits(key, x.shape) < jnp.uint32(threshold)
    return lax.select(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 max-pool of NHWC x (odd trailing rows / columns dropped, as ``nn.max_pool``).

  A reshape and a max: its gradient is elementwise and fuses, where ``nn.max_pool``'s
  (reduce-window with index tracking, then a scatter) cost as much as a convolution on XLA:CPU.
  Ties share the gradient equally instead of going to one element (after ReLU / dropout the
  tied inputs are zeros, whose gradient is zero either way).
  """
  n, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 average pool of NHWC x, like ``nn.avg_pool(x, (2, 2), strides=(2, 2))``."""
  n, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


conv3x3: LayerFn = functools.partial(
    Conv3x3, kernel_size=(3, 3), padding=1, kernel_init=kaiming_normal,
    bias_init=nn.initializers.zeros)
kaiming_dense: LayerFn = functools.partial(
    nn.Dense, kernel_init=kaiming_normal, bias_init=nn.initializers.zeros)

FC_HIDDEN = (100, 100, 100, 100, 100)
VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class FC(nn.Module):
  """784 -> 100 x5 -> 10 MLP with ReLU and dropout (119,400 weights at the defaults).

  Input: (batch, 28, 28, 1) or (batch, 784), flattened. Output: logits (batch, num_classes).
  """
  hidden: Sequence[int] = FC_HIDDEN
  num_classes: int = 10
  dropout_rate: float = 0.1
  dense: LayerFn = dense_layer
  head: LayerFn = dense_layer
  dropout_impl: str = "hash"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.relu(self.dense(width, name=f"fc{i + 1}")(x))
      x = Dropout(self.dropout_rate, self.dropout_impl)(x, deterministic=not train)
    return self.head(self.num_classes, name="head")(x)


class VGG16(nn.Module):
  """The lottery-ticket VGG16 for CIFAR-10 (14,715,584 weights at the defaults).

  3x3 convs with bias and ReLU following ``plan`` ("M" = 2x2 max-pool), then a 2x2 average
  pool and one dense classifier. ``batch_norm=True`` adds BatchNorm after every conv (then the
  ``batch_stats`` collection must be mutable when ``train=True``). Input NHWC (batch, 32, 32, 3).
  """
  plan: Sequence[int | str] = VGG16_PLAN
  num_classes: int = 10
  batch_norm: bool = False
  dropout_rate: float = 0.1
  conv: LayerFn = conv3x3
  head: LayerFn = kaiming_dense
  dropout_impl: str = "hash"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    i = 0
    for item in self.plan:
      if item == "M":
        x = max_pool_2x2(x)
        continue
      i += 1
      x = self.conv(int(item), name=f"conv{i}")(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x)
      x = nn.relu(x)
      x = Dropout(self.dropout_rate, self.dropout_impl)(x, deterministic=not train)
    x = avg_pool_2x2(x)
    x = x.reshape((x.shape[0], -1))
    return self.head(self.num_classes, name="head")(x)


def vgg16_conv_shapes(hw: int = 32, channels: int = 3) -> list[tuple[int, int, int]]:
  """(H = W, Cin, Cout) of VGG16's 13 convs on (hw, hw, channels) inputs."""
  shapes = []
  for item in VGG16_PLAN:
    if item == "M":
      hw //= 2
      continue
    shapes.append((hw, channels, int(item)))
    channels = int(item)
  return shapes


def input_shape(dataset: str) -> tuple[int, int, int]:
  """Per-example input shape (H, W, C) of a dataset name."""
  shapes = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
  if dataset not in shapes:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(shapes)}")
  return shapes[dataset]
