"""JAX's persistent compilation cache for sweeps (experiments.pipeline.enable_compilation_cache):
the second of two same-shaped runs in one process reads its train / eval steps from the cache
instead of compiling them; the flag's folder handling and errors.

The cache is process-wide JAX state, so the two-run check runs in a subprocess.
"""
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from experiments import pipeline  # noqa: E402

_TWO_RUNS = textwrap.dedent("""
    import logging, os, sys
    import jax, numpy as np
    from bfprune import data as data_lib
    from experiments import pipeline
    from experiments.config import RunConfig

    folder = pipeline.enable_compilation_cache(sys.argv[1])
    hits = []  # module names JAX reports as read from the persistent cache
    class Hits(logging.Handler):
      def emit(self, record):
        if record.getMessage().startswith("Persistent compilation cache hit for"):
          hits.append(record.args[0])
    log = logging.getLogger("jax._src.compiler")
    log.setLevel(logging.DEBUG)
    log.addHandler(Hits())

    rng = np.random.default_rng(0)
    images = lambda n: rng.standard_normal((n, 28, 28, 1)).astype(np.float32)
    labels = lambda n: rng.integers(0, 10, n).astype(np.int32)
    ds = data_lib.Dataset(images(512), labels(512), images(128), labels(128), 10, "mnist")
    steps = ("jit__train_chunk_impl", "jit__eval_impl")
    seen = []
    for c in (1.0, 2.0):  # same shapes, other masks
      hits.clear()
      pipeline.run_one(RunConfig(pruner="rand", compression=c, post_epochs=1), ds,
                       log=lambda _: None)
      names = sorted(os.listdir(folder))
      new = [n for n in names if n not in seen]
      seen = names
      print(c, "new steps:", sorted(n.split("-")[0] for n in new if n.startswith(steps)),
            "step hits:", sorted(h for h in hits if h.startswith(steps)))
""")


def test_second_same_shaped_run_reads_its_steps_from_the_cache(tmp_path):
  cache = tmp_path / "cache"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", _TWO_RUNS, str(cache)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  first, second = proc.stdout.strip().splitlines()[-2:]
  # Run 1 compiles and writes both steps; run 2 writes neither and reads both.
  assert first == ("1.0 new steps: ['jit__eval_impl', 'jit__train_chunk_impl'] step hits: []")
  assert second == ("2.0 new steps: [] step hits: ['jit__eval_impl', 'jit__train_chunk_impl']")


def test_enable_compilation_cache_folders(tmp_path, monkeypatch):
  import jax
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs,
            jax.config.jax_persistent_cache_min_entry_size_bytes)
  try:
    assert pipeline.enable_compilation_cache("none") is None
    assert pipeline.enable_compilation_cache(" None ") is None
    assert jax.config.jax_compilation_cache_dir == before[0]  # untouched when off
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pipeline.default_compilation_cache_dir() == tmp_path / "xdg" / "bfprune" / "jax"
    got = pipeline.enable_compilation_cache("")
    assert got == tmp_path / "xdg" / "bfprune" / "jax" and got.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(got)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == \
        pipeline.CACHE_MIN_COMPILE_SECONDS
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pipeline.default_compilation_cache_dir() == tmp_path / "home" / ".cache" / "bfprune" / "jax"
    nested = tmp_path / "a" / "b"
    assert pipeline.enable_compilation_cache(str(nested)) == nested and nested.is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(pipeline.CompilationCacheError,
                       match=r"^--compilation_cache='.*file/sub': cannot create the folder"):
      pipeline.enable_compilation_cache(str(tmp_path / "file" / "sub"))
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", before[2])


def test_sweep_flag_error_is_one_line(tmp_path):
  (tmp_path / "file").write_text("x")
  proc = subprocess.run(
      [sys.executable, str(REPO / "experiments" / "sweep.py"), "--pruner=rand",
       f"--out_dir={tmp_path / 'out'}", f"--compilation_cache={tmp_path / 'file' / 'sub'}"],
      env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "sweep.py: error: --compilation_cache=") and "Traceback" not in proc.stderr
