"""experiments/bench_models.py: the three architectures of Table 2 and the printed ratios.

Each check runs in its own process: the script defines absl flags at import (``--repeats`` as
bench_train.py does), so importing both into the test process would collide.
"""
import json
import math
import os
import subprocess
import sys
import textwrap

from conftest import REPO


def _python(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, text=True,
                        capture_output=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)))


def test_head_variant_is_the_dense_vgg16_with_a_structured_head():
  proc = _python("""
      import json, jax, jax.numpy as jnp
      from experiments import bench_models
      out = {}
      for v in ("dense", "head", "all"):
        shapes = jax.eval_shape(bench_models.build(v, "butterfly").init, jax.random.key(0),
                                jnp.zeros((1, 32, 32, 3)))["params"]
        out[v] = {jax.tree_util.keystr(k): list(s.shape)
                  for k, s in jax.tree_util.tree_leaves_with_path(shapes)}
      print(json.dumps(out))
      """)
  assert proc.returncode == 0, proc.stderr[-3000:]
  p = json.loads(proc.stdout.splitlines()[-1])
  dense, head, all_ = p["dense"], p["head"], p["all"]
  kernels = lambda d: {k: s for k, s in d.items() if len(s) == 4}   # (3, 3, in, out)
  assert len(kernels(dense)) == 13 and kernels(head) == kernels(dense)
  with_twiddles = lambda d: {k.split("]")[0] for k in d if "twiddle" in k and "conv" in k}
  assert not with_twiddles(dense) and not with_twiddles(head)
  assert len(with_twiddles(all_)) == 13   # every conv a KOPS2D (butterfly twiddles)
  assert [s for s in dense.values() if len(s) == 2] == [[512, 10]]   # the one dense head
  assert [512, 10] not in head.values()                               # replaced in the head model
  # a 512-point butterfly: log2(512) = 9 factors of 256 2x2 blocks, 2 n log2(n) twiddles
  twiddles = [s for k, s in head.items() if k not in dense and "twiddle" in k]
  assert len(twiddles) == 1 and math.prod(twiddles[0]) == 2 * 512 * 9


def test_main_prints_both_ratios_against_each_baseline():
  proc = _python("""
      import numpy as np
      from absl import flags
      from experiments import bench_models
      times = {"dense": (2.0, 4.0), "head": (2.2, 4.4), "all": (6.0, 8.0),
               "dense_xla": (20.0, 40.0)}
      def fake(variant, images, batch, repeats, factorize_with, cache):
        wall, cpu = times[variant]
        return {"variant": variant, "images": images, "wall_s": wall, "cpu_s": cpu,
                "first_pass_s": 1.0, "logits": np.zeros((8, 10))}
      bench_models.bench_model = fake
      flags.FLAGS(["bench_models", "--images=10", "--repeats=1"])
      bench_models.main([])
      """)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "ratio head / dense: wall 1.10x, CPU 1.10x" in out
  assert "ratio all / dense: wall 3.00x, CPU 2.00x" in out
  assert "ratio head / dense_xla: wall 0.11x, CPU 0.11x" in out
  assert "ratio all / dense_xla: wall 0.30x, CPU 0.20x" in out


def test_unknown_variant_is_one_clear_line():
  proc = subprocess.run([sys.executable, str(REPO / "experiments" / "bench_models.py"),
                         "--variants=dense,butterfly"], cwd=REPO, text=True,
                        capture_output=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      "bench_models.py: error: --variants item 'butterfly' is not one of "
      "('dense', 'head', 'all', 'dense_xla')")
