"""Where float64 work runs (bfprune.float64): SynFlow scores and collapse detection on the default
device where it has float64, on the host CPU where it has none (TPU), with x64 scoped to the call.

A TPU cannot be had here; the host path is exercised by declaring the CPU platform to lack
float64 (the module's one switch, ``FLOAT64_PLATFORMS``), in a subprocess with two host CPU
devices so that "default device" (cpu:1) and "host device" (cpu:0) really differ.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bfprune import float64, metrics, models
from bfprune.pruning import masks as M
from bfprune.pruning import scores as S

REPO = Path(__file__).resolve().parents[1]


class _FakeDevice:
  def __init__(self, platform: str):
    self.platform = platform


@pytest.mark.parametrize("platform", ["cpu", "gpu", "cuda", "rocm"])
def test_float64_device_is_the_default_where_it_has_float64(platform, monkeypatch):
  fake = _FakeDevice(platform)
  monkeypatch.setattr(float64, "default_device", lambda: fake)
  assert float64.float64_device() is fake


@pytest.mark.parametrize("platform", ["tpu", "METAL"])
def test_float64_device_is_the_host_cpu_elsewhere(platform, monkeypatch):
  monkeypatch.setattr(float64, "default_device", lambda: _FakeDevice(platform))
  assert float64.float64_device() == jax.devices("cpu")[0]


def test_no_cpu_backend_is_one_clear_line(monkeypatch):
  monkeypatch.setattr(float64, "default_device", lambda: _FakeDevice("tpu"))
  def devices(backend=None):
    raise RuntimeError(f"Backend '{backend}' failed to initialize: ... (a long JAX message)")
  monkeypatch.setattr(jax, "devices", devices)
  with pytest.raises(RuntimeError, match=r"has no float64 and JAX has no CPU backend: allow it, "
                                         r"e\.g\. JAX_PLATFORMS=tpu,cpu$"):
    float64.float64_device()


def test_default_device_follows_jax_default_device():
  cpu = jax.devices("cpu")[0]
  assert float64.default_device() == jax.devices()[0]
  with jax.default_device(cpu):
    assert float64.default_device() == cpu
  with jax.default_device("cpu"):
    assert float64.default_device() == cpu


def _fc_setup():
  model = models.FC(hidden=(16, 8), dropout_rate=0.0)
  params = model.init(jax.random.key(0), jnp.ones((1, 12)))["params"]
  rng = np.random.default_rng(0)
  masks = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.asarray(rng.random(v.shape) < 0.5) if M.path_names(p)[-1] == "kernel"
      else None, params)
  return model, params, masks


def test_x64_is_scoped_to_the_call():
  """SynFlow and the collapse detector compute in float64 but leave the caller in float32."""
  model, params, masks = _fc_setup()
  apply_fn = lambda p, x: model.apply({"params": p}, x, train=False)
  assert not jax.config.jax_enable_x64
  scores = S.synflow_scores(apply_fn, params, masks, (12,))
  assert all(s.dtype == np.float64 for s in jax.tree.leaves(scores))
  assert metrics.detect_collapse(model, params, masks, (12,)) == (False, None)
  assert not jax.config.jax_enable_x64
  assert jnp.asarray(1.0).dtype == jnp.float32 and jnp.ones(2).dtype == jnp.float32
  assert float64.default_device() == jax.devices()[0]


def test_host_path_in_process_equals_default_path(monkeypatch):
  """With the CPU declared float64-less, every input is re-placed on the host device; results are
  bit-identical to the default path (one device here; the subprocess test below uses two)."""
  model, params, masks = _fc_setup()
  apply_fn = lambda p, x: model.apply({"params": p}, x, train=False)
  ref = S.synflow_scores(apply_fn, params, masks, (12,))
  ref_collapse = metrics.detect_collapse(model, params, masks, (12,))
  moved = []
  real_put = jax.device_put
  monkeypatch.setattr(float64, "FLOAT64_PLATFORMS", frozenset())
  monkeypatch.setattr(jax, "device_put", lambda x, d=None, **k: moved.append(d) or real_put(x, d, **k))
  got = S.synflow_scores(apply_fn, params, masks, (12,))
  assert moved and all(d == jax.devices("cpu")[0] for d in moved)
  jax.tree.map(np.testing.assert_array_equal, got, ref)
  assert metrics.detect_collapse(model, params, masks, (12,)) == ref_collapse


_TWO_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from bfprune import float64, metrics, models
    from bfprune.pruning import masks as M, scores as S

    cpu0, cpu1 = jax.devices("cpu")[:2]
    jax.config.update("jax_default_device", cpu1)  # the "accelerator"; cpu0 plays the host

    seen = []  # devices of every jitted result computed by the library
    def spy(fn):
      def call(*a, **k):
        out = fn(*a, **k)
        seen.append({d for l in jax.tree.leaves(out) if isinstance(l, jax.Array)
                     for d in l.devices()})
        return out
      return call
    S._synflow_jit = spy(S._synflow_jit)
    real_jit = jax.jit
    jax.jit = lambda f, *a, **k: spy(real_jit(f, *a, **k))

    def run(case):
      seen.clear()
      model = models.FC(hidden=(16, 8), dropout_rate=0.0)
      params = jax.device_put(model.init(jax.random.key(0), jnp.ones((1, 12)))["params"], cpu1)
      rng = np.random.default_rng(0)
      masks = jax.tree_util.tree_map_with_path(
          lambda p, v: jax.device_put(rng.random(v.shape) < 0.5, cpu1)
          if M.path_names(p)[-1] == "kernel" else None, params)
      apply_fn = lambda p, x: model.apply({"params": p}, x, train=False)
      sf = S.synflow_scores(apply_fn, params, masks, (12,))
      vgg = models.VGG16(plan=(4, "M", 4), batch_norm=True, dropout_rate=0.0)
      v = jax.device_put(vgg.init(jax.random.key(1), jnp.ones((1, 8, 8, 3))), cpu1)
      vm = jax.tree_util.tree_map_with_path(
          lambda p, x: jax.device_put(jnp.ones(x.shape, bool).at[..., 0].set(False), cpu1)
          if M.path_names(p)[-1] == "kernel" else None, v["params"])
      col = metrics.detect_collapse(vgg, v, vm, (8, 8, 3))
      dead = jax.tree.map(lambda m: m & False if m.ndim == 4 and m.shape[-1] == 4 else m, vm)
      col_dead = metrics.detect_collapse(vgg, v, dead, (8, 8, 3))
      devs = set().union(*seen)
      print(case, sorted(str(d) for d in devs), col, col_dead)
      return sf, devs, (col, col_dead)

    sf_default, devs_default, col_default = run("default")
    float64.FLOAT64_PLATFORMS = frozenset()  # the default platform (cpu) "has no float64"
    assert float64.float64_device() == cpu0
    sf_host, devs_host, col_host = run("host")
    assert devs_default == {cpu1}, devs_default
    assert devs_host == {cpu0}, devs_host
    assert col_default == col_host == ((False, None), (True, "conv1")), (col_default, col_host)
    for a, b in zip(jax.tree.leaves(sf_default), jax.tree.leaves(sf_host)):
      assert a.dtype == np.float64 and np.array_equal(a, b)
    assert not jax.config.jax_enable_x64
    print("OK")
""")


def test_host_path_on_another_device_equals_default_path():
  """Two host CPU devices: params and masks committed to cpu:1 (the default device); with cpu
  declared float64-less, SynFlow and the collapse detector (BatchNorm state included) run on
  cpu:0 and give bit-identical results to the default path, which runs on cpu:1."""
  env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                     " --xla_force_host_platform_device_count=2").strip(),
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "OK", proc.stdout
