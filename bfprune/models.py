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
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

LayerFn = Callable[..., nn.Module]

# torch.nn.init.kaiming_normal_ (fan_in, gain sqrt 2, untruncated normal), as in the reference VGG.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

dense_layer: LayerFn = nn.Dense
# Spatial sizes (H * W) up to which Conv3x3 computes by im2col. Measured here (batch 256, 512
# channels, forward+backward): 2x2 5.1 s by XLA conv vs 0.11 s by im2col; 4x4 0.63 s vs 0.62 s.
IM2COL_MAX_PIXELS = 4


class Conv3x3(nn.Conv):
  """A 3x3, stride-1, zero-padded "same" ``nn.Conv`` that switches to im2col at small sizes.

  Same parameters (``kernel`` (3, 3, Cin, Cout), ``bias`` (Cout,)), same outputs and the same
  FLOP accounting as ``nn.Conv(features, (3, 3), padding=1)``. At H * W <= ``im2col_max_pixels``
  the convolution is one matmul of the nine shifted copies of the input, (N*H*W, 9*Cin) @
  (9*Cin, Cout), because XLA:CPU's convolution is pathologically slow there (VGG16's 2x2 convs:
  seconds per batch against tens of milliseconds as a matmul, forward and backward). Larger
  inputs use ``lax.conv_general_dilated`` (im2col would multiply their activation memory by 9).
  Input NHWC (batch, H, W, Cin); output (batch, H, W, features).
  """
  im2col_max_pixels: int = IM2COL_MAX_PIXELS

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
    _, h, w, cin = inputs.shape
    kernel = self.param("kernel", self.kernel_init, (3, 3, cin, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    if h * w <= self.im2col_max_pixels:
      xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      cols = jnp.concatenate([xp[:, a:a + h, b:b + w] for a in range(3) for b in range(3)], -1)
      y = cols @ kernel.reshape(9 * cin, self.features)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=self.precision)
    return y if bias is None else y + bias


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

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.relu(self.dense(width, name=f"fc{i + 1}")(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
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

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    i = 0
    for item in self.plan:
      if item == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      i += 1
      x = self.conv(int(item), name=f"conv{i}")(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x)
      x = nn.relu(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    return self.head(self.num_classes, name="head")(x)


def input_shape(dataset: str) -> tuple[int, int, int]:
  """Per-example input shape (H, W, C) of a dataset name."""
  shapes = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
  if dataset not in shapes:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(shapes)}")
  return shapes[dataset]
