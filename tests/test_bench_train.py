"""experiments/bench_train.py --per_layer: the VGG16 conv shapes and the per-op table."""
import re

import pytest

from bfprune import models
from experiments import bench_train


def test_vgg16_conv_shapes_follow_the_plan():
  shapes = models.vgg16_conv_shapes()
  assert len(shapes) == 13 == sum(1 for item in models.VGG16_PLAN if item != "M")
  assert shapes[0] == (32, 3, 64) and shapes[1] == (32, 64, 64) and shapes[-1] == (2, 512, 512)
  for (_, _, cout), (_, cin, _) in zip(shapes, shapes[1:]):
    assert cin == cout
  # 2 * 9 * H * W * Cin * Cout summed: VGG16's forward conv multiply-adds on a 32x32 image
  assert sum(h * h * 9 * ci * co for h, ci, co in shapes) == 313_196_544


def test_per_layer_times_each_op_and_the_table_sums_them(monkeypatch, capsys):
  monkeypatch.setattr(models, "vgg16_conv_shapes", lambda: [(4, 16, 8), (2, 8, 16)])
  rows = bench_train.per_layer(batch=2, repeats=1, with_torch=False)
  assert [(r["hw"], r["cin"], r["cout"]) for r in rows] == [(4, 16, 8), (2, 8, 16)]
  assert all(r[k] > 0 for r in rows for k in ("fwd", "dx", "dk"))
  fake = [dict(layer="conv1", hw=4, cin=16, cout=8, fwd=1.0, dx=2.0, dk=3.0, torch_fwd=2.0,
               torch_dx=2.0, torch_dk=2.0),
          dict(layer="conv2", hw=2, cin=8, cout=16, fwd=4.0, dx=5.0, dk=6.0, torch_fwd=1.0,
               torch_dx=1.0, torch_dk=1.0)]
  bench_train.print_per_layer(fake, batch=2, repeats=1)
  lines = capsys.readouterr().out.splitlines()
  total = next(line for line in lines if line.startswith("total")).split()
  # fwd dx dk sum | torch fwd dx dk sum | ratio
  assert [float(v) for v in total[1:]] == pytest.approx([5, 7, 9, 21, 3, 3, 3, 9, 21 / 9],
                                                        abs=0.01)
  conv1 = next(line for line in lines if line.startswith("conv1"))
  assert re.search(r"\s6\.0\s+2\.0\s+2\.0\s+2\.0\s+6\.0\s+1\.00$", conv1)


def test_run_times_chunks_of_back_to_back_calls_and_divides_by_all_their_steps(monkeypatch):
  """A timed chunk is ``calls`` jitted calls; step_ms divides by steps x calls, PyTorch runs
  the same number of steps, and the first (compiling) chunk is one call, untimed, followed by
  ``warmup`` - 1 untimed chunks."""
  seen = []

  class FakeBench:
    dataset = "mnist"

    def __init__(self, *args):
      pass

    def chunk(self, calls=1):
      seen.append(("jax", calls))
      return 0.8 * calls, 1.6 * calls  # 0.8 s wall per call

  class FakeTorch:
    def __init__(self, name, bench):
      pass

    def chunk(self, calls=1):
      seen.append(("torch", calls))
      return 2.0 * calls, 4.0 * calls

  monkeypatch.setattr(bench_train, "Bench", FakeBench)
  monkeypatch.setattr(bench_train, "TorchBench", FakeTorch)
  r = bench_train.run("fc", steps=64, repeats=2, batch=256, factorize="none", with_torch=True,
                      calls=4, warmup=2)
  # compile chunk (one call), one more untimed warm-up chunk, two timed chunks; alternating
  assert seen == [("jax", 1), ("torch", 1)] + [("jax", 4), ("torch", 4)] * 3
  assert r["step_ms"] == pytest.approx(1e3 * 0.8 / 64) and r["first_chunk_s"] == 0.8
  assert r["torch_ms"] == pytest.approx(1e3 * 2.0 / 64) and r["ratio"] == pytest.approx(0.4)
  assert bench_train.default_calls("fc") == 4 and bench_train.default_calls("vgg16") == 1
