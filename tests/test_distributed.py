"""Data parallelism over devices and processes: the compiled step's only collective is the
all-reduce (butterfly layers are not partitioned), BatchNorm statistics averaged over devices,
and a sweep over 2 processes x 2 CPU devices equal to 1 process x 4 devices, killed and resumed.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import REPO, data_dir

SWEEP = [sys.executable, str(REPO / "experiments" / "sweep.py")]

_STEP_SCRIPT = textwrap.dedent("""
    import json, re, jax, jax.numpy as jnp, numpy as np, optax
    from bfprune import data, models, train
    from bfprune.pruning import masks as masks_lib
    from experiments import pipeline
    from experiments.config import RunConfig
    assert jax.device_count() == 4, jax.devices()

    def setup(model, x, y, n=4, augment=None):
      variables = jax.jit(model.init)(jax.random.key(0), x[:1])
      masks = masks_lib.ones_like(variables["params"])
      trainer = train.Trainer(model, train.adam(1e-3), train.make_mesh(jax.devices()[:n]),
                              augment=augment)
      state = trainer.put(train.init_state(variables, masks, trainer.tx))
      return variables, trainer, state, trainer.put((jnp.asarray(x), jnp.asarray(y), masks))

    def collectives(trainer, state, args, idx):
      text = trainer.lower_train_steps(state, args[0], args[1], idx,
                                       jax.random.key(0)).compile().as_text()
      ops = re.findall(r"\\b(all-reduce|all-gather|all-to-all|collective-permute|"
                       r"reduce-scatter|collective-broadcast)(?:-start)?\\(", text)
      return {op: ops.count(op) for op in set(ops)}

    rng = np.random.default_rng(0)
    out = {}
    # The FC with every layer butterfly / K-matrix (as --factorize=all), and the dense FC.
    x = rng.normal(size=(512, 784)).astype(np.float32)
    y = rng.integers(0, 10, 512).astype(np.int32)
    idx = train.epoch_indices(len(x), 128, 0, 0)  # 4 steps of 128
    model = pipeline.build_model(RunConfig(factorize="all", dropout=0.0))
    for n in (1, 4):
      _, trainer, state, (xs, ys, m) = setup(model, x, y, n)
      if n == 4:  # compiled once: train_steps reuses it
        out["butterfly_ops"] = collectives(trainer, state, (xs, ys, m), idx)
      state, losses = trainer.train_steps(state, m, xs, ys, idx, jax.random.key(0))
      out[f"butterfly_{n}"] = {"losses": np.asarray(losses).tolist(),
                               "params": [np.asarray(p).ravel()[:64].tolist()
                                          for p in jax.tree.leaves(state.params)]}
    _, trainer, state, args = setup(models.FC(dropout_rate=0.0), x, y)
    out["dense_ops"] = collectives(trainer, state, args, idx)

    # VGG16's layers with BatchNorm (one conv block, no dropout): one step on 4 devices.
    model = models.VGG16(plan=(8, "M"), batch_norm=True, dropout_rate=0.0)
    # Slices with different means, so their statistics differ from the whole batch's.
    xi = (rng.normal(size=(16, 32, 32, 3)) + np.repeat(np.arange(4), 4)[:, None, None, None]
          ).astype(np.float32)
    yi = rng.integers(0, 10, 16).astype(np.int32)
    step = np.arange(16)[None]
    variables, trainer, state, (xs, ys, m) = setup(model, xi, yi)
    out["vgg_ops"] = collectives(trainer, state, (xs, ys, m), step)
    new, losses = trainer.train_steps(state, m, xs, ys, step, jax.random.key(0))
    # Independently: each device's slice (batch rows 4d .. 4d+3) through the model.
    fwd = jax.jit(lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"]))
    parts = [fwd(xi[4 * d:4 * d + 4]) for d in range(4)]
    slice_loss = np.mean([optax.softmax_cross_entropy_with_integer_labels(
        logits, yi[4 * d:4 * d + 4]).mean() for d, (logits, _) in enumerate(parts)])
    old = variables["batch_stats"]
    delta = lambda st: [np.asarray(a) - np.asarray(b) for a, b in
                        zip(jax.tree.leaves(st), jax.tree.leaves(old))]
    want = [np.mean(ds, axis=0) for ds in zip(*[delta(u["batch_stats"]) for _, u in parts])]
    whole = delta(fwd(xi)[1]["batch_stats"])
    got = delta(new.batch_stats)
    err = lambda a, b: max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))
    out["bn"] = {"vs_slices": err(got, want), "vs_whole": err(got, whole),
                 "scale": max(float(np.max(np.abs(w))) for w in want),
                 "loss": float(losses[0]), "slice_loss": float(slice_loss),
                 "replicated": all(a.is_fully_replicated
                                   for a in jax.tree.leaves(new.batch_stats))}
    # CIFAR-10 augmentation inside the step.
    _, trainer, state, args = setup(model, xi, yi, augment=data.augment_cifar)
    out["augment_ops"] = collectives(trainer, state, args, step)
    print(json.dumps(out))
""")


def test_the_data_parallel_step_has_one_all_reduce_and_no_partitioned_layers():
  """On 4 forced CPU devices: the compiled steps of the all-butterfly FC, the dense FC and a
  VGG16 block with BatchNorm (with and without augmentation) hold all-reduces and no other
  collective; the butterfly FC trains as on one device (its custom VJP inside shard_map); the
  BatchNorm running statistics move by the mean of the four slices' updates."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _STEP_SCRIPT], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for name in ("butterfly", "dense", "vgg", "augment"):
    ops = out[f"{name}_ops"]
    assert set(ops) == {"all-reduce"}, (name, ops)  # no all-gather / all-to-all / permute
  one, four = out["butterfly_1"], out["butterfly_4"]
  np.testing.assert_allclose(four["losses"], one["losses"], atol=2e-5, rtol=0)
  for a, b in zip(four["params"], one["params"]):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
  bn = out["bn"]
  assert bn["vs_slices"] <= 1e-6 + 1e-5 * bn["scale"], bn  # float32 rounding of stats ~1
  assert bn["vs_whole"] > 0.05 * bn["scale"], bn  # the whole batch's statistics differ
  assert abs(bn["loss"] - bn["slice_loss"]) < 1e-5 and bn["replicated"], bn


# ------------------------------------------------------------------ multi-process sweeps


@pytest.mark.parametrize("script", ["sweep.py", "collapse.py"])
@pytest.mark.parametrize("args, message", [
    (["--num_processes=2"], "--num_processes=2 needs --coordinator_address and --process_id"),
    (["--coordinator_address=h:1", "--process_id=0"], "needs --num_processes too"),
    (["--distributed=auto", "--process_id=1"], "--distributed=auto detects the cluster itself; "
                                               "drop --process_id"),
    (["--distributed=yes"], "--distributed='yes' is not valid; expected off or auto"),
    (["--coordinator_address=nohost", "--num_processes=2", "--process_id=0"],
     "--coordinator_address='nohost' is not host:port"),
    (["--coordinator_address=h:70000", "--num_processes=2", "--process_id=0"], "is not host:port"),
    (["--coordinator_address=h:1", "--num_processes=0", "--process_id=0"],
     "--num_processes=0 must be >= 1"),
    (["--coordinator_address=h:1", "--num_processes=2", "--process_id=2"],
     "--process_id=2 must be in [0, 1] (--num_processes=2)"),
    (["--batch_size=6"], "--batch_size=6 is not divisible by the 4 devices"),
])
def test_bad_distributed_flags_are_one_line(script, args, message, tmp_path):
  extra = ["--pruners=rand", "--searches=collapse"] if script == "collapse.py" else []
  proc = subprocess.run([sys.executable, str(REPO / "experiments" / script)] + args + extra
                        + [f"--out_dir={tmp_path / 'out'}"], env=_env(4), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith(f"{script}: error: ") and message in line, proc.stderr[-2000:]
  assert not (tmp_path / "out").exists()



def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int):
  return dict(os.environ, BFPRUNE_DATA_DIR=str(data_dir()), JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _start_pair(args, out):
  port = _free_port()
  return [subprocess.Popen(SWEEP + args + [f"--out_dir={out}", f"--coordinator_address="
                                           f"127.0.0.1:{port}", "--num_processes=2",
                                           f"--process_id={i}"],
                           env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for i in range(2)]


def _rows(out):
  path = out / "results.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def test_two_processes_match_one_process_with_four_devices_and_resume_after_a_kill(tmp_path):
  args = ["--pruner=snip", "--compression=1", "--post_epochs=3", "--train_examples=1024"]
  one = subprocess.Popen(SWEEP + args + [f"--out_dir={tmp_path / 'one'}"], env=_env(4),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # Two processes, killed (both, SIGKILL) once a post-pruning epoch is checkpointed.
  two = tmp_path / "two"
  pair = _start_pair(args, two)
  deadline = time.time() + 300
  ckpts = two / "checkpoints"
  while time.time() < deadline and all(p.poll() is None for p in pair):
    steps = [int(p.name) for d in (ckpts.iterdir() if ckpts.exists() else [])
             for p in d.iterdir() if p.name.isdigit()]
    if steps and max(steps) >= 2:  # 1: just pruned; 2: after the first epoch
      break
    time.sleep(0.05)
  assert all(p.poll() is None for p in pair), [p.communicate()[1][-2000:] for p in pair]
  for p in pair:
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert _rows(two) == []
  pair = _start_pair(args, two)
  outs = [p.communicate(timeout=600) for p in pair]
  for p, (_, err) in zip(pair, outs):
    assert p.returncode == 0, err[-3000:]
  assert "resumed from" in outs[0][1]  # process 0 logs; it restored the checkpoint
  assert "resumed from" not in outs[1][1] and "sweep:" not in outs[1][0]  # process 1 is quiet
  assert outs[0][0].strip().splitlines()[-1].startswith("sweep: 1 of 1 runs finished (1 new")
  stdout, err = one.communicate(timeout=600)
  assert one.returncode == 0, err[-3000:]

  (ref,) = _rows(tmp_path / "one")
  (row,) = _rows(two)  # exactly one row, from process 0
  assert len(row["devices"]) == len(ref["devices"]) == 4 and row["processes"] == 2
  assert ref["processes"] == 1 and row["devices"] != ref["devices"]  # other device ids
  assert row["mask_sha256"] == ref["mask_sha256"] and row["run_key"] == ref["run_key"]
  assert row["density"] == ref["density"]
  np.testing.assert_allclose([h["train_loss"] for h in row["history"]],
                             [h["train_loss"] for h in ref["history"]], atol=1e-4, rtol=0)
  np.testing.assert_allclose([h["test_loss"] for h in row["history"]],
                             [h["test_loss"] for h in ref["history"]], atol=1e-4, rtol=0)
  assert abs(row["test_loss"] - ref["test_loss"]) < 1e-4
  assert abs(row["top1"] - ref["top1"]) <= 0.05
  assert sorted(p.name for p in two.iterdir()) == ["results.jsonl"]  # checkpoints, claims gone
