"""``platform_call``: one function for CPUs, another for every other platform, chosen at lowering.

``jax.lax.platform_dependent`` does the same but lowers, even for a single platform, to a
two-branch ``stablehlo.case`` on a constant platform index plus a one-branch case around the
kept function. Compilers fold them, yet an exported module (``jax.export`` for CUDA / TPU) then
holds conditionals, which XLA:GPU would run by copying the predicate to the host. Here a
primitive carries both functions as jaxprs and has one lowering rule per platform, so a module
lowered for one platform holds exactly that platform's function, with no conditional (lowered
for several platforms at once, JAX itself switches between the rules on the platform index).

Differentiation: the JVP rule falls back to ``platform_dependent`` of the two functions' JVPs
(a constant-index conditional), so higher-order derivatives work everywhere. Code that wants
conditional-free first-order gradients wraps the call in a ``jax.custom_vjp`` whose forward and
backward passes are themselves ``platform_call``s (see ``bfprune.conv``).

``keep_freed_memory`` is a CPU runtime knob of the same kind: an opt-in process setting.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any, Callable

import jax
from jax.extend.core import Primitive, jaxpr_as_fun
from jax.interpreters import ad, batching, mlir

_platform_call_p = Primitive("bfprune_platform_call")
_platform_call_p.multiple_results = True


def platform_call(*args: Any, cpu: Callable, default: Callable) -> Any:
  """``cpu(*args)`` in a program lowered for CPU, ``default(*args)`` elsewhere.

  ``args`` is a pytree of arrays; both functions must return the same pytree of arrays (same
  shapes and dtypes) and see only ``args`` (arrays they close over become constants).
  """
  flat, in_tree = jax.tree.flatten(args)
  avals = [jax.ShapeDtypeStruct(jax.numpy.shape(a), jax.numpy.result_type(a)) for a in flat]

  def traced(fn):
    return jax.make_jaxpr(lambda *leaves: fn(*jax.tree.unflatten(in_tree, leaves)),
                          return_shape=True)(*avals)

  cpu_jaxpr, cpu_out = traced(cpu)
  default_jaxpr, default_out = traced(default)
  out_tree = jax.tree.structure(cpu_out)
  shapes = lambda out: [(o.shape, o.dtype) for o in jax.tree.leaves(out)]
  if out_tree != jax.tree.structure(default_out) or shapes(cpu_out) != shapes(default_out):
    raise TypeError(f"platform_call: the two functions return different results: {cpu_out} "
                    f"vs {default_out}")
  out = _platform_call_p.bind(*flat, cpu=cpu_jaxpr, default=default_jaxpr)
  return jax.tree.unflatten(out_tree, out)


def _impl(*args, cpu, default):
  """Eager evaluation (e.g. under ``jax.disable_jit``): by the platform of the arguments."""
  platforms = {d.platform for a in args if isinstance(a, jax.Array) for d in a.devices()}
  use_cpu = platforms == {"cpu"} if platforms else jax.default_backend() == "cpu"
  return jaxpr_as_fun(cpu if use_cpu else default)(*args)


def _lowering(ctx, *args, cpu, default, use_cpu: bool):
  return mlir.lower_fun(jaxpr_as_fun(cpu if use_cpu else default), multiple_results=True)(
      ctx, *args)


def _jvp(primals, tangents, *, cpu, default):
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  fn = lambda *a: jax.lax.platform_dependent(*a, cpu=jaxpr_as_fun(cpu),
                                             default=jaxpr_as_fun(default))
  return jax.jvp(fn, tuple(primals), tuple(tangents))


def _batch(args, dims, *, cpu, default):
  vmapped = lambda j: jax.vmap(jaxpr_as_fun(j), in_axes=tuple(dims), out_axes=0)
  out = platform_call(*args, cpu=vmapped(cpu), default=vmapped(default))
  return out, [0] * len(out)


_platform_call_p.def_impl(_impl)
_platform_call_p.def_abstract_eval(lambda *avals, cpu, default: cpu.out_avals)
mlir.register_lowering(_platform_call_p, functools.partial(_lowering, use_cpu=False))
mlir.register_lowering(_platform_call_p, functools.partial(_lowering, use_cpu=True),
                       platform="cpu")
ad.primitive_jvps[_platform_call_p] = _jvp
batching.primitive_batchers[_platform_call_p] = _batch


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

  XLA:CPU allocates a jitted step's temporaries afresh on every call (0.76 GB for a VGG16 train
  step at batch 256). glibc serves blocks over 32 MB by ``mmap`` and unmaps them on free, so
  every step page-faults (and the kernel zeroes) all of it again: 0.55 s of system time per
  VGG16 step on a 2-core x86-64 CPU, ~9% of the step. With one malloc arena, no ``mmap``
  blocks and no trimming below 2 GB of free heap, the second step reuses the first one's pages
  (system time 0.01 s per step). The cost: the process keeps its peak heap until it exits.

  Process-wide and opt-in; call it before JAX's first computation (later, the threads that
  already own a malloc arena keep it). Returns whether it was applied (Linux with glibc only).
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1),
              (_M_TOP_PAD, 64 << 20))
  return all(mallopt(param, value) == 1 for param, value in settings)


# XLA:CPU sends every plain dot to YNNPACK by default; an empty list of YNNPACK fusion types
# (DebugOptions.xla_cpu_experimental_ynn_fusion_type) leaves them to XLA's own (Eigen) matmul.
_EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def small_matmul_options(platform: str) -> dict[str, str]:
  """``jax.jit(..., compiler_options=...)`` for programs made of small matmuls (an MLP of
  width ~100 at batch 256): on ``platform="cpu"`` the dots run on XLA's Eigen matmul instead of
  YNNPACK. On 2-core x86-64 VMs (2026-12-07/08) that made the FC train step 1.1-1.6x faster
  with nothing else running (AMD EPYC; on an Intel Xeon the two were within noise), but ~1.3x
  slower with a second job on the cores; VGG16's large conv matmuls got 8-23 % slower. Hence
  opt-in per program (``experiments/sweep.py`` turns it on for the FC). Empty (the compiler's
  defaults) on every other platform, and where this jaxlib does not know the (experimental)
  option. Same float32 math, another blocking: results agree to rounding, not bit for bit.
  """
  return dict(_EIGEN_DOTS) if platform == "cpu" and _cpu_takes_eigen_dots() else {}


@functools.cache
def _cpu_takes_eigen_dots() -> bool:
  """Whether this jaxlib's CPU compiler knows ``_EIGEN_DOTS`` (compiles a scalar add once)."""
  try:
    with jax.default_device(jax.devices("cpu")[0]):
      jax.jit(lambda x: x + 1, compiler_options=_EIGEN_DOTS)(0.0).block_until_ready()
  except Exception:  # an unknown option or value: jaxlib says so only when compiling
    return False
  return True
