"""One run over several processes and hosts: JAX's multi-controller runtime from flags.

Every process runs the same script with the same flags plus its own ``--process_id``;
``jax.distributed.initialize`` joins them, after which ``jax.devices()`` lists every process's
devices and ``bfprune.train.make_mesh`` spans them all. Within a run:

* masks are computed once, on process 0, and broadcast to the others
  (``multihost_utils.broadcast_one_to_all``, see ``from_main``): pruning scores involve
  floating-point reductions whose order is not fixed on GPUs, so computing them everywhere could
  give masks differing in a tie;
* which runs to do is decided by process 0 (claims, results file) and broadcast the same way;
* only process 0 writes results rows, logs the run and removes checkpoints; every process takes
  part in orbax's checkpoint saves and restores.

With none of the flags given nothing is initialised: a single process, as before.
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Optional, TypeVar

from absl import flags

from experiments.config import ConfigError

T = TypeVar("T")
FLAGS = flags.FLAGS
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


def define_flags() -> None:
  """The multi-process flags (shared by sweep.py and collapse.py)."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator for "
                      "jax.distributed (with --num_processes and --process_id); every process "
                      "of one run gets the same value")
  flags.DEFINE_integer("num_processes", None, "Number of processes of one run "
                       "(jax.distributed; with --coordinator_address and --process_id)")
  flags.DEFINE_integer("process_id", None, "This process's index, 0 .. --num_processes - 1 "
                       "(jax.distributed; 0 writes results)")
  flags.DEFINE_string("distributed", "off", "off: one process unless --coordinator_address, "
                      "--num_processes and --process_id are given; auto: let JAX detect the "
                      "cluster (SLURM, Open MPI, Cloud TPU, ...) and its processes")


class Settings(NamedTuple):
  """What ``jax.distributed.initialize`` gets; ``auto``: all three detected by JAX."""
  coordinator_address: Optional[str]
  num_processes: Optional[int]
  process_id: Optional[int]
  auto: bool


def validate_flags() -> Optional[Settings]:
  """The distributed settings the flags ask for (None: single process); ConfigError naming the
  flag otherwise. Imports nothing heavy, so bad flags fail fast."""
  given = {name: FLAGS[name].value for name in ("coordinator_address", "num_processes",
                                                "process_id") if FLAGS[name].value is not None}
  mode = FLAGS.distributed
  if mode not in ("off", "auto"):
    raise ConfigError(f"--distributed={mode!r} is not valid; expected off or auto")
  if mode == "auto":
    if given:
      raise ConfigError(f"--distributed=auto detects the cluster itself; drop "
                        f"{', '.join('--' + n for n in given)} (or use them without "
                        "--distributed=auto)")
    return Settings(None, None, None, auto=True)
  if not given:
    return None
  missing = [n for n in ("coordinator_address", "num_processes", "process_id") if n not in given]
  if missing:
    raise ConfigError(f"{', '.join(f'--{n}={v}' for n, v in given.items())} needs "
                      f"{' and '.join('--' + n for n in missing)} too (or --distributed=auto "
                      "to let JAX detect the cluster)")
  address, n, i = given["coordinator_address"], given["num_processes"], given["process_id"]
  match = _ADDRESS.match(address)
  if match is None or not 0 < int(match.group(2)) < 65536:
    raise ConfigError(f"--coordinator_address={address!r} is not host:port (port 1-65535)")
  if n < 1:
    raise ConfigError(f"--num_processes={n} must be >= 1")
  if not 0 <= i < n:
    raise ConfigError(f"--process_id={i} must be in [0, {n - 1}] (--num_processes={n})")
  return Settings(address, n, i, auto=False)


def initialize(settings: Optional[Settings]) -> None:
  """Joins the run's processes (nothing for None). Call before any JAX computation."""
  if settings is None:
    return
  import jax
  # Cross-process collectives on CPU (tests, CPU clusters) need an implementation; GPUs and
  # TPUs bring their own and ignore this option.
  if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if settings.auto:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(settings.coordinator_address, settings.num_processes,
                               settings.process_id)


def process_index() -> int:
  import jax
  return jax.process_index()


def is_main() -> bool:
  """Whether this is process 0, the one that writes results (always True single-process)."""
  return process_index() == 0


def from_main(compute: Callable[[], T], like: Optional[T] = None) -> T:
  """``compute()`` on process 0, its result sent to every process (a pytree of arrays, or a
  plain number / bool; ``None`` leaves kept). Other processes do not call ``compute``; they
  need ``like``, a pytree of the same structure, shapes and dtypes. Single-process: just
  ``compute()``.

  Booleans travel as uint8 (the broadcast sums the source's value with zeros).
  """
  import jax
  import numpy as np
  if jax.process_count() == 1:
    return compute()
  from jax.experimental import multihost_utils
  if is_main():
    value = compute()
  elif like is None:
    raise ValueError("from_main needs `like` on processes other than 0")
  else:
    value = like
  leaves, treedef = jax.tree.flatten(value)
  arrays = [np.asarray(x) for x in leaves]
  sent = multihost_utils.broadcast_one_to_all(
      [a.astype(np.uint8) if a.dtype == bool else a for a in arrays])
  got = [np.asarray(s).astype(a.dtype) for s, a in zip(sent, arrays)]
  out = [g if isinstance(x, (np.ndarray, jax.Array)) else g.item() for g, x in zip(got, leaves)]
  return jax.tree.unflatten(treedef, out)


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (nothing single-process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def same_on_every_process(tree: Any, what: str) -> None:
  """Raises AssertionError naming ``what`` unless ``tree`` is equal on every process."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.assert_equal(tree, f"{what} differ between processes")
