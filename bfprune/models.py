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
conv3x3: LayerFn = functools.partial(
    nn.Conv, kernel_size=(3, 3), padding=1, kernel_init=kaiming_normal,
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
