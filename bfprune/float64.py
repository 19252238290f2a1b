"""Where float64 work runs: the default device when it computes float64, else the host CPU.

SynFlow's R (a product of the layers' gains) overflows float32 on VGG16-sized nets, and the
collapse detector's connectivity forward relies on the same range, so both run in float64.
CPUs and GPUs compute float64; TPUs (and other accelerators JAX may find) do not, so there
these computations run on the host's CPU device instead, which every JAX install has.

This module is the one switch for that choice (``FLOAT64_PLATFORMS``); ``float64_scope`` turns
on x64 for a block only (``jax.enable_x64``, thread-local and restored on exit, so a caller's
own code keeps its dtypes) and makes the chosen device the block's default; ``place`` moves
inputs off devices without float64 (e.g. params committed to a TPU) onto it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax

# Platforms whose devices compute float64 (jax.Device.platform names; "gpu" covers CUDA / ROCm).
FLOAT64_PLATFORMS = frozenset({"cpu", "gpu", "cuda", "rocm"})


def default_device() -> jax.Device:
  """The device uncommitted computations run on: ``jax.default_device`` if set, else the
  default backend's first device."""
  dev = jax.config.jax_default_device
  if isinstance(dev, str):
    return jax.devices(dev)[0]
  return dev if dev is not None else jax.devices()[0]


def float64_device() -> jax.Device:
  """The default device when its platform computes float64, else the host's first CPU device.

  Raises:
    RuntimeError: the default device lacks float64 and JAX has no CPU backend (e.g.
      ``JAX_PLATFORMS=tpu``); one line naming the fix.
  """
  dev = default_device()
  if dev.platform in FLOAT64_PLATFORMS:
    return dev
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    raise RuntimeError(
        f"float64 is needed (SynFlow scores, collapse detection) but the default device "
        f"{dev} ({dev.platform}) has no float64 and JAX has no CPU backend: allow it, e.g. "
        f"JAX_PLATFORMS={dev.platform},cpu") from None


@contextlib.contextmanager
def float64_scope() -> Iterator[jax.Device]:
  """Within the block: x64 on and ``float64_device()`` the default device; yields that device.

  Only the block sees x64 (``jax.enable_x64`` is restored on exit): convert results to NumPy
  inside it when they must stay float64.
  """
  dev = float64_device()
  with jax.enable_x64(True), jax.default_device(dev):
    yield dev


def place(tree: Any, device: jax.Device) -> Any:
  """``tree`` with every array that lives on a device without float64 (e.g. params committed to
  a TPU) moved to ``device``; arrays on float64 devices and NumPy leaves are left where they are
  (so on CPU / GPU the computation runs where the inputs already are)."""
  def move(x):
    if isinstance(x, jax.Array) and any(d.platform not in FLOAT64_PLATFORMS
                                        for d in x.devices()):
      return jax.device_put(x, device)
    return x
  return jax.tree.map(move, tree)
