"""Tests of bfprune.data against the real MNIST / CIFAR-10 files and synthetic copies.

Data folder: $BFPRUNE_DATA_DIR (relative to the cwd), else <repo>/../shared/data (conftest). The
tensorflow-datasets path and the CIFAR-10 binary format are tested in test_data_tfds.py.
"""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import jax
import numpy as np
import pytest

from bfprune import data as D
from conftest import data_dir

DATA_DIR = data_dir()
MNIST_DIR = DATA_DIR / "mnist"
# The shared test data holds a partial python copy of CIFAR-10 with the official labels of
# all images beside it; `python -m bfprune.data fetch DIR` writes the full binary set instead.
CIFAR_PARTIAL = (DATA_DIR / "cifar10" / "official_labels_all.npz").is_file()

# Official MNIST class counts (public facts).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
T10K = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(scope="module")
def mnist():
  return D.load_dataset("mnist", DATA_DIR)


@pytest.fixture(scope="module")
def cifar():
  if not CIFAR_PARTIAL:
    return D.load_dataset("cifar10", DATA_DIR)
  with pytest.warns(D.DataWarning, match="partial"):
    return D.load_dataset("cifar10", DATA_DIR)


@pytest.fixture(scope="module")
def t10k_raw():
  """Decompressed official test idx bytes, read independently of the library."""
  return {n: gzip.decompress((MNIST_DIR / (n + ".gz")).read_bytes()) for n in T10K}


def _mnist_folder(tmp: Path, files: dict[str, bytes]) -> Path:
  """A folder with the given t10k files written; the others symlinked to the real .gz."""
  for name, content in files.items():
    (tmp / name).write_bytes(content)
  for n in T10K:
    if not any(k.startswith(n) for k in files):
      (tmp / (n + ".gz")).symlink_to(MNIST_DIR / (n + ".gz"))
  return tmp


# ------------------------------------------------------------------------------- MNIST

def test_mnist_shapes_counts_normalisation(mnist, t10k_raw):
  assert mnist.name == "mnist" and mnist.num_classes == 10
  for x, y, n, counts in ((mnist.train_x, mnist.train_y, 60000, MNIST_TRAIN_COUNTS),
                          (mnist.test_x, mnist.test_y, 10000, MNIST_TEST_COUNTS)):
    assert x.shape == (n, 28, 28, 1) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int32
    assert np.bincount(y, minlength=10).tolist() == counts
  # Train statistics of the normalised pixels; 0 and 255 map to the two extremes.
  assert abs(mnist.train_x.mean()) < 0.01 and abs(mnist.train_x.std() - 1) < 0.01
  np.testing.assert_allclose(mnist.train_x.min(), -0.1307 / 0.3081, rtol=1e-5)
  np.testing.assert_allclose(mnist.train_x.max(), (1 - 0.1307) / 0.3081, rtol=1e-5)
  # Pixels of the last test image and the labels, from the raw bytes (16/8-byte headers).
  raw_img = np.frombuffer(t10k_raw[T10K[0]][-784:], np.uint8).reshape(28, 28)
  np.testing.assert_allclose(mnist.test_x[-1, :, :, 0] * 0.3081 + 0.1307, raw_img / 255, atol=1e-6)
  np.testing.assert_array_equal(mnist.test_y, np.frombuffer(t10k_raw[T10K[1]][8:], np.uint8))


def test_mnist_uncompressed_regzipped_and_env_var(tmp_path, monkeypatch, mnist, t10k_raw):
  plain = tmp_path / "plain"
  plain.mkdir()
  _mnist_folder(plain, dict(t10k_raw))
  x, y = D.load_mnist("test", plain)  # verified through the idx sha256
  np.testing.assert_array_equal(x, mnist.test_x)
  np.testing.assert_array_equal(y, mnist.test_y)
  # A re-gzipped copy has another gz md5 but the same content: accepted. Found under <dir>/mnist/.
  regz = tmp_path / "regz" / "mnist"
  regz.mkdir(parents=True)
  _mnist_folder(regz, {n + ".gz": gzip.compress(c, compresslevel=1, mtime=1)
                       for n, c in t10k_raw.items()})
  monkeypatch.setenv(D.ENV_VAR, str(tmp_path / "regz"))
  x, y = D.load_mnist("test")
  np.testing.assert_array_equal(y, mnist.test_y)


def test_mnist_checksum_mismatch(tmp_path, t10k_raw):
  lab = bytearray(t10k_raw[T10K[1]])
  lab[100] = (lab[100] + 1) % 10  # still a valid label: only the digest can tell
  folder = _mnist_folder(tmp_path, {T10K[1]: bytes(lab)})
  with pytest.raises(D.DataError, match=r"t10k-labels-idx1-ubyte.*checksum mismatch") as e:
    D.load_mnist("test", folder)
  msg = str(e.value)
  assert D._MNIST_DIGESTS["t10k-labels"][1] in msg  # expected
  assert __import__("hashlib").sha256(bytes(lab)).hexdigest() in msg  # actual
  x, y = D.load_mnist("test", folder, verify_checksums=False)  # opt-out for modified copies
  assert y[100 - 8] == lab[100]


def test_mnist_flipped_gzip_byte(tmp_path):
  raw = bytearray((MNIST_DIR / (T10K[0] + ".gz")).read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  folder = _mnist_folder(tmp_path, {T10K[0] + ".gz": bytes(raw)})
  with pytest.raises(D.DataError, match=r"t10k-images-idx3-ubyte\.gz"):
    D.load_mnist("test", folder)


def test_mnist_truncated_gzip(tmp_path):
  raw = (MNIST_DIR / (T10K[0] + ".gz")).read_bytes()
  folder = _mnist_folder(tmp_path, {T10K[0] + ".gz": raw[:len(raw) // 2]})
  with pytest.raises(D.DataError, match=r"t10k-images-idx3-ubyte\.gz: truncated or corrupt gzip"):
    D.load_mnist("test", folder)


@pytest.mark.parametrize("case", ["magic", "shape", "short", "count", "label"])
def test_mnist_structure_errors(tmp_path, t10k_raw, case):
  img, lab = bytearray(t10k_raw[T10K[0]]), bytearray(t10k_raw[T10K[1]])
  if case == "magic":
    img[:4] = (0x801).to_bytes(4, "big")
    target, pattern = T10K[0], "wrong idx magic number 0x00000801, expected 0x00000803"
  elif case == "shape":
    img[8:16] = (784).to_bytes(4, "big") + (1).to_bytes(4, "big")
    target, pattern = T10K[0], r"wrong shape \(10000, 784, 1\), expected \(N, 28, 28\)"
  elif case == "short":
    img = img[:-10]
    target, pattern = T10K[0], "truncated or padded"
  elif case == "count":
    lab = lab[:4] + (9999).to_bytes(4, "big") + lab[8:-1]
    target, pattern = T10K[0], "10000 images but .*t10k-labels-idx1-ubyte holds 9999 labels"
  else:
    lab[8] = 10
    target, pattern = T10K[1], "label 10 out of range"
  folder = _mnist_folder(tmp_path, {T10K[0]: bytes(img), T10K[1]: bytes(lab)})
  with pytest.raises(D.DataError, match=f"{target}.*{pattern}"):
    D.load_mnist("test", folder)


def test_mnist_missing_file(tmp_path):
  (tmp_path / (T10K[0] + ".gz")).symlink_to(MNIST_DIR / (T10K[0] + ".gz"))
  with pytest.raises(D.DataError, match="MNIST test labels: file not found") as e:
    D.load_mnist("test", tmp_path)
  for searched in (tmp_path / "t10k-labels-idx1-ubyte.gz", tmp_path / "mnist" / "t10k-labels-idx1-ubyte"):
    assert str(searched) in str(e.value)


def test_bad_arguments():
  with pytest.raises(ValueError, match="split"):
    D.load_mnist("validation", DATA_DIR)
  with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
    D.load_dataset("imagenet", DATA_DIR)


# ------------------------------------------------------------------------------- CIFAR-10

def _raw_cifar_row(name: str, i: int) -> np.ndarray:
  """Row ``i`` of batch ``name`` as stored (1024 R, 1024 G, 1024 B), read without the library's
  parsers from whichever copy the loader uses (python or binary batches)."""
  path = D._cifar_files(DATA_DIR, [name], "train")[0]
  if path.suffix == ".bin":
    record = 1 + 3072
    return np.frombuffer(path.read_bytes()[i * record + 1:(i + 1) * record], np.uint8)
  with open(path, "rb") as f:
    return pickle.load(f, encoding="bytes")[b"data"][i]


def test_cifar_real_files(cifar):
  if CIFAR_PARTIAL:  # the shared partial copy: 1017 rows of every batch, labels known
    labels = np.load(DATA_DIR / "cifar10" / "official_labels_all.npz")
    n = 1017
    want_train = np.concatenate([labels[f"data_batch_{i}"][:n] for i in range(1, 6)])
    np.testing.assert_array_equal(cifar.train_y, want_train)
    np.testing.assert_array_equal(cifar.test_y, labels["test_batch"][:n])
    tol = 0.05
  else:  # a complete copy: official sizes and class balance (public facts)
    n = 10000
    assert np.bincount(cifar.train_y, minlength=10).tolist() == [5000] * 10
    assert np.bincount(cifar.test_y, minlength=10).tolist() == [1000] * 10
    tol = 0.01
  assert cifar.train_x.shape == (5 * n, 32, 32, 3) and cifar.train_x.dtype == np.float32
  assert cifar.test_x.shape == (n, 32, 32, 3) and cifar.test_y.dtype == np.int32
  mean, std = cifar.train_x.mean((0, 1, 2)), cifar.train_x.std((0, 1, 2))
  assert np.all(np.abs(mean) < tol) and np.all(np.abs(std - 1) < tol), (mean, std)
  # Layout: row = 1024 R, 1024 G, 1024 B, each row-major; check image 3 of data_batch_2.
  row = _raw_cifar_row("data_batch_2", 3)
  px = cifar.train_x[n + 3] * np.array(D.CIFAR10_STD) + np.array(D.CIFAR10_MEAN)
  for ch in range(3):
    np.testing.assert_allclose(px[..., ch].ravel(), row[ch * 1024:(ch + 1) * 1024] / 255, atol=1e-6)


def _cifar_folder(root: Path, rows: int = 3, seed: int = 0, **overrides) -> tuple[Path, np.ndarray]:
  """Synthetic batches written by this (python-3, numpy-2) pickle; returns NHWC train images."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  train = []
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    img = rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8)
    train += [img] if name != "test_batch" else []
    obj = {"data": img.transpose(0, 3, 1, 2).reshape(rows, 3072), "labels": list(range(rows))}
    blob = overrides.get(name, pickle.dumps(obj, protocol=4))
    if blob is not None:
      (root / name).write_bytes(blob)
  return root, np.concatenate(train)


def test_cifar_synthetic_layouts(tmp_path):
  for sub in ("", "cifar-10-batches-py", "cifar10/cifar-10-batches-py-partial"):
    base = tmp_path / sub.replace("/", "_") if sub else tmp_path / "flat"
    _, imgs = _cifar_folder(base / sub if sub else base)
    with pytest.warns(D.DataWarning):
      x, y = D.load_cifar10("train", base)
    np.testing.assert_allclose(x * np.array(D.CIFAR10_STD) + np.array(D.CIFAR10_MEAN), imgs / 255,
                               atol=1e-6)
    assert y.tolist() == [0, 1, 2] * 5


def _evil():  # pickles as a reference to a global that is not numpy
  return None


@pytest.mark.parametrize("case", ["truncated", "garbage", "global", "shape", "count", "missing"])
def test_cifar_errors(tmp_path, case):
  good = pickle.dumps({"data": np.arange(4 * 3072).astype(np.uint8).reshape(4, 3072),
                       "labels": [0, 1, 2, 3]}, protocol=4)
  blobs = {
      "truncated": ("test_batch", good[:len(good) // 2], "corrupt or truncated pickle"),
      "garbage": ("test_batch", b"\x00not a pickle at all", "corrupt or truncated pickle"),
      "global": ("test_batch", pickle.dumps({"data": _evil}), "is not allowed"),
      "shape": ("test_batch", pickle.dumps({"data": np.zeros((2, 3000), np.uint8), "labels": [0, 1]}),
                r"uint8 \(2, 3000\), expected uint8 \(N, 3072\)"),
      "count": ("test_batch", pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}),
                r"2 images but labels of shape \(1,\)"),
      "missing": ("data_batch_3", None, "incomplete folder"),
  }
  name, blob, pattern = blobs[case]
  folder, _ = _cifar_folder(tmp_path, **{name: blob})
  with pytest.raises(D.DataError, match=f"{name}.*{pattern}|{pattern}.*{name}"):
    D.load_cifar10("train" if name.startswith("data") else "test", folder)


def test_cifar_not_found(tmp_path):
  with pytest.raises(D.DataError, match="files not found") as e:
    D.load_cifar10("test", tmp_path)
  assert str(tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch") in str(e.value)


# ------------------------------------------------------------------------------- batching

def test_epoch_permutation():
  p = D.epoch_permutation(1000, seed=3, epoch=2)
  assert sorted(p.tolist()) == list(range(1000))
  np.testing.assert_array_equal(p, D.epoch_permutation(1000, 3, 2))
  assert not np.array_equal(p, D.epoch_permutation(1000, 3, 3))
  assert not np.array_equal(p, D.epoch_permutation(1000, 4, 2))
  with pytest.raises(ValueError):
    D.epoch_permutation(10, -1, 0)


def test_batches_deterministic_and_complete():
  n, bs = 103, 10
  y = np.arange(n, dtype=np.int32)
  x = np.stack([y * 2.0, -y], axis=1).astype(np.float32)  # row i identifies example i
  run = lambda **kw: list(D.batches(x, y, bs, seed=7, epoch=1, **kw))
  a, b = run(), run()
  assert len(a) == n // bs and all(xb.shape == (bs, 2) and yb.shape == (bs,) for xb, yb in a)
  for (xa, ya), (xb_, yb_) in zip(a, b):
    np.testing.assert_array_equal(xa, xb_)
    np.testing.assert_array_equal(ya, yb_)
  for xb, yb in a:
    np.testing.assert_array_equal(xb[:, 0], yb * 2.0)  # x and y stay paired
  seen = np.concatenate([yb for _, yb in a])
  np.testing.assert_array_equal(seen, D.epoch_permutation(n, 7, 1)[:n - n % bs])
  other = np.concatenate([yb for _, yb in D.batches(x, y, bs, seed=7, epoch=2)])
  assert not np.array_equal(seen, other)
  full = np.concatenate([yb for _, yb in run(drop_remainder=False)])
  assert sorted(full.tolist()) == list(range(n))
  ordered = np.concatenate([yb for _, yb in run(shuffle=False, drop_remainder=False)])
  np.testing.assert_array_equal(ordered, y)
  with pytest.raises(ValueError, match="differ in length"):
    D.batches(x, y[:-1], bs, 0, 0)
  with pytest.raises(ValueError, match="no batch"):
    D.batches(x[:5], y[:5], bs, 0, 0)


def test_eval_batches_count_each_example_once():
  n, bs = 10, 4
  y = np.arange(1, n + 1, dtype=np.int32)
  x = np.repeat(y[:, None, None, None], 3, axis=1).astype(np.float32)
  out = list(D.eval_batches(x, y, bs))
  assert len(out) == 3 and all(xb.shape == (bs, 3, 1, 1) and w.shape == (bs,) for xb, _, w in out)
  w = np.concatenate([w for *_, w in out])
  assert w.dtype == np.float32 and w.sum() == n
  np.testing.assert_array_equal(np.concatenate([yb for _, yb, _ in out])[w > 0], y)
  assert sum(float((wb * xb[:, 0, 0, 0]).sum()) for xb, _, wb in out) == y.sum()


def test_class_balanced_sample(mnist):
  idx = D.class_balanced_sample(mnist.train_y, per_class=10, seed=0)
  assert idx.shape == (100,) and len(set(idx.tolist())) == 100
  assert np.bincount(mnist.train_y[idx], minlength=10).tolist() == [10] * 10
  np.testing.assert_array_equal(idx, D.class_balanced_sample(mnist.train_y, 10, 0))
  assert set(idx.tolist()) != set(D.class_balanced_sample(mnist.train_y, 10, 1).tolist())
  with pytest.raises(ValueError, match="class 2 has 1 examples"):
    D.class_balanced_sample(np.array([0, 0, 1, 1, 2]), per_class=2, seed=0)
  with pytest.raises(ValueError, match="class 3 has 0"):
    D.class_balanced_sample(np.array([0, 1, 2]), per_class=1, seed=0, num_classes=4)


# ------------------------------------------------------------------------------- augmentation

def _match_crop(out: np.ndarray, img: np.ndarray, pad: int) -> list[tuple[int, int, bool]]:
  """All (dy, dx, flipped) such that ``out`` is that crop of the zero-padded ``img``."""
  h, w = img.shape[:2]
  padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
  hits = []
  for dy in range(2 * pad + 1):
    for dx in range(2 * pad + 1):
      crop = padded[dy:dy + h, dx:dx + w]
      for flip in (False, True):
        if np.array_equal(out, crop[:, ::-1] if flip else crop):
          hits.append((dy, dx, flip))
  return hits


def test_augment_cifar_is_crop_and_flip():
  rng = np.random.default_rng(0)
  imgs = rng.standard_normal((48, 32, 32, 3)).astype(np.float32)  # no two crops coincide
  key = jax.random.PRNGKey(5)
  out = np.asarray(jax.jit(D.augment_cifar)(key, imgs))
  assert out.shape == imgs.shape and out.dtype == np.float32
  np.testing.assert_array_equal(out, np.asarray(D.augment_cifar(key, imgs)))  # jit == eager
  draws = []
  for o, i in zip(out, imgs):
    hits = _match_crop(o, i, pad=4)
    assert len(hits) == 1, hits
    draws.append(hits[0])
  flips = {f for *_, f in draws}
  offsets = {(dy, dx) for dy, dx, _ in draws}
  assert flips == {False, True} and len(offsets) > 10  # independent per image
  assert any(dy != 4 or dx != 4 for dy, dx in offsets)  # some crops include zero padding
  again = np.asarray(D.augment_cifar(key, imgs))
  np.testing.assert_array_equal(out, again)
  assert not np.array_equal(out, np.asarray(D.augment_cifar(jax.random.PRNGKey(6), imgs)))
  with pytest.raises(ValueError, match="batch, H, W, C"):
    D.augment_cifar(key, imgs[0])
