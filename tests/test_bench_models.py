"""experiments/bench_models.py: the three architectures of Table 2 and the printed ratios."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from experiments import bench_models


def _param_shapes(variant):
  model = bench_models.build(variant, "butterfly")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return {jax.tree_util.keystr(k): v.shape
          for k, v in jax.tree_util.tree_leaves_with_path(shapes["params"])}


def test_head_variant_is_the_dense_vgg16_with_a_structured_head():
  dense, head, all_ = (_param_shapes(v) for v in ("dense", "head", "all"))
  kernels = lambda p: {k: s for k, s in p.items() if len(s) == 4}   # conv kernels (3, 3, in, out)
  assert len(kernels(dense)) == 13 and kernels(head) == kernels(dense)
  convs_with_twiddles = lambda p: {k.split("]")[0] for k in p if "twiddle" in k and "conv" in k}
  assert not convs_with_twiddles(dense) and not convs_with_twiddles(head)
  assert len(convs_with_twiddles(all_)) == 13   # every conv a KOPS2D (butterfly twiddles)
  dense_2d = {k: s for k, s in dense.items() if len(s) == 2}
  assert list(dense_2d.values()) == [(512, 10)]   # the one dense head
  assert not {k: s for k, s in head.items() if s == (512, 10)}   # replaced in the head model
  # a 512-point butterfly: log2(512) = 9 factors of 256 2x2 blocks, 2 * n * log2(n) twiddles
  twiddles = [k for k in set(head) - set(dense) if "twiddle" in k]
  assert len(twiddles) == 1 and int(np.prod(head[twiddles[0]])) == 2 * 512 * 9


def test_main_prints_both_ratios_against_each_baseline(monkeypatch, capsys):
  times = {"dense": (2.0, 4.0), "head": (2.2, 4.4), "all": (6.0, 8.0), "dense_xla": (20.0, 40.0)}

  def fake_bench(variant, images, batch, repeats, factorize_with, cache):
    wall, cpu = times[variant]
    return {"variant": variant, "images": images, "wall_s": wall, "cpu_s": cpu,
            "first_pass_s": 1.0, "logits": np.zeros((8, 10))}

  monkeypatch.setattr(bench_models, "bench_model", fake_bench)
  flags.FLAGS(["bench_models", "--images=10", "--repeats=1"])
  try:
    bench_models.main([])
  finally:
    flags.FLAGS.unparse_flags()
  out = capsys.readouterr().out
  assert "ratio head / dense: wall 1.10x, CPU 1.10x" in out
  assert "ratio all / dense: wall 3.00x, CPU 2.00x" in out
  assert "ratio head / dense_xla: wall 0.11x, CPU 0.11x" in out
  assert "ratio all / dense_xla: wall 0.30x, CPU 0.20x" in out


def test_unknown_variant_is_one_clear_line(monkeypatch):
  flags.FLAGS(["bench_models", "--variants=dense,butterfly"])
  try:
    with pytest.raises(SystemExit, match="--variants item 'butterfly' is not one of"):
      bench_models.main([])
  finally:
    flags.FLAGS.unparse_flags()
