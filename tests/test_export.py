"""The GPU / TPU lowering, checked on this CPU-only jaxlib: ``jax.export`` for
``platforms=["cuda"]`` and ``["tpu"]`` of the butterfly, a butterfly layer and the study's
train steps (FC and VGG16; dense, butterfly head, everything factorized) must succeed, and
the modules must hold no multi-branch ``stablehlo.case`` (on XLA:GPU every conditional
copies its predicate to the host and waits) and no custom call (CPU-only kernels).

Nothing is compiled: export stops at StableHLO, so no accelerator is needed.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from bfprune import data as data_lib
from bfprune import train
from bfprune.pruning import masks as masks_lib
from bfprune.structured import butterfly as bf
from bfprune.structured.layers import ButterflyDense
from experiments import pipeline
from experiments.config import RunConfig

PLATFORMS = ("cuda", "tpu")


def case_branch_counts(text: str) -> list[int]:
  """Number of regions (branches) of every ``stablehlo.case`` op in MLIR text.

  The generic form is ``"stablehlo.case"(%index) ({ ... }, { ... }) : ...``: after the
  operand list comes the parenthesised region list, whose top-level ``{`` open the regions
  (string attributes are skipped, they may hold brackets).
  """
  counts = []
  for m in re.finditer(r'"stablehlo\.case"\(', text):
    i = text.index(")", m.end()) + 1            # end of the operand list (%index)
    i = text.index("(", i) + 1                  # start of the region list
    parens, braces, regions, in_str = 1, 0, 0, False
    while parens:
      c = text[i]
      if in_str:
        if c == "\\":
          i += 1
        elif c == '"':
          in_str = False
      elif c == '"':
        in_str = True
      elif c == "{":
        regions += parens == 1 and braces == 0
        braces += 1
      elif c == "}":
        braces -= 1
      elif c == "(":
        parens += 1
      elif c == ")":
        parens -= 1
      i += 1
    counts.append(regions)
  return counts


def check_portable(text: str, what: str) -> None:
  branches = [c for c in case_branch_counts(text) if c > 1]
  assert not branches, f"{what}: {len(branches)} multi-branch stablehlo.case ops"
  targets = set(re.findall(r"stablehlo\.custom_call @([\w.$-]+)", text))
  assert not targets, f"{what}: custom calls {sorted(targets)}"


def export_text(fn, args, platform: str) -> str:
  return jax.export.export(fn, platforms=[platform])(*args).mlir_module()


def test_case_counter_on_known_modules():
  text = '''%0 = "stablehlo.case"(%arg0) ({
    stablehlo.return %a : tensor<f32> loc("x{")
  }, {
    %1 = "stablehlo.case"(%arg1) ({
      stablehlo.return %b : tensor<f32>
    }) : (tensor<i32>) -> tensor<f32>
    stablehlo.return %1 : tensor<f32>
  }, {
    stablehlo.return %c : tensor<f32>
  }) : (tensor<i32>) -> tensor<f32>'''
  assert case_branch_counts(text) == [3, 1]
  # "auto" lowered for CPU is the CPU path: one two-branch conditional per pass and per
  # layout transpose (2 passes and 2 transposes at n = 16 with one chain).
  tw, x = jnp.ones((1, 1, 4, 8, 2, 2)), jnp.ones((4, 16))
  text = export_text(jax.jit(bf.butterfly_multiply), (tw, x), "cpu")
  assert case_branch_counts(text) == [2] * 4


def _fwd_bwd(fn):
  """jit of (w, x) -> (loss, gradients w.r.t. w and x) of a linear read-out of fn."""
  return jax.jit(jax.value_and_grad(lambda w, x: jnp.sum(fn(w, x) ** 2), argnums=(0, 1)))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_butterfly_forward_backward_exports(platform):
  n, batch = 1024, 256
  tw = jax.ShapeDtypeStruct((1, 1, 10, n // 2, 2, 2), jnp.float32)
  x = jax.ShapeDtypeStruct((batch, n), jnp.float32)
  text = export_text(_fwd_bwd(lambda t, v: bf.butterfly_multiply(t, v)), (tw, x), platform)
  check_portable(text, f"butterfly n={n} for {platform}")
  # The generic passes were lowered: 4 radix passes forward, twice that backward.
  assert text.count("stablehlo.dot_general") >= 12


@pytest.mark.parametrize("platform", PLATFORMS)
def test_butterfly_dense_exports(platform):
  layer = ButterflyDense(100)
  x = jax.ShapeDtypeStruct((256, 784), jnp.float32)
  params = jax.eval_shape(layer.init, jax.random.key(0), x)
  text = export_text(_fwd_bwd(lambda p, v: layer.apply(p, v)), (params, x), platform)
  check_portable(text, f"ButterflyDense(100) on 784 inputs for {platform}")


TRAIN_CASES = [("fc", "mnist", f) for f in ("none", "head", "all")] + [
    ("vgg16", "cifar10", f) for f in ("none", "head", "all")]


@pytest.mark.parametrize("model,dataset,factorize", TRAIN_CASES)
def test_train_step_exports(model, dataset, factorize):
  """The Trainer's jitted train step (loss, gradients, Adam, masks; CIFAR augmentation) with
  the layers experiments/pipeline.py builds: K-matrix / butterfly dense layers for the FC,
  KOPS2D convolutions for VGG16 --factorize=all."""
  cfg = RunConfig(dataset=dataset, model=model, factorize=factorize)
  net = pipeline.build_model(cfg, 10)
  in_shape = (28, 28, 1) if dataset == "mnist" else (32, 32, 3)
  tx = train.adam(1e-3)
  trainer = train.Trainer(net, tx, train.make_mesh(),
                          augment=data_lib.augment_cifar if dataset == "cifar10" else None)
  variables = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1,) + in_shape))
  masks = masks_lib.ones_like(variables["params"], masks_lib.is_kernel)
  state = jax.eval_shape(lambda v: train.init_state(v, masks, tx), variables)
  # FC: 2 steps per call (a lax.scan, as in training); VGG16: one step on a batch of 2.
  steps, batch = (2, 8) if model == "fc" else (1, 2)
  # The masks travel inside the optimizer state (bfprune.masked_optimizer).
  args = (state, jax.ShapeDtypeStruct((16,) + in_shape, jnp.float32),
          jax.ShapeDtypeStruct((16,), jnp.int32), jax.ShapeDtypeStruct((steps, batch), jnp.int32),
          jax.eval_shape(lambda: jax.random.key(0)))
  for platform in PLATFORMS:
    text = export_text(trainer._train_chunk, args, platform)
    check_portable(text, f"{model} --factorize={factorize} train step for {platform}")
