r"""Checks the backend JAX finds (GPU, TPU or this CPU) in one command and writes one report.

  python experiments/check_device.py [--out=runs/check_device.md] [--data_dir=DIR] [--quick]
      [--budget_s=420] [--checks=butterfly,layers,pruners,sharded,smoke,bench_butterfly,...]

In order (each item in its own try/except: an error is one FAIL line, the rest still runs):
1. device and versions: jax, jaxlib, flax, optax, numpy, backend, device kinds and count,
   whether float64 computes on the default device, the default matmul precision;
2. correctness, always run (never cut by the time budget):
   * ``butterfly``: every ``butterfly_multiply`` impl against butterfly matrices built here in
     NumPy (float64) from the factor definitions: values (real and complex) and the gradients
     w.r.t. x and the twiddle, a few sizes / stacks / blocks / stride directions;
   * ``layers``: ButterflyDense (random; the 'fft' init against ``np.fft.fft``), KMatrixDense,
     MonarchDense and KOPS2D (random twiddles, both ``materialize`` paths; the 'fft' init
     against a NumPy circular convolution) against dense products of their matrices
     materialised here in NumPy;
   * ``pruners``: rand / mag / SNIP / GraSP / SynFlow scores computed on the accelerator
     against the same scores computed on the host CPU device from identical weights (reference
     at matmul precision HIGHEST), on an FC, an FC with a butterfly head and (not with
     ``--quick``) a small VGG-style convnet; and the masks both give at density 0.1
     (differences allowed only at near-ties). On CPU both sides are the host: the rows then
     check determinism and the plumbing only;
   * ``sharded``: ``bfprune.train.Trainer`` over all local devices against one device (same
     losses); with a single device also over 4 virtual host CPU devices in a subprocess;
   * ``smoke``: the sweep's pipeline (``pipeline.run_one``) end to end on CIFAR-10 from
     ``--data_dir`` / ``$BFPRUNE_DATA_DIR`` (VGG16, factorize none and head, one pruner,
     ``--smoke_train_examples`` examples, 1 epoch, the first 1024 test examples (--quick: 64),
     checkpoints in a temporary folder);
3. benchmarks, while the time budget (``--budget_s`` since start) lasts, each SKIPPED with the
   reason once it is spent: the butterfly vs dense (``bench_butterfly.py``'s timing functions),
   train steps (``bench_train.run``) and VGG16 inference (``bench_models.bench_model``).

Tolerances. Comparisons are max |got - ref| / max |ref| (over the whole output / pytree), with
a tolerance of ``K * u``: u the unit roundoff of the matmul arithmetic in force (float32 2^-24;
the default on GPU, TF32, 2^-11; on TPU, bfloat16, 2^-8) and K per check, 5-30x the largest
error measured between float32 and float64 on this CPU (the K_* constants). On an accelerator
every numeric check runs twice: at the default matmul precision (what users get; TF32 / bf16
tolerance) and under ``jax.default_matmul_precision("highest")`` (float32 tolerance: the real
correctness check). On CPU the two coincide and run once.

``--quick`` shrinks every size for this CPU and CI: about 140 s of CPU time on the 2-core Xeon
(2026-11-29), half of it the two VGG16 compiles of the smoke run, which no size cuts. The report
(``--out``) is rewritten atomically after every item, so a run cut short keeps what it did. Exit
status 1 when any item FAILs (SKIPPED does not fail), 2 for a bad flag.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import inspect
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLAGS = flags.FLAGS
CHECKS = ("butterfly", "layers", "pruners", "sharded", "smoke")
BENCHES = ("bench_butterfly", "bench_train", "bench_models")
FAULTS = ("butterfly", "layers", "pruners", "sharded")


def define_flags() -> None:
  """The script's flags, defined only when it runs (other scripts define --out and
  --data_dir too, and tests import this module beside them)."""
  flags.DEFINE_string("out", "runs/check_device.md", "Markdown report to write")
  flags.DEFINE_bool("quick", False, "Tiny sizes everywhere (this CPU, CI)")
  flags.DEFINE_float("budget_s", 420.0, "Seconds since start after which the remaining "
                     "benchmarks are skipped (correctness checks always run)")
  flags.DEFINE_string("data_dir", None, "CIFAR-10 folder for the smoke run (default "
                      "$BFPRUNE_DATA_DIR)")
  flags.DEFINE_list("checks", list(CHECKS + BENCHES), "Items to run, a subset of "
                    + ",".join(CHECKS + BENCHES))
  flags.DEFINE_integer("smoke_train_examples", 0, "Training examples of the smoke run "
                       "(0: 512, --quick 64)")
  flags.DEFINE_string("smoke_pruner", "", "Pruner of the smoke run (default snip; --quick rand, "
                      "which compiles nothing: the pruners have their own checks)")
  flags.DEFINE_string("compilation_cache", "none", "Persistent compilation cache folder for the "
                      "smoke run and benchmarks ('' = the sweep's default folder, 'none' = off)")
  flags.DEFINE_string("inject_fault", "", "Testing the checker only: perturb the reference of "
                      "one check (" + " | ".join(FAULTS) + ") so that it must FAIL")


PASS, FAIL, SKIPPED = "PASS", "FAIL", "SKIPPED"
U32 = 2.0 ** -24   # float32 unit roundoff
# Unit roundoff of float32 matmuls / convs at JAX's default precision, per platform.
DEFAULT_MATMUL_U = {"cpu": U32, "gpu": 2.0 ** -11, "cuda": 2.0 ** -11, "rocm": 2.0 ** -11,
                    "tpu": 2.0 ** -8}


# ============================================================================ report


@dataclasses.dataclass
class Result:
  section: str          # "correctness", "smoke", "benchmarks"
  name: str
  status: str           # PASS | FAIL | SKIPPED
  measured: str = ""
  tolerance: str = ""
  seconds: float = 0.0
  detail: str = ""      # markdown (benchmark tables), printed below the section's table


class Report:
  """The results so far, rendered as markdown and written atomically after every item."""

  SECTIONS = (("correctness", "Correctness"), ("smoke", "CIFAR-10 smoke run (sweep pipeline)"),
              ("benchmarks", "Benchmarks"))

  def __init__(self, path: Path, settings: "Settings"):
    self.path = path
    self.settings = settings
    self.info: list[tuple[str, str]] = []
    self.device = ""     # e.g. "gpu: 1 x NVIDIA H200"
    self.results: list[Result] = []
    self.t0 = time.perf_counter()

  def add(self, r: Result) -> Result:
    self.results.append(r)
    line = (f"[{time.perf_counter() - self.t0:6.1f} s, CPU {time.process_time():6.1f} s] "
            f"{r.status:7s} {r.name}")
    if r.measured:
      line += f": {r.measured}"
    if r.tolerance:
      line += f" (tol {r.tolerance})"
    print(line, flush=True)
    self.write()
    return r

  @property
  def failed(self) -> list[Result]:
    return [r for r in self.results if r.status == FAIL]

  def render(self) -> str:
    counts = {s: sum(r.status == s for r in self.results) for s in (PASS, FAIL, SKIPPED)}
    verdict = "FAIL" if counts[FAIL] else "PASS"
    s = self.settings
    lines = [f"# Device check: {verdict}" + (f" ({self.device})" if self.device else ""), "",
             f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIPPED]} skipped; "
             f"{time.perf_counter() - self.t0:.0f} s in all"
             f"{' (--quick)' if s.quick else ''}, time budget for benchmarks "
             f"{s.budget_s:g} s. Command: `{s.command}`", "",
             "## Device and versions", "", "| item | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in self.info]
    for key, title in self.SECTIONS:
      rows = [r for r in self.results if r.section == key]
      if not rows:
        continue
      lines += ["", f"## {title}", "", "| check | result | measured | tolerance | s |",
                "|---|---|---|---|---|"]
      lines += [f"| {r.name} | {r.status} | {_md(r.measured)} | {_md(r.tolerance)} | "
                f"{r.seconds:.1f} |" for r in rows]
      for r in rows:
        if r.detail:
          lines += ["", f"### {r.name}", "", r.detail]
    lines += ["", "Errors are max |got - ref| / max |ref|; tolerances are K x u, u the unit "
              "roundoff of the matmul arithmetic in force (float32 2^-24, TF32 2^-11, bfloat16 "
              "2^-8). 'highest' rows run under jax.default_matmul_precision('highest')."]
    return "\n".join(lines) + "\n"

  def write(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = self.path.with_name(self.path.name + ".tmp")
    tmp.write_text(self.render())
    os.replace(tmp, self.path)


def _md(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def _one_line(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def run_item(report: Report, section: str, name: str, fn: Callable[[], tuple]) -> Result:
  """Runs one check; ``fn`` returns (status, measured, tolerance[, detail]). Exceptions -> FAIL."""
  t0 = time.perf_counter()
  try:
    out = fn()
    status, measured, tol, *rest = out
    r = Result(section, name, status, measured, tol, time.perf_counter() - t0,
               rest[0] if rest else "")
  except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    r = Result(section, name, FAIL, _one_line(e) + where, "", time.perf_counter() - t0)
  return report.add(r)


# ============================================================================ settings


@dataclasses.dataclass(frozen=True)
class Settings:
  quick: bool = False
  budget_s: float = 420.0
  data_dir: Optional[str] = None
  checks: tuple[str, ...] = CHECKS + BENCHES
  smoke_train_examples: int = 0
  smoke_pruner: str = ""
  compilation_cache: str = "none"
  fault: str = ""
  command: str = ""


def _fmt(x: float) -> str:
  return f"{x:.2g}" if x else "0"


def rel_err(got, ref) -> float:
  """max |got - ref| / max |ref| over arrays or pytrees of arrays (None leaves skipped)."""
  import jax
  import numpy as np
  g = [np.asarray(a, np.complex128 if np.iscomplexobj(a) else np.float64).ravel()
       for a in jax.tree.leaves(got)]
  r = [np.asarray(a, np.complex128 if np.iscomplexobj(a) else np.float64).ravel()
       for a in jax.tree.leaves(ref)]
  if [a.shape for a in g] != [a.shape for a in r]:
    raise ValueError(f"shapes differ: {[a.shape for a in g]} vs {[a.shape for a in r]}")
  g, r = np.concatenate(g), np.concatenate(r)
  if not np.all(np.isfinite(g)):
    return float("inf")
  scale = float(np.max(np.abs(r))) if r.size else 0.0
  return float(np.max(np.abs(g - r))) / (scale or 1.0)


def precisions(backend: str) -> list[tuple[str, float]]:
  """(label, unit roundoff) of the matmul precisions to check on this backend."""
  u = DEFAULT_MATMUL_U.get(backend, 2.0 ** -8)
  if backend == "cpu":
    return [("default", U32)]
  return [("default", u), ("highest", U32)]


def _precision_ctx(label: str):
  import contextlib
  import jax
  return jax.default_matmul_precision("highest") if label == "highest" else contextlib.nullcontext()


# ============================================================================ NumPy references


def np_factor_strides(n: int, nblocks: int, increasing: bool) -> list[list[int]]:
  """Stride s of every factor in application order, per block (directions alternate)."""
  log_n = n.bit_length() - 1
  out = []
  for blk in range(nblocks):
    inc = increasing if blk % 2 == 0 else not increasing
    out.append([2 ** l if inc else n // 2 ** (l + 1) for l in range(log_n)])
  return out


def np_factor_index(n: int, s: int):
  """(rows, cols) (n/2, 2, 2): where twiddle entry (p, a, b) of a stride-s factor sits.

  Pair p = j s + k joins positions i = 2 s j + k and i + s; entry (a, b) maps input
  position i + b s to output position i + a s.
  """
  import numpy as np
  p = np.arange(n // 2)
  base = 2 * s * (p // s) + p % s
  ab = np.arange(2) * s
  rows = base[:, None, None] + ab[None, :, None] + 0 * ab[None, None, :]
  cols = base[:, None, None] + 0 * ab[None, :, None] + ab[None, None, :]
  return rows, cols


def np_factors(tw, increasing: bool):
  """twiddle (C, nblocks, L, n/2, 2, 2) -> per stack, the list of dense (n, n) factors in
  application order, and the list of (block, l, rows, cols) index maps (same for all stacks)."""
  import numpy as np
  c, nblocks, log_n, half = tw.shape[:4]
  n = 2 * half
  maps = [(blk, l) + np_factor_index(n, s)
          for blk, strides in enumerate(np_factor_strides(n, nblocks, increasing))
          for l, s in enumerate(strides)]
  facs = []
  for ci in range(c):
    fl = []
    for blk, l, rows, cols in maps:
      f = np.zeros((n, n), tw.dtype)
      f[rows, cols] = tw[ci, blk, l]
      fl.append(f)
    facs.append(fl)
  return facs, maps


def np_butterfly_matrix(tw, increasing: bool):
  """(C n, n) matrix M of a twiddle (y = x @ M.T), in the twiddle's NumPy dtype."""
  import numpy as np
  facs, _ = np_factors(tw, increasing)
  n = 2 * tw.shape[3]
  mats = []
  for fl in facs:
    m = np.eye(n, dtype=tw.dtype)
    for f in fl:
      m = f @ m
    mats.append(m)
  return np.concatenate(mats, axis=0)


def np_butterfly_grads(tw, x, ct, increasing: bool):
  """Gradients of L = sum(ct * (x @ M.T)) w.r.t. x and the twiddle (real), in NumPy.

  dL/dM_c = ct_c^T x; for M_c = F_K ... F_1, dL/dF_j = (F_K..F_{j+1})^T dL/dM_c (F_{j-1}..F_1)^T,
  read at the positions of the twiddle entries.
  """
  import numpy as np
  facs, maps = np_factors(tw, increasing)
  c, n = tw.shape[0], 2 * tw.shape[3]
  m = np_butterfly_matrix(tw, increasing)
  dx = ct @ m
  dtw = np.zeros_like(tw)
  for ci, fl in enumerate(facs):
    g = ct[:, ci * n:(ci + 1) * n].T @ x
    k = len(fl)
    before = [np.eye(n)]
    for f in fl[:-1]:
      before.append(f @ before[-1])
    after = np.eye(n)
    for j in reversed(range(k)):
      df = after.T @ g @ before[j].T
      blk, l, rows, cols = maps[j]
      dtw[ci, blk, l] = df[rows, cols]
      after = after @ fl[j]
  return dx, dtw


def np_monarch_matrix(b1, b2):
  """(C n, n) Monarch matrix from blocks1 (C, b, k, k), blocks2 (C, k, b, b): L2 P L1 with P
  moving position j k + i to i b + j."""
  import numpy as np
  c, b, k, _ = b1.shape
  n = b * k
  p = np.zeros((n, n))
  for j in range(b):
    for i in range(k):
      p[i * b + j, j * k + i] = 1.0
  mats = []
  for ci in range(c):
    l1, l2 = np.zeros((n, n)), np.zeros((n, n))
    for j in range(b):
      l1[j * k:(j + 1) * k, j * k:(j + 1) * k] = b1[ci, j]
    for i in range(k):
      l2[i * b:(i + 1) * b, i * b:(i + 1) * b] = b2[ci, i]
    mats.append(l2 @ p @ l1)
  return np.concatenate(mats, axis=0)


def np_bit_reversal(n: int):
  import numpy as np
  bits = n.bit_length() - 1
  return np.array([int(format(i, f"0{bits}b")[::-1], 2) if bits else 0 for i in range(n)])


def np_circular_conv(x, kernel, bias):
  """'same' circular conv: out[y, x] = sum_ab in[(y + a - lo_h) % H, (x + b - lo_w) % W] k[a, b]."""
  import numpy as np
  kh, kw = kernel.shape[:2]
  out = np.zeros(x.shape[:3] + (kernel.shape[3],))
  for a in range(kh):
    for b in range(kw):
      shifted = np.roll(x, (-(a - (kh - 1) // 2), -(b - (kw - 1) // 2)), axis=(1, 2))
      out += np.einsum("bhwi,io->bhwo", shifted, kernel[a, b])
  return out + bias


def np_kops2d(x, params, increasing_in=False):
  """KOPS2D from its materialised transforms: Re(D_w D_h (B_w B_h x . C_w C_h pad(k))) + bias."""
  import numpy as np
  mat = {name: np_butterfly_matrix(np.asarray(params[name]["twiddle"], np.complex128),
                                   name.startswith("output"))
         for name in ("input_h", "input_w", "kernel_h", "kernel_w", "output_h", "output_w")}
  kernel = np.asarray(params["kernel"], np.float64)
  kh, kw, cin, cout = kernel.shape
  _, h, w, _ = x.shape
  kpad = np.zeros((h, w, cin, cout))
  for a in range(kh):
    for b in range(kw):
      kpad[((kh - 1) // 2 - a) % h, ((kw - 1) // 2 - b) % w] += kernel[a, b]
  xf = np.einsum("uh,vw,bhwi->buvi", mat["input_h"], mat["input_w"], x)
  kf = np.einsum("uh,vw,hwio->uvio", mat["kernel_h"], mat["kernel_w"], kpad)
  yf = np.einsum("buvi,uvio->buvo", xf, kf)
  out = np.einsum("hu,wv,buvo->bhwo", mat["output_h"], mat["output_w"], yf).real
  return out + np.asarray(params.get("bias", 0.0), np.float64)


# ============================================================================ butterfly


def butterfly_impls() -> list[Optional[str]]:
  """The ``impl=`` values of ``butterfly_multiply`` (``[None]`` when it has no such argument)."""
  from bfprune.structured import butterfly as bf
  if "impl" not in inspect.signature(bf.butterfly_multiply).parameters:
    return [None]
  return list(getattr(bf, "IMPLS", ("auto", "cpu", "generic")))


def layer_impls(layer_cls, quick: bool = False) -> list[Optional[str]]:
  """The impls a structured layer can be asked for (``[None]`` without an ``impl`` field);
  ``quick``: only the first (the default, 'auto'), the butterfly check covering every impl."""
  fields = getattr(layer_cls, "__dataclass_fields__", {})
  impls = butterfly_impls() if "impl" in fields else [None]
  return impls[:1] if quick else impls


def _impl_kw(impl: Optional[str]) -> dict:
  return {} if impl is None else {"impl": impl}


def _impl_label(impl: Optional[str]) -> str:
  return "impl=(none: no impl argument)" if impl is None else f"impl={impl}"


# Butterfly values and gradients: float32 against float64 measured at most ~5 u here (y at
# n = 1024: 3e-7), so K = 64 leaves >10x; a reference wrong by 0.1 % in one twiddle entry gives
# 9e-6 .. 6e-4 (the --inject_fault test).
K_BUTTERFLY = 64


def butterfly_cases(quick: bool) -> list[dict]:
  """Sizes / stacks / blocks / directions / batch; batches >= 128 take the two-chain CPU path."""
  cases = [dict(n=8, c=1, nb=1, inc=True, b=16, cplx=False),
           dict(n=64, c=2, nb=2, inc=False, b=48, cplx=False),
           dict(n=32, c=1, nb=1, inc=True, b=160, cplx=False),
           dict(n=16, c=1, nb=3, inc=True, b=24, cplx=True)]
  if not quick:
    cases += [dict(n=1024, c=1, nb=1, inc=True, b=256, cplx=False),
              dict(n=256, c=2, nb=2, inc=False, b=64, cplx=True)]
  return cases


def butterfly_inputs(case: dict):
  """(twiddle, x, cotangent) of a case, float32 / complex64, from a seeded generator."""
  import numpy as np
  n, c, nb, b, cplx = (case[k] for k in ("n", "c", "nb", "b", "cplx"))
  rng = np.random.default_rng(n * 1000 + c * 10 + nb)
  shape = (c, nb, n.bit_length() - 1, n // 2, 2, 2)
  tw = rng.normal(size=shape) / np.sqrt(2)
  if cplx:
    tw = tw + 1j * rng.normal(size=shape) / np.sqrt(2)
  x = rng.normal(size=(b, n))
  ct = rng.normal(size=(b, c * n))
  return (tw.astype(np.complex64 if cplx else np.float32), x.astype(np.float32),
          ct.astype(np.float32))


_REFERENCES: dict = {}


def butterfly_reference(case: dict, fault: bool) -> dict:
  """NumPy float64 y (and dx, dtwiddle for real cases) from the float32-rounded inputs, so that
  only the arithmetic differs; cached per case (every impl and precision shares it)."""
  import numpy as np
  key = (tuple(sorted(case.items())), fault)
  if key not in _REFERENCES:
    tw32, x32, ct32 = butterfly_inputs(case)
    tw = tw32.astype(np.complex128 if case["cplx"] else np.float64)
    if fault:
      tw[0, 0, 0, 0, 0, 0] *= 1.001   # a reference that is wrong in one twiddle entry
    x, ct = x32.astype(np.float64), ct32.astype(np.float64)
    ref = {"y": x @ np_butterfly_matrix(tw, case["inc"]).T}
    if not case["cplx"]:
      ref["dx"], ref["dtwiddle"] = np_butterfly_grads(tw, x, ct, case["inc"])
    _REFERENCES[key] = ref
  return _REFERENCES[key]


def check_butterfly_case(case: dict, impl: Optional[str], prec: str, u: float,
                         fault: bool) -> tuple:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bfprune.structured import butterfly as bf
  tw32, x32, ct32 = butterfly_inputs(case)
  kw = _impl_kw(impl)
  mult = lambda t, v: bf.butterfly_multiply(t, v, increasing_stride=case["inc"], **kw)
  got = {}
  with _precision_ctx(prec):
    got["y"] = np.asarray(jax.jit(mult)(tw32, x32))
    if not case["cplx"]:
      grads = jax.jit(jax.grad(lambda t, v: jnp.sum(mult(t, v) * ct32), argnums=(0, 1)))
      got["dtwiddle"], got["dx"] = (np.asarray(g) for g in grads(tw32, x32))
  ref = butterfly_reference(case, fault)
  errs = {k: rel_err(got[k], ref[k]) for k in ref}
  tol = K_BUTTERFLY * u
  ok = all(e <= tol for e in errs.values())
  return (PASS if ok else FAIL, ", ".join(f"{k} {_fmt(e)}" for k, e in errs.items()),
          _fmt(tol))


def check_butterfly(s: Settings, report: Report, backend: str) -> None:
  for impl in butterfly_impls():
    for prec, u in precisions(backend):
      for case in butterfly_cases(s.quick):
        name = (f"butterfly {_impl_label(impl)} {prec}: n={case['n']} stacks={case['c']} "
                f"blocks={case['nb']} {'inc' if case['inc'] else 'dec'} batch={case['b']}"
                f"{' complex (values)' if case['cplx'] else ''}")
        run_item(report, "correctness", name, functools.partial(
            check_butterfly_case, case, impl, prec, u, s.fault == "butterfly"))


# ============================================================================ layers

# Layers: float32 against the float64 NumPy matrices measured at most ~2 u here.
K_LAYERS = 64


def _layer_io(module, x, seed: int, random_bias: bool = True):
  """Initialises ``module`` on x and (optionally) gives it a random bias (zeros by default)."""
  import jax
  import numpy as np
  # jitted: one compile instead of one per eager op of the initialisers
  params = jax.tree.map(np.asarray, jax.jit(module.init)(jax.random.key(seed), x)["params"])
  if random_bias and "bias" in params:
    params = dict(params)
    params["bias"] = np.random.default_rng(seed).normal(size=params["bias"].shape).astype(
        params["bias"].dtype)
  return params


def _apply(module, params, x, prec):
  import jax
  import numpy as np
  with _precision_ctx(prec):
    return np.asarray(jax.jit(lambda p, v: module.apply({"params": p}, v))(params, x))


def layer_cases(fault: bool, quick: bool = False) -> list[tuple[str, Any, Callable]]:
  """(name, layer class, fn(impl, prec) -> (got, ref)) for the structured layer variants
  (``quick``: one of each layer and path)."""
  import numpy as np
  from bfprune.structured import layers, monarch

  rng = np.random.default_rng(7)
  bad = 1.001 if fault else 1.0   # a wrong reference when testing the checker

  def dense(features, in_f, cls, inc, **kw):
    def fn(impl, prec):
      mod = cls(features, **kw, **_impl_kw(impl))
      x = rng.normal(size=(5, in_f)).astype(np.float32)
      p = _layer_io(mod, x, 1)
      n = 1 << max(1, (in_f - 1).bit_length())
      tw = np.asarray(p["twiddle"], np.float64)
      m = np_butterfly_matrix(tw, inc)
      xp = np.pad(x.astype(np.float64), ((0, 0), (0, n - in_f)))
      ref = (xp @ m.T)[:, :features] * bad + p["bias"]
      return _apply(mod, p, x, prec), ref
    return fn

  def fft(impl, prec):
    mod = layers.ButterflyDense(16, twiddle_init="fft", return_complex=True, use_bias=False,
                                **_impl_kw(impl))
    x = rng.normal(size=(4, 16)).astype(np.float32)
    p = _layer_io(mod, x, 2, random_bias=False)
    return _apply(mod, p, x, prec), np.fft.fft(x.astype(np.float64), axis=-1) * bad

  def fft_bitrev(impl, prec):   # same layer, reference from its own matrices and bit reversal
    mod = layers.ButterflyDense(8, twiddle_init="fft", return_complex=True, use_bias=False,
                                **_impl_kw(impl))
    x = rng.normal(size=(3, 8)).astype(np.float32)
    p = _layer_io(mod, x, 3, random_bias=False)
    m = np_butterfly_matrix(np.asarray(p["twiddle"], np.complex128), True)
    return _apply(mod, p, x, prec), x[:, np_bit_reversal(8)].astype(np.float64) @ m.T * bad

  def monarch_fn(features, in_f, nblocks):
    def fn(impl, prec):
      del impl
      mod = monarch.MonarchDense(features, nblocks=nblocks)
      x = rng.normal(size=(6, in_f)).astype(np.float32)
      p = _layer_io(mod, x, 4)
      m = np_monarch_matrix(np.asarray(p["blocks1"], np.float64),
                            np.asarray(p["blocks2"], np.float64))
      n = m.shape[1]
      xp = np.pad(x.astype(np.float64), ((0, 0), (0, n - in_f)))
      return _apply(mod, p, x, prec), (xp @ m.T)[:, :features] * bad + p["bias"]
    return fn

  def kops(materialize, init):
    def fn(impl, prec):
      kw = dict(twiddle_init=init, inverse_init="ifft" if init == "fft" else init)
      mod = layers.KOPS2D(4, materialize=materialize, **kw, **_impl_kw(impl))
      x = rng.normal(size=(2, 8, 4, 3)).astype(np.float32)
      p = _layer_io(mod, x, 5)
      if init == "fft":
        ref = np_circular_conv(x.astype(np.float64), np.asarray(p["kernel"], np.float64),
                               p["bias"])
      else:
        ref = np_kops2d(x.astype(np.float64), p)
      return _apply(mod, p, x, prec), ref * bad
    return fn

  # (name, layer class or None, fn, also in --quick)
  cases = [
      ("ButterflyDense 12 -> 20 (random, 2 stacks)", layers.ButterflyDense,
       dense(20, 12, layers.ButterflyDense, True), True),
      ("ButterflyDense 16 -> 16 (nblocks 2, decreasing)", layers.ButterflyDense,
       dense(16, 16, layers.ButterflyDense, False, nblocks=2, increasing_stride=False), False),
      ("ButterflyDense fft init vs np.fft.fft (n 16, complex out)", layers.ButterflyDense, fft,
       True),
      ("ButterflyDense fft init vs its matrix on bit-reversed input (n 8)",
       layers.ButterflyDense, fft_bitrev, False),
      ("KMatrixDense 16 -> 16 (width 1)", layers.KMatrixDense,
       dense(16, 16, layers.KMatrixDense, False), False),
      ("KMatrixDense 10 -> 40 (width 2, 3 stacks)", layers.KMatrixDense,
       dense(40, 10, layers.KMatrixDense, False, width=2), True),
      ("MonarchDense 16 -> 24 (square, 2 stacks)", None, monarch_fn(24, 16, None), True),
      ("MonarchDense 12 -> 12 (nblocks 3)", None, monarch_fn(12, 12, 3), False),
      ("KOPS2D 8x4x3 -> 4, random twiddles, materialize", layers.KOPS2D, kops(True, "random"),
       True),
      ("KOPS2D 8x4x3 -> 4, random twiddles, butterfly passes", layers.KOPS2D,
       kops(False, "random"), False),
      ("KOPS2D fft/ifft init vs NumPy circular conv, butterfly passes", layers.KOPS2D,
       kops(False, "fft"), True),
  ]
  return [c[:3] for c in cases if c[3] or not quick]


def check_layers(s: Settings, report: Report, backend: str) -> None:
  for name, cls, fn in layer_cases(s.fault == "layers", s.quick):
    for impl in (layer_impls(cls, s.quick) if cls is not None else [None]):
      for prec, u in precisions(backend):
        label = name + ("" if cls is None else f" {_impl_label(impl)}") + f" {prec}"

        def one(fn=fn, impl=impl, prec=prec, u=u):
          got, ref = fn(impl, prec)
          e = rel_err(got, ref)
          tol = K_LAYERS * u
          return PASS if e <= tol else FAIL, f"err {_fmt(e)}", _fmt(tol)
        run_item(report, "correctness", "layer " + label, one)


# ============================================================================ pruners

# Scores: float32 vs float64 on this CPU differ by at most ~25 u (SNIP on the FC); SynFlow runs
# in float64 (u = 2^-53) on both sides.
K_SCORES = 128
U64 = 2.0 ** -53
K_SYNFLOW = 2 ** 20     # float64, summation order only: ~1e-10
MASK_DENSITY = 0.1


def pruner_models(quick: bool) -> list[tuple[str, Any, tuple[int, ...]]]:
  from bfprune import models
  from bfprune.structured import layers
  out = [("FC", models.FC(), (28, 28, 1)),
         ("FC + butterfly head", models.FC(head=layers.ButterflyDense), (28, 28, 1))]
  if not quick:   # --quick: on CPU both sides are the host; the FCs exercise every path
    # Convs at every size down to 2 x 2 px: XLA's convolution and the im2col path (<= 4 px).
    out.append(("VGG-style convnet, 5 convs, 32x32 input",
                models.VGG16(plan=(16, "M", 32, "M", 32, "M", 64, "M", 64)), (32, 32, 3)))
  return out


def mask_agreement(scores_a, scores_b, density: float) -> tuple[bool, str]:
  """Masks at ``density`` from two score pytrees: do they differ only at near-ties?

  With every score moved by at most d = max |a - b|, the k-th largest moves by at most d too,
  so an entry can change sides only if its reference score b lies within 2 d of the
  reference threshold. Returns (every differing entry is such a near-tie, description).
  """
  import jax
  import numpy as np
  from bfprune.pruning import masks as masks_lib
  ma = masks_lib.masks_from_scores(scores_a, density)
  mb = masks_lib.masks_from_scores(scores_b, density)
  a = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(scores_a)])
  b = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(scores_b)])
  ka = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(ma)])
  kb = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(mb)])
  diff = ka != kb
  k = masks_lib.kept_count(density, b.size)
  thr = np.sort(b)[b.size - k] if k else np.inf
  d = float(np.max(np.abs(a - b))) if a.size else 0.0
  band = 2 * d * (1 + 1e-6) + 1e-300
  far = diff & (np.abs(b - thr) > band)
  desc = (f"masks at density {density:g}: {int(diff.sum())} of {diff.size} differ "
          f"({100 * diff.mean():.3f}%)")
  if far.any():
    desc += f", {int(far.sum())} of them farther than 2 x max|diff| from the threshold"
  return not far.any(), desc


def _scores(name: str, apply_fn, params, masks, batch, input_shape, key):
  from bfprune.pruning import scores as S
  if name == "rand":
    return S.random_scores(key, params, masks)
  if name == "mag":
    return S.magnitude_scores(params, masks)
  if name == "snip":
    return S.snip_scores(apply_fn, params, masks, batch)
  if name == "grasp":
    return S.grasp_scores(apply_fn, params, masks, batch)
  return S.synflow_scores(apply_fn, params, masks, input_shape)


PRUNERS = ("rand", "mag", "snip", "grasp", "synflow")


def _float64_device() -> str:
  """Where the library runs float64 work from the current default device ('?' if unknown)."""
  try:
    from bfprune import float64
    return str(float64.float64_device())
  except Exception:  # noqa: BLE001 - older versions: float64 on the default device
    return "?"


def check_pruners(s: Settings, report: Report, backend: str) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bfprune.pruning import masks as masks_lib

  dev = jax.devices()[0]
  cpu = jax.devices("cpu")[0]
  n_batch = 20 if s.quick else 100
  for mname, model, shape in pruner_models(s.quick):
    try:
      variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1,) + shape))
      params = jax.tree.map(np.asarray, variables["params"])   # identical weights, on host
      masks = jax.tree.map(np.asarray, masks_lib.ones_like(params))
      rng = np.random.default_rng(0)
      x = rng.normal(size=(n_batch,) + shape).astype(np.float32)
      y = (np.arange(n_batch) % 10).astype(np.int32)
      apply_fn = lambda p, v, model=model: model.apply({"params": p}, v, train=False)
    except Exception as e:  # noqa: BLE001
      report.add(Result("correctness", f"pruners on {mname}: setup", FAIL, _one_line(e)))
      continue

    # On CPU the device is the host: same precision context on both sides (one compile).
    ref_prec = "default" if backend == "cpu" else "highest"

    def on(device, prec, name):
      with jax.default_device(device), _precision_ctx(prec):
        p, m, xb, yb = jax.device_put((params, masks, x, y), device)
        out = _scores(name, apply_fn, p, m, (xb, yb), shape, jax.random.key(1))
        return jax.tree.map(lambda a: np.asarray(a), out)

    for pname in PRUNERS:
      ref_box: dict = {}

      def host_ref(pname=pname, box=ref_box):
        if "ref" not in box:
          ref = on(cpu, ref_prec, pname)
          if s.fault == "pruners":   # a wrong reference when testing the checker
            ref = jax.tree.map(
                lambda a: a * (1 + 1e-3 * (-1.0) ** np.arange(a.size).reshape(a.shape)), ref)
          box["ref"] = ref
        return box["ref"]

      for prec, u in precisions(backend):
        def one(pname=pname, prec=prec, u=u, host_ref=host_ref):
          ref = host_ref()
          got = on(dev, prec, pname)
          e = rel_err(got, ref)
          if pname in ("rand", "mag"):
            exact = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got),
                                                               jax.tree.leaves(ref)))
            ok_masks, desc = mask_agreement(got, ref, MASK_DENSITY)
            if exact:
              return PASS, f"bit-identical; {desc}", "exact"
            # rand: XLA's erf_inv may round differently per platform; the masks must agree.
            ok = pname == "rand" and e <= 4 * U32 and ok_masks
            return (PASS if ok else FAIL, f"not bit-identical: err {_fmt(e)}; {desc}",
                    "exact" + (" (rand: 4 u if masks agree)" if pname == "rand" else ""))
          tol = K_SYNFLOW * U64 if pname == "synflow" else K_SCORES * u
          ok_masks, desc = mask_agreement(got, ref, MASK_DENSITY)
          ok = e <= tol and ok_masks
          where64 = ""
          if pname == "synflow":   # float64 runs on the device when it has float64, else host
            with jax.default_device(dev):
              where64 = f" (float64 on {_float64_device()})"
          return PASS if ok else FAIL, f"err {_fmt(e)}{where64}; {desc}", _fmt(tol)
        where = "host CPU" if dev.platform == "cpu" else dev.platform
        run_item(report, "correctness",
                 f"pruner {pname} on {mname}: {where} {prec} vs host CPU {ref_prec}", one)


# ============================================================================ sharded train


def _record_calls(trainer, attr: str) -> list:
  """Wraps the trainer's jitted ``attr`` so that every call records its arguments' shapes,
  dtypes and shardings (before the call: the step donates its state). [] if there is none."""
  import jax
  fn = getattr(trainer, attr, None)
  calls: list = []
  if fn is None or not hasattr(fn, "lower"):
    return calls

  def spec(a):
    if isinstance(a, jax.Array):
      return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
    return a

  def wrapper(*args):
    calls.append((fn, jax.tree.map(spec, args)))
    return fn(*args)
  object.__setattr__(trainer, attr, wrapper)
  return calls


def _splits_batch(calls: list, per_device: int) -> Optional[bool]:
  """Whether the compiled train step holds each device's share of the batch: its logits
  ``f32[per_device,10]``. None when it cannot be told (no recorded call, lowering failed)."""
  if not calls:
    return None
  fn, args = calls[0]
  try:
    hlo = fn.lower(*args).compile().as_text()
  except Exception:  # noqa: BLE001 - a private detail of Trainer; reported as unchecked
    return None
  return f"f32[{per_device},10]" in hlo


def sharded_losses(model_name: str, devices: list, steps: int = 3, per_device: int = 8,
                   fault: bool = False) -> dict:
  """Losses of ``steps`` train steps and an evaluation on a Trainer over ``devices`` and over
  ``devices[:1]``, same data and seed; and whether the compiled step splits the batch."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bfprune import models, train
  from bfprune.pruning import masks as masks_lib
  # No dropout / augmentation: bfprune.train draws their random numbers per device slice, so
  # with them the numbers depend on the device count; without, they agree to float rounding.
  if model_name == "fc":
    model, shape, augment = models.FC(dropout_rate=0.0), (28, 28, 1), None
  else:
    model, shape, augment = (models.VGG16(plan=(16, "M", 32, "M", 32), dropout_rate=0.0),
                             (32, 32, 3), None)
  nd = len(devices)
  batch = per_device * nd
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch * steps,) + shape).astype(np.float32)
  y = rng.integers(0, 10, batch * steps).astype(np.int32)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1,) + shape))
  masks = masks_lib.ones_like(variables["params"])
  out = {}
  for label, devs in (("one", devices[:1]), ("all", devices)):
    trainer = train.Trainer(model, train.adam(1e-3), train.make_mesh(list(devs)), augment=augment)
    calls = _record_calls(trainer, "_train_chunk")
    state = trainer.put(train.init_state(variables, masks, trainer.tx))
    xs, ys = trainer.put((jnp.asarray(x), jnp.asarray(y)))
    idx = train.epoch_indices(len(x), batch, 0, 0)
    state, losses = trainer.train_steps(state, None, xs, ys, idx, jax.random.key(0))
    ev = trainer.evaluate(state, trainer.put(train.make_eval_data(x, y, batch)))
    out[label] = {"losses": np.asarray(losses).tolist(), "eval_loss": ev["loss"],
                  "split": _splits_batch(calls, batch // len(devs))}
  if fault:
    out["one"]["losses"][-1] *= 1.01
  out["devices"] = nd
  return out


K_SHARDED = 64   # summation order of the sharded batch mean, then 3 Adam steps


def _judge_sharded(out: dict, u: float) -> tuple:
  import numpy as np
  one, all_ = out["one"], out["all"]
  e = max(rel_err(np.asarray(all_["losses"]), np.asarray(one["losses"])),
          rel_err(np.asarray([all_["eval_loss"]]), np.asarray([one["eval_loss"]])))
  tol = K_SHARDED * u
  split_ok = all_["split"] is not False or out["devices"] == 1
  measured = (f"{out['devices']} device(s); losses {', '.join(f'{v:.5f}' for v in all_['losses'])}"
              f" vs one device: err {_fmt(e)}")
  if out["devices"] == 1:
    measured += " (one device: the comparison is trivial)"
  elif all_["split"] is None:
    measured += "; batch split over the devices not checked (no compiled step to inspect)"
  elif not all_["split"]:
    measured += "; the compiled step does NOT split the batch over the devices"
  else:
    measured += "; the compiled step splits the batch"
  return (PASS if e <= tol and split_ok else FAIL), measured, _fmt(tol)


_CHILD = """
import json, sys
sys.path.insert(0, {repo!r})
import jax
from experiments import check_device as cd
assert len(jax.devices()) == 4, jax.devices()
print(json.dumps(cd.sharded_losses({model!r}, jax.devices(), fault={fault!r})))
"""


def check_sharded(s: Settings, report: Report, backend: str) -> None:
  import jax
  devices = jax.local_devices()
  u = DEFAULT_MATMUL_U.get(backend, 2.0 ** -8)
  if len(devices) > 1:
    for model in ("fc", "convnet"):
      run_item(report, "correctness", f"sharded train {model}: {len(devices)} {backend} devices "
               "vs one", lambda model=model: _judge_sharded(
                   sharded_losses(model, devices, fault=s.fault == "sharded"), u))
  else:
    # One device: nothing to compare on it; check the sharded step on 4 virtual host CPU devices.
    def child():
      env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                 JAX_PLATFORMS="cpu")
      proc = subprocess.run([sys.executable, "-c", _CHILD.format(
          repo=str(REPO), model="fc", fault=s.fault == "sharded")], env=env, cwd=str(REPO),
          capture_output=True, text=True, timeout=600)
      if proc.returncode != 0:
        errors = [l for l in proc.stderr.splitlines() if re.match(r"\w+(Error|Exception)\b", l)]
        raise RuntimeError(f"subprocess failed: {(errors or ['no error line'])[-1][:300]}")
      return _judge_sharded(json.loads(proc.stdout.strip().splitlines()[-1]), U32)
    run_item(report, "correctness", f"sharded train fc: 4 virtual host CPU devices vs one "
             f"(subprocess; the {backend} backend has 1 device)", child)


# ============================================================================ smoke run


def check_smoke(s: Settings, report: Report, backend: str) -> None:
  del backend
  import numpy as np
  from experiments import pipeline
  from experiments.config import RunConfig

  data_dir = s.data_dir or os.environ.get("BFPRUNE_DATA_DIR")
  pruner = s.smoke_pruner or ("rand" if s.quick else "snip")
  n = s.smoke_train_examples or (64 if s.quick else 512)
  batch = 64 if s.quick else 128
  box: dict = {}

  def load():
    if not data_dir:
      raise ValueError("no CIFAR-10 folder: pass --data_dir or set BFPRUNE_DATA_DIR")
    import warnings
    from bfprune import data as data_lib
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", data_lib.DataWarning)   # a partial copy is fine here
      ds = pipeline.load_training_data("cifar10", data_dir, n, batch)
    # The test split cut too: the sparse (BCSR) inference times 6 passes over all of it.
    keep = 64 if s.quick else 1024
    ds = ds._replace(test_x=ds.test_x[:keep], test_y=ds.test_y[:keep])
    box["ds"] = ds
    return (PASS, f"{len(ds.train_x)} train / {len(ds.test_x)} test examples from {data_dir}",
            "")
  r = run_item(report, "smoke", "load CIFAR-10", load)
  if r.status != PASS:
    return
  ds = box["ds"]
  per_class = max(1, min(10, int(np.bincount(ds.train_y, minlength=10).min())))
  for factorize in ("none", "head"):
    def one(factorize=factorize):
      cfg = RunConfig(dataset="cifar10", model="vgg16", factorize=factorize,
                      pruner=pruner, compression=1.0, post_epochs=1,
                      prune_rounds=1, batch_size=batch, prune_per_class=per_class,
                      train_examples=n, test_examples=len(ds.test_x)).validate()
      with tempfile.TemporaryDirectory(prefix="check_device_ckpt_") as ckpt:
        row = pipeline.run_one(cfg, ds, log=lambda m: print(f"  smoke {factorize}: {m}",
                                                            flush=True),
                               history_log=lambda m: print(f"  smoke {factorize}: {m}",
                                                           flush=True),
                               ckpt_dir=str(Path(ckpt) / cfg.key()))
      hist = row["history"][-1]
      vals = [hist["train_loss"], row["test_loss"], row["top1"]]
      density_ok = abs(row["density"] - 0.1) < 1e-3
      ok = all(math.isfinite(v) for v in vals) and 0 <= row["top1"] <= 100 and density_ok
      sparse = row.get("inference_seconds_sparse")
      note = row.get("inference_sparse_note")
      measured = (f"train loss {hist['train_loss']:.3f}, test loss {row['test_loss']:.3f}, "
                  f"top-1 {row['top1']:.1f}%, density {row['density']:.4f}, "
                  f"{hist['examples_per_s']:.0f} ex/s (1st epoch incl. compile), prune "
                  f"{row['prune_seconds']:.1f} s, eval pass {row['inference_seconds']:.3g} s, "
                  f"sparse pass {'n/a' if sparse is None else f'{sparse:.3g} s'}"
                  + (f" ({note})" if note else ""))
      return (PASS if ok else FAIL), measured, "finite, density 0.1"
    run_item(report, "smoke", f"VGG16 factorize={factorize} pruner={pruner} c=1, "
             f"{n} examples, batch {batch}, 1 epoch", one)


# ============================================================================ benchmarks


def import_script(name: str):
  """Imports ``experiments/<name>.py`` with its absl flags in a private ``FlagValues``.

  The bench scripts define flags at import, some under the same names (``--repeats``,
  ``--batch_size``), which absl refuses to define twice in one process. Each is imported here
  with ``flags.DEFINE_*`` / ``flags.FLAGS`` pointing at a fresh FlagValues (restored
  afterwards), parsed with its defaults; its functions, which may read ``FLAGS.x``, then work
  unchanged. Returns (module, its FlagValues).
  """
  full = f"experiments.{name}"
  if full in sys.modules:
    mod = sys.modules[full]
    return mod, mod.FLAGS
  scratch = flags.FlagValues()
  saved = {"FLAGS": flags.FLAGS}
  for attr in dir(flags):
    fn = getattr(flags, attr)
    if attr.startswith("DEFINE") and callable(fn):
      try:
        takes = "flag_values" in inspect.signature(fn).parameters
      except (TypeError, ValueError):
        takes = False
      if takes:
        saved[attr] = fn
        setattr(flags, attr, functools.partial(fn, flag_values=scratch))
  flags.FLAGS = scratch
  try:
    mod = importlib.import_module(full)
  finally:
    for attr, fn in saved.items():
      setattr(flags, attr, fn)
  scratch([name])
  return mod, scratch


def _budget_left(s: Settings, report: Report) -> Optional[str]:
  """None while the budget lasts, else the reason to skip."""
  spent = time.perf_counter() - report.t0
  if spent > s.budget_s:
    return f"time budget --budget_s={s.budget_s:g} spent ({spent:.0f} s elapsed)"
  return None


def bench_butterfly(s: Settings, report: Report, backend: str) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bfprune.structured import butterfly as bf
  bb, bflags = import_script("bench_butterfly")
  bflags.repeats, bflags.warmup, bflags.rounds = (2, 1, 1) if s.quick else (15, 3, 3)
  batch = 32 if s.quick else 256
  sizes = (256,) if s.quick else (256, 1024, 4096, 8192)
  impls = butterfly_impls()
  for n in sizes:
    reason = _budget_left(s, report)
    name = f"butterfly vs dense, n={n}, batch {batch}"
    if reason:
      report.add(Result("benchmarks", name, SKIPPED, reason))
      continue

    def one(n=n):
      log_n = n.bit_length() - 1
      k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(jax.random.key(0), n), 4)
      x = jax.random.normal(k1, (batch, n), jnp.float32)
      ct = jax.random.normal(k2, (batch, n), jnp.float32)
      tw = jax.random.normal(k3, (1, 1, log_n, n // 2, 2, 2), jnp.float32) / np.sqrt(2)
      w = jax.random.normal(k4, (n, n), jnp.float32) / np.sqrt(n)
      dense = lambda w_, x_: x_ @ w_
      cases = {"dense": (jax.jit(dense), (w, x)), "dense_fb": (bb._fwd_bwd(dense), (w, x, ct))}
      for impl in impls:
        f = functools.partial(lambda t_, x_, kw: bf.butterfly_multiply(t_, x_, True, **kw),
                              kw=_impl_kw(impl))
        cases[f"bf:{impl}"] = (jax.jit(f), (tw, x))
        cases[f"bf_fb:{impl}"] = (bb._fwd_bwd(f), (tw, x, ct))
      t = bb._median_ms(cases)
      copy = bb._copy_gbs(batch * n * 4)
      parts = [f"dense {t['dense']:.3f} / f+b {t['dense_fb']:.3f} ms"]
      rows = ["| impl | fwd ms | dense / bfly | f+b ms | dense / bfly (f+b) |",
              "|---|---|---|---|---|",
              f"| dense x @ W | {t['dense']:.3f} | 1 | {t['dense_fb']:.3f} | 1 |"]
      for impl in impls:
        a, b = t[f"bf:{impl}"], t[f"bf_fb:{impl}"]
        parts.append(f"{impl or 'bfly'} {a:.3f} ({t['dense'] / a:.2f}x) / f+b {b:.3f} "
                     f"({t['dense_fb'] / b:.2f}x) ms")
        rows.append(f"| {impl or '(default)'} | {a:.3f} | {t['dense'] / a:.2f} | {b:.3f} | "
                    f"{t['dense_fb'] / b:.2f} |")
      ok = all(np.isfinite(v) and v > 0 for v in t.values())
      detail = "\n".join(rows) + (f"\n\nmedian of {bflags.repeats}; copy bandwidth of one "
                                  f"activation {copy:.1f} GB/s (read + write)")
      return PASS if ok else FAIL, "; ".join(parts), "", detail
    run_item(report, "benchmarks", name, one)


def bench_train(s: Settings, report: Report, backend: str) -> None:
  bt, _ = import_script("bench_train")
  if s.quick:
    items, steps, repeats, batch = [("fc", "none"), ("fc", "head")], 2, 1, 32
  else:
    items = [("fc", "none"), ("fc", "head"), ("fc", "all"), ("vgg16", "none"), ("vgg16", "head"),
             ("vgg16", "all")]
    steps, repeats, batch = 20, 3, 256
  for model, fac in items:
    name = f"train step {model} factorize={fac}, batch {batch}"
    reason = _budget_left(s, report)
    if reason:
      report.add(Result("benchmarks", name, SKIPPED, reason))
      continue

    def one(model=model, fac=fac):
      r = bt.run(model, steps, repeats, batch, fac, with_torch=False)
      ok = math.isfinite(r["step_ms"]) and r["step_ms"] > 0
      return (PASS if ok else FAIL, f"{r['step_ms']:.2f} ms/step, {r['examples_per_s']:.0f} "
              f"examples/s, first chunk (compile) {r['first_chunk_s']:.1f} s "
              f"({steps} steps x {repeats})", "")
    run_item(report, "benchmarks", name, one)


def bench_models(s: Settings, report: Report, backend: str) -> None:
  bm, _ = import_script("bench_models")
  images, batch, repeats = (16, 8, 1) if s.quick else (1024, 256, 3)
  variants = ("dense",) if s.quick else ("dense", "all")
  cache: dict = {}
  results: dict = {}
  for v in variants:
    name = f"VGG16 inference {v}, {images} images, batch {batch}"
    reason = _budget_left(s, report)
    if reason:
      report.add(Result("benchmarks", name, SKIPPED, reason))
      continue

    def one(v=v):
      r = bm.bench_model(v, images, batch, repeats, "butterfly", cache)
      results[v] = r
      msg = (f"{r['wall_s'] * 1e3:.1f} ms per pass ({r['images'] / r['wall_s']:.0f} images/s), "
             f"first pass (compile) {r['first_pass_s']:.1f} s")
      if v == "all" and "dense" in results:
        msg += f"; all / dense {r['wall_s'] / results['dense']['wall_s']:.2f}x"
      ok = math.isfinite(r["wall_s"]) and r["wall_s"] > 0
      return PASS if ok else FAIL, msg, ""
    run_item(report, "benchmarks", name, one)


# ============================================================================ main


def _safe(fn: Callable[[], str]) -> str:
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - a missing detail must not stop the check
    return f"n/a ({_one_line(e)})"


def _x64_on_default_device() -> str:
  import jax
  import jax.numpy as jnp
  with jax.enable_x64(True):
    a = jnp.arange(3, dtype=jnp.float64)
    v = jax.jit(lambda z: jnp.sum(z * z))(a)
    if v.dtype != jnp.float64:
      return f"no (computes in {v.dtype})"
    return f"yes (float64 sum on {jax.devices()[0].platform}: {float(v):g})"


def device_info(report: Report) -> str:
  """Fills the report's device / versions table; returns the backend name."""
  import collections
  import jax
  import numpy as np
  backend = jax.default_backend()
  devs = jax.devices()
  kinds = collections.Counter(d.device_kind for d in devs)

  def version(mod):
    return _safe(lambda: importlib.import_module(mod).__version__)

  def memory():
    mem = devs[0].memory_stats() or {}
    return f"{mem['bytes_limit'] / 2 ** 30:.1f} GiB" if "bytes_limit" in mem else "n/a"

  def commit():
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                          capture_output=True, timeout=10).stdout.strip() or "n/a"

  u = DEFAULT_MATMUL_U.get(backend, 2.0 ** -8)
  report.device = f"{backend}: " + ", ".join(f"{c} x {k}" for k, c in kinds.items())
  report.info += [
      ("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
      ("backend", backend),
      ("devices", ", ".join(f"{c} x {k}" for k, c in kinds.items())),
      ("device count (local / global)", f"{jax.local_device_count()} / {jax.device_count()}"),
      ("processes", str(jax.process_count())),
      ("device 0 memory limit", _safe(memory)),
      ("host CPU devices", _safe(lambda: str(len(jax.devices("cpu"))))),
      ("host", f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"),
      ("float64 (x64) on default device", _safe(_x64_on_default_device)),
      ("default matmul precision", _safe(
          lambda: f"{jax.config.jax_default_matmul_precision or 'default'} (float32 matmul "
                  f"unit roundoff taken as {u:.3g})")),
      ("butterfly impls", _safe(lambda: ", ".join(str(i) for i in butterfly_impls()))),
      ("python", platform.python_version()),
      ("jax / jaxlib", f"{jax.__version__} / {version('jaxlib')}"),
      ("flax / optax / numpy", f"{version('flax')} / {version('optax')} / {np.__version__}"),
      ("orbax.checkpoint", version("orbax.checkpoint")),
      ("repository commit", _safe(commit)),
  ]
  for k, v in report.info:
    print(f"{k}: {v}", flush=True)
  report.write()
  return backend


RUNNERS: dict[str, Callable[[Settings, Report, str], None]] = {
    "butterfly": check_butterfly, "layers": check_layers, "pruners": check_pruners,
    "sharded": check_sharded, "smoke": check_smoke, "bench_butterfly": bench_butterfly,
    "bench_train": bench_train, "bench_models": bench_models}


def run(s: Settings, out: Path) -> Report:
  """Runs the selected items in order (correctness, smoke, benchmarks); returns the report."""
  report = Report(out, s)
  cache = "off"
  if s.compilation_cache.strip().lower() != "none":
    from experiments import pipeline
    enable = getattr(pipeline, "enable_compilation_cache", None)
    cache = "not available in this version" if enable is None else str(
        enable(s.compilation_cache))   # a bad folder raises, naming the flag
  backend = device_info(report)
  report.info.append(("compilation cache", cache))
  for item in CHECKS + BENCHES:
    if item not in s.checks:
      continue
    try:
      RUNNERS[item](s, report, backend)
    except Exception as e:  # noqa: BLE001 - a runner that breaks before its items
      report.add(Result("benchmarks" if item in BENCHES else "correctness", item, FAIL,
                        _one_line(e)))
  report.write()
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  bad = [c for c in FLAGS.checks if c not in CHECKS + BENCHES]
  if bad:
    print(f"check_device.py: error: --checks item {bad[0]!r} is not one of "
          f"{', '.join(CHECKS + BENCHES)}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.inject_fault and FLAGS.inject_fault not in FAULTS:
    print(f"check_device.py: error: --inject_fault={FLAGS.inject_fault!r} is not one of "
          f"{', '.join(FAULTS)}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.smoke_pruner and FLAGS.smoke_pruner not in PRUNERS:
    print(f"check_device.py: error: --smoke_pruner={FLAGS.smoke_pruner!r} is not one of "
          f"{', '.join(PRUNERS)}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.smoke_train_examples < 0:
    print(f"check_device.py: error: --smoke_train_examples={FLAGS.smoke_train_examples} must "
          "be >= 0", file=sys.stderr)
    sys.exit(2)
  s = Settings(quick=FLAGS.quick, budget_s=FLAGS.budget_s, data_dir=FLAGS.data_dir,
               checks=tuple(FLAGS.checks), smoke_train_examples=FLAGS.smoke_train_examples,
               smoke_pruner=FLAGS.smoke_pruner, compilation_cache=FLAGS.compilation_cache,
               fault=FLAGS.inject_fault,
               command="python experiments/check_device.py " + " ".join(sys.argv[1:]))
  out = Path(FLAGS.out)
  try:
    report = run(s, out)
  except ValueError as e:   # e.g. pipeline.CompilationCacheError: one line naming the flag
    print(f"check_device.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  failed = report.failed
  print(f"\nreport: {out}; {len(failed)} failed" + (": " + "; ".join(r.name for r in failed)
                                                     if failed else ""), flush=True)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  define_flags()
  app.run(main)
