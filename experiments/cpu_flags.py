"""The two CPU settings of ``sweep.py``, ``collapse.py`` and ``bench_train.py``, defined once.

Both are process-level speed choices for XLA:CPU: they change how fast a run goes, not what it
computes (beyond float32 rounding for ``--small_matmul_options``), so neither is part of a run's
key; rows record the compile options they ran with (``compiler_options``).
"""
from __future__ import annotations

from absl import flags

FLAGS = flags.FLAGS

# Default of --small_matmul_options: on, the FC's dots on XLA's Eigen matmul. Measured on
# 2-core x86-64 VMs (BUILD.md): the same FC train step (Trainer path) timed alternately in one
# process, Eigen 1.58-1.62 ms vs YNNPACK 1.79-1.81 ms (AMD EPYC, 2026-12-08, quiet); with
# PyTorch interleaved, Eigen 0.51-0.54 vs YNNPACK 0.48-0.50 of PyTorch's step on an Intel
# Xeon (noisy, within each other's spread) and YNNPACK ahead when another job shares the cores.
SMALL_MATMUL_DEFAULT = True


def define_flags() -> None:
  """Defines ``--small_matmul_options`` and ``--keep_freed_memory`` (once per process)."""
  flags.DEFINE_bool("small_matmul_options", SMALL_MATMUL_DEFAULT,
                    "Compile the FC with bfprune.platform.small_matmul_options (on CPU: XLA's "
                    "Eigen dots instead of YNNPACK: ~10% faster FC steps on a quiet 2-core CPU, "
                    "slower when another job shares the cores; rounding-level differences); "
                    "recorded in a row's compiler_options. VGG16 always compiles with the "
                    "compiler's defaults")
  flags.DEFINE_bool("keep_freed_memory", True,
                    "Make malloc keep freed memory for reuse (bfprune.platform."
                    "keep_freed_memory): saves ~9% of a VGG16 step on CPU; process-wide (in "
                    "bench_train.py it applies to PyTorch too); the process keeps its peak heap "
                    "until it exits")


def apply_keep_freed_memory() -> bool:
  """``--keep_freed_memory``: call before JAX's first computation (threads that already own a
  malloc arena keep it). Returns whether it took effect (Linux with glibc only)."""
  if not FLAGS.keep_freed_memory:
    return False
  from bfprune import platform
  return platform.keep_freed_memory()
