"""MNIST and CIFAR-10 as host numpy arrays, verified; deterministic batching; CIFAR augmentation.

Sources, in order:
1. a folder of the standard files, given as ``data_dir`` or by the environment variable
   ``BFPRUNE_DATA_DIR``. MNIST: the four idx files (``*.gz`` or uncompressed) in ``<dir>/`` or
   ``<dir>/mnist/``. CIFAR-10: the python batches (``data_batch_1..5``, ``test_batch``) or the
   binary ones (``data_batch_1..5.bin``, ``test_batch.bin``) in ``<dir>/``,
   ``<dir>/cifar-10-batches-{py,py-partial,bin}/`` or ``<dir>/cifar10/cifar-10-batches-{...}/``.
2. only when no folder is given at all (neither argument nor variable): the same standard files
   downloaded by tensorflow-datasets' ``DownloadManager`` (its URLs, sha256 checksums and cache,
   ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``; no TensorFlow needed), read by the readers
   below: MNIST's idx ``.gz`` files, CIFAR-10's binary tarball ``cifar-10-binary.tar.gz``. See
   ``bfprune/data/_tfds.py``; ``python -m bfprune.data fetch DIR`` writes them into a folder.

Everything read is checked before use; any problem raises one ``DataError`` that names the file
and what was expected. MNIST files are also checked against the official digests (gzip md5, or
the sha256 of the decompressed idx bytes so that uncompressed or re-gzipped copies are accepted).

Images come back float32 NHWC, normalised per channel with the usual dataset statistics;
labels int32.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ENV_VAR = "BFPRUNE_DATA_DIR"

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_SPLITS = ("train", "test")


class DataError(ValueError):
  """A data file is missing, corrupt, or not what it should be. The message names the file."""


class DataWarning(UserWarning):
  """The data loaded but is not the complete official set (e.g. a partial CIFAR-10 copy)."""


class Dataset(NamedTuple):
  """One dataset as host arrays: images float32 (N, H, W, C) normalised, labels int32 (N,)."""
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  name: str


# --------------------------------------------------------------------------- file search / hashing

def _resolve_dir(data_dir: str | os.PathLike | None) -> Path | None:
  """The folder to read from: the argument, else $BFPRUNE_DATA_DIR, else None (use tfds)."""
  if data_dir is None:
    data_dir = os.environ.get(ENV_VAR) or None
  if data_dir is None:
    return None
  path = Path(data_dir).expanduser()
  return path if path.is_absolute() else Path.cwd() / path


def _check_split(split: str) -> None:
  if split not in _SPLITS:
    raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")


def _find(dirs: Sequence[Path], names: Sequence[str], what: str) -> Path:
  """First existing ``dir/name``; otherwise a DataError listing every path tried."""
  tried = [d / n for d in dirs for n in names]
  for p in tried:
    if p.is_file():
      return p
  listing = "\n  ".join(str(p) for p in tried)
  raise DataError(f"{what}: file not found; searched:\n  {listing}")


def _read_bytes(path: Path) -> bytes:
  try:
    return path.read_bytes()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e})") from e


# Files whose digest already matched, keyed by identity and modification, so that repeated loads
# in one process skip re-hashing. A rewritten file gets a new mtime / size and is hashed again.
_VERIFIED: set[tuple] = set()


def _file_key(path: Path) -> tuple:
  st = path.stat()
  return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


# --------------------------------------------------------------------------- MNIST

# name -> (gz md5, sha256 of the decompressed idx file); official values.
_MNIST_DIGESTS = {
    "train-images": ("f68b3c2dcbeaaa9fbdd348bbdeb94873",
                     "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train-labels": ("d53e105ee54ea40749a09fcbcd1e9432",
                     "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "t10k-images": ("9fb629c4189551a2d022fa330f9573f3",
                    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "t10k-labels": ("ec29112dd5afa0611ce80d1b7f02629c",
                    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}
_IDX_IMAGES_MAGIC = 0x00000803  # uint8 data, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # uint8 data, 1 dimension


def _mnist_candidates(stem: str, ndim: int) -> list[str]:
  """File names accepted for one MNIST file (official dashes, or the common dotted variant)."""
  names = []
  for base in (f"{stem}-idx{ndim}-ubyte", f"{stem}.idx{ndim}-ubyte"):
    names += [base + ".gz", base]
  return names


def _read_idx(path: Path) -> tuple[bytes, bytes]:
  """(raw file bytes, decompressed idx bytes) of a ``.gz`` or plain idx file."""
  raw = _read_bytes(path)
  if path.suffix != ".gz":
    return raw, raw
  try:
    return raw, gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path}: truncated or corrupt gzip file ({e}); "
                    "expected a complete gzip stream of an idx file") from e


def _parse_idx(path: Path, content: bytes, magic: int, tail: tuple[int, ...]) -> np.ndarray:
  """uint8 array (N, *tail) from idx bytes, checking magic number, shape and length."""
  ndim = 1 + len(tail)
  header = 4 + 4 * ndim
  if len(content) < header:
    raise DataError(f"{path}: {len(content)} bytes, shorter than the {header}-byte idx header")
  got_magic = int.from_bytes(content[:4], "big")
  if got_magic != magic:
    raise DataError(f"{path}: wrong idx magic number 0x{got_magic:08x}, expected 0x{magic:08x} "
                    f"(uint8, {ndim} dimension{'s' if ndim > 1 else ''})")
  dims = tuple(int.from_bytes(content[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  if dims[1:] != tail:
    raise DataError(f"{path}: wrong shape {dims}, expected (N, {', '.join(map(str, tail))})")
  expected = int(np.prod(dims))
  payload = len(content) - header
  if payload != expected:
    raise DataError(f"{path}: header says shape {dims} = {expected} bytes of data, "
                    f"file holds {payload} (truncated or padded)")
  return np.frombuffer(content, np.uint8, offset=header).reshape(dims)


def _verify_mnist(path: Path, stem: str, raw: bytes, content: bytes) -> None:
  """Checks the official digests: gz md5 (cheap) or else sha256 of the idx content."""
  key = _file_key(path)
  if key in _VERIFIED:
    return
  want_md5, want_sha = _MNIST_DIGESTS[stem]
  got_md5 = hashlib.md5(raw).hexdigest() if path.suffix == ".gz" else None
  if got_md5 != want_md5:
    got_sha = hashlib.sha256(content).hexdigest()
    if got_sha != want_sha:
      gz = f"gzip md5 {want_md5} or " if got_md5 is not None else ""
      got = f"gzip md5 {got_md5}, " if got_md5 is not None else ""
      raise DataError(
          f"{path}: checksum mismatch, not the official MNIST {stem} file; expected "
          f"{gz}idx sha256 {want_sha}; got {got}idx sha256 {got_sha}")
  _VERIFIED.add(key)


def _normalise(images_u8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 (N, H, W, C) -> float32 ((x / 255) - mean) / std, per channel."""
  x = images_u8.astype(np.float32)
  x *= np.float32(1 / 255)
  x -= np.asarray(mean, np.float32)
  x /= np.asarray(std, np.float32)
  return x


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> None:
  if labels.size and int(labels.max()) >= num_classes:
    raise DataError(f"{path}: label {int(labels.max())} out of range, expected 0..{num_classes - 1}")


def _mnist_from_files(img_path: Path, lab_path: Path, prefix: str, verify_checksums: bool
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Checked, normalised (images, labels) of one split from its two idx files."""
  # Structure first (clearer messages for the common failure modes), digests last.
  img_raw, img_content = _read_idx(img_path)
  lab_raw, lab_content = _read_idx(lab_path)
  images = _parse_idx(img_path, img_content, _IDX_IMAGES_MAGIC, (28, 28))
  labels = _parse_idx(lab_path, lab_content, _IDX_LABELS_MAGIC, ())
  if images.shape[0] != labels.shape[0]:
    raise DataError(f"{img_path} holds {images.shape[0]} images but {lab_path} holds "
                    f"{labels.shape[0]} labels; expected the same count")
  _check_labels(lab_path, labels, 10)
  if verify_checksums:
    _verify_mnist(img_path, f"{prefix}-images", img_raw, img_content)
    _verify_mnist(lab_path, f"{prefix}-labels", lab_raw, lab_content)
  return _normalise(images[..., None], MNIST_MEAN, MNIST_STD), labels.astype(np.int32)


def load_mnist(split: str, data_dir: str | os.PathLike | None = None, *,
               verify_checksums: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """MNIST ``split`` ('train' | 'test') -> (images float32 (N, 28, 28, 1), labels int32 (N,)).

  Images are normalised with mean 0.1307 and std 0.3081 (of the [0, 1] pixels). Reads
  ``<dir>/`` or ``<dir>/mnist/`` (``*-idx?-ubyte[.gz]``); ``dir`` is ``data_dir`` or
  ``$BFPRUNE_DATA_DIR``; with neither, the official ``.gz`` files through tensorflow-datasets'
  download cache. ``verify_checksums=False`` skips the official digests (for a deliberately
  modified copy); structure is always checked.
  """
  _check_split(split)
  prefix = "train" if split == "train" else "t10k"
  root = _resolve_dir(data_dir)
  if root is None:
    from bfprune.data import _tfds
    files = _tfds.download("mnist")
    img_path, lab_path = (files[f"{prefix}-{kind}-idx{d}-ubyte.gz"]
                          for kind, d in (("images", 3), ("labels", 1)))
  else:
    dirs = [root, root / "mnist"]
    img_path = _find(dirs, _mnist_candidates(f"{prefix}-images", 3), f"MNIST {split} images")
    lab_path = _find(dirs, _mnist_candidates(f"{prefix}-labels", 1), f"MNIST {split} labels")
  return _mnist_from_files(img_path, lab_path, prefix, verify_checksums)


# --------------------------------------------------------------------------- CIFAR-10

_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILES = ("test_batch",)
_CIFAR_FULL = {"train": 50000, "test": 10000}

# The only globals a CIFAR batch pickle needs (numpy array reconstruction, old and new module
# names). Anything else is refused, so a tampered pickle cannot run code.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str):
    if (module, name) not in _PICKLE_ALLOWED:
      raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
    if name == "_reconstruct":
      core = getattr(np, "_core", None) or np.core
      return core.multiarray._reconstruct
    if name == "_frombuffer":
      core = getattr(np, "_core", None) or np.core
      return core.numeric._frombuffer
    return getattr(np, name)


_CIFAR_SUBDIRS = ("cifar-10-batches-py", "cifar-10-batches-py-partial", "cifar-10-batches-bin")
_CIFAR_TAR_PREFIX = "cifar-10-batches-bin/"  # folder inside the official binary tarball
_CIFAR_RECORD = 1 + 3 * 32 * 32  # binary format: label byte, then 1024 R, 1024 G, 1024 B


def _cifar_dirs(root: Path) -> list[Path]:
  return [root] + [root / s for s in _CIFAR_SUBDIRS] + [root / "cifar10" / s for s in _CIFAR_SUBDIRS]


def _cifar_files(root: Path, names: Sequence[str], split: str) -> list[Path]:
  """All ``names`` (python batches) or all ``names`` + ``.bin`` (binary batches) from the first
  candidate folder holding any of them (no mixing of folders or formats)."""
  dirs = _cifar_dirs(root)
  for d in dirs:
    for want in (list(names), [n + ".bin" for n in names]):
      if any((d / n).is_file() for n in want):
        missing = [str(d / n) for n in want if not (d / n).is_file()]
        if missing:
          raise DataError(f"CIFAR-10 {split}: incomplete folder {d}; missing: {', '.join(missing)}")
        return [d / n for n in want]
  listing = "\n  ".join(str(d / n) for d in dirs for n in names)
  raise DataError(f"CIFAR-10 {split}: files not found (python batches, or the same names + .bin); "
                  f"searched:\n  {listing}")


def _parse_cifar_binary(where: str, content: bytes) -> tuple[np.ndarray, np.ndarray]:
  """One binary batch (records of 1 label byte + 3072 pixel bytes) -> (uint8 (N, 32, 32, 3),
  labels int32 (N,)). ``where`` names the file in messages."""
  if not content or len(content) % _CIFAR_RECORD:
    raise DataError(f"{where}: {len(content)} bytes, expected a positive multiple of "
                    f"{_CIFAR_RECORD} (records of 1 label byte + 3072 pixel bytes)")
  rows = np.frombuffer(content, np.uint8).reshape(-1, _CIFAR_RECORD)
  labels = rows[:, 0]
  if labels.max() > 9:
    bad = int(np.argmax(labels > 9))
    raise DataError(f"{where}: record {bad} has label {labels[bad]}, expected 0..9")
  # Pixels are channel-major (1024 R, 1024 G, 1024 B), each plane row-major, as in the pickles.
  images = rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels.astype(np.int32)


def _read_cifar_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
  return _parse_cifar_binary(str(path), _read_bytes(path))


def _cifar_tar_members(path: Path, fnames: Sequence[str], optional: Sequence[str] = ()
                       ) -> dict[str, bytes]:
  """Raw bytes of ``cifar-10-batches-bin/<fname>`` for each of ``fnames`` (and of ``optional``
  where present), read straight from the official tarball in one pass."""
  wanted = {_CIFAR_TAR_PREFIX + n: n for n in (*fnames, *optional)}
  found: dict[str, bytes] = {}
  try:
    with tarfile.open(path, "r:gz") as tar:
      for member in tar:  # sequential: the archive is a single gzip stream
        if member.name in wanted and member.isfile():
          found[wanted[member.name]] = tar.extractfile(member).read()
          if len(found) == len(wanted):
            break
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path}: truncated or corrupt tar.gz ({type(e).__name__}: {e}); expected the "
                    "CIFAR-10 binary tarball") from e
  missing = [_CIFAR_TAR_PREFIX + n for n in fnames if n not in found]
  if missing:
    raise DataError(f"{path}: no {', '.join(missing)} in the archive; expected the CIFAR-10 "
                    "binary tarball")
  return found


def _read_cifar_tar(path: Path, names: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
  """Binary batches ``names`` (without ``.bin``) from the official tarball, checked."""
  raw = _cifar_tar_members(path, [n + ".bin" for n in names])
  return [_parse_cifar_binary(f"{path}:{_CIFAR_TAR_PREFIX}{n}.bin", raw[n + ".bin"]) for n in names]


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
  """One python batch -> (uint8 (N, 32, 32, 3), labels int32 (N,))."""
  raw = _read_bytes(path)
  try:
    obj = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
  except Exception as e:  # pickle raises many types on garbage (EOFError, KeyError, ...)
    raise DataError(f"{path}: corrupt or truncated pickle ({type(e).__name__}: {e}); expected a "
                    "CIFAR-10 python batch dict") from e
  if not isinstance(obj, dict):
    raise DataError(f"{path}: unpickled a {type(obj).__name__}, expected a dict")
  get = lambda k: obj.get(k.encode(), obj.get(k))  # bytes keys (python-2 pickles) or str keys
  data, labels = get("data"), get("labels")
  if data is None or labels is None:
    raise DataError(f"{path}: dict lacks 'data' / 'labels'; has keys {sorted(map(str, obj))}")
  data = np.asarray(data)
  labels = np.asarray(labels)
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
  if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
    raise DataError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}; "
                    "expected the same count")
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    raise DataError(f"{path}: labels span {labels.min()}..{labels.max()}, expected 0..9")
  # Rows are channel-major (1024 R, 1024 G, 1024 B), each plane row-major.
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels.astype(np.int32)


def load_cifar10(split: str, data_dir: str | os.PathLike | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """CIFAR-10 ``split`` -> (images float32 (N, 32, 32, 3), labels int32 (N,)).

  Normalised per channel with mean (0.4914, 0.4822, 0.4465) and std (0.2470, 0.2435, 0.2616).
  Batch files (python or binary) may hold any number of rows (a partial copy loads, with a
  ``DataWarning``); the train split concatenates ``data_batch_1..5`` in order. No checksums on
  folders: the official pickles are often re-written, so the structure and label range are
  checked instead. With no folder, the binary tarball through tensorflow-datasets' download
  cache (its sha256 checked against tfds's registered one).
  """
  _check_split(split)
  root = _resolve_dir(data_dir)
  names = _CIFAR_TRAIN_FILES if split == "train" else _CIFAR_TEST_FILES
  if root is None:
    from bfprune.data import _tfds
    source = _tfds.download("cifar10")["cifar-10-binary.tar.gz"]
    parts = _read_cifar_tar(source, names)
  else:
    source = root
    paths = _cifar_files(root, names, split)
    read = _read_cifar_binary if paths[0].suffix == ".bin" else _read_cifar_batch
    parts = [read(p) for p in paths]
  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  if images.shape[0] != _CIFAR_FULL[split]:
    warnings.warn(f"CIFAR-10 {split} under {source}: {images.shape[0]} images, the official split "
                  f"has {_CIFAR_FULL[split]} (partial copy)", DataWarning, stacklevel=2)
  return _normalise(images, CIFAR10_MEAN, CIFAR10_STD), labels


# --------------------------------------------------------------------------- datasets

_LOADERS = {"mnist": load_mnist, "cifar10": load_cifar10}


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
  """'mnist' | 'cifar10' -> Dataset of host arrays (both splits)."""
  if name not in _LOADERS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(_LOADERS)}")
  train_x, train_y = _LOADERS[name]("train", data_dir)
  test_x, test_y = _LOADERS[name]("test", data_dir)
  return Dataset(train_x, train_y, test_x, test_y, num_classes=10, name=name)


# --------------------------------------------------------------------------- fetch

def _write_atomic(path: Path, content: bytes) -> None:
  """Writes ``path`` through a temporary file beside it: a reader never sees half a file."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    tmp.write_bytes(content)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def fetch(name: str, dest: str | os.PathLike) -> Path:
  """Writes the standard files of ``name`` ('mnist' | 'cifar10') into the folder ``dest``.

  The files come through tensorflow-datasets' download cache (downloaded on first use, see
  ``load_dataset`` without a folder) and are written atomically in the layout the folder
  loaders read: MNIST's four official ``.gz`` files as they are into ``dest/mnist/``; CIFAR-10's
  binary batches (``data_batch_1..5.bin``, ``test_batch.bin``, ``batches.meta.txt``) out of the
  tarball into ``dest/cifar10/cifar-10-batches-bin/``. Everything is checked before it is
  written (MNIST digests and structure, CIFAR-10 record structure; the tarball's sha256 is the
  one tfds registers), and the loaders must then find the written files first under ``dest``. Returns the folder
  written.
  """
  from bfprune.data import _tfds
  if name not in _LOADERS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(_LOADERS)}")
  root = Path(dest).expanduser().absolute()
  if name == "mnist":
    files = _tfds.download("mnist")
    out = root / "mnist"
    for prefix in ("train", "t10k"):
      pair = [files[f"{prefix}-{k}-idx{d}-ubyte.gz"] for k, d in (("images", 3), ("labels", 1))]
      _mnist_from_files(*pair, prefix, verify_checksums=True)
    out.mkdir(parents=True, exist_ok=True)
    for fname, path in files.items():
      _write_atomic(out / fname, _read_bytes(path))
    found = {_find([root, out], _mnist_candidates(s, d), s).parent
             for s, d in (("train-images", 3), ("train-labels", 1), ("t10k-images", 3),
                          ("t10k-labels", 1))}
  else:
    tar_path = _tfds.download("cifar10")["cifar-10-binary.tar.gz"]
    out = root / "cifar10" / "cifar-10-batches-bin"
    bins = [n + ".bin" for n in _CIFAR_TRAIN_FILES + _CIFAR_TEST_FILES]
    contents = _cifar_tar_members(tar_path, bins, optional=["batches.meta.txt"])
    for fname in bins:  # the tarball's sha256 is tfds's registered one; structure anyway
      _parse_cifar_binary(f"{tar_path}:{_CIFAR_TAR_PREFIX}{fname}", contents[fname])
    out.mkdir(parents=True, exist_ok=True)
    for fname, content in contents.items():
      _write_atomic(out / fname, content)
    found = {_cifar_files(root, ns, "")[0].parent for ns in (_CIFAR_TRAIN_FILES, _CIFAR_TEST_FILES)}
  if found != {out}:
    raise DataError(f"wrote {out}, but the loader reads {', '.join(map(str, sorted(found)))} "
                    f"first under {root}; remove that copy or fetch into another folder")
  return out


# --------------------------------------------------------------------------- batching

def _check_xy(x: np.ndarray, y: np.ndarray, batch_size: int) -> int:
  if len(x) != len(y):
    raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  return len(x)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """Permutation of range(n) (int64), a pure function of (seed, epoch)."""
  if n < 0 or seed < 0 or epoch < 0:
    raise ValueError(f"n, seed and epoch must be >= 0, got n={n}, seed={seed}, epoch={epoch}")
  # Seeding with the pair keeps epochs independent without sequential generator state.
  return np.random.default_rng([seed, epoch]).permutation(n)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epoch: int,
            shuffle: bool = True, drop_remainder: bool = True
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of (x (batch_size, ...), y (batch_size,)) numpy batches.

  Order is ``epoch_permutation(n, seed, epoch)`` (or 0..n-1 without shuffle). With
  ``drop_remainder`` every batch is full (one jit shape) and the last ``n % batch_size``
  examples of the order are skipped; otherwise the last batch is smaller. Arguments are
  checked when called, not on the first ``next``.
  """
  n = _check_xy(x, y, batch_size)
  if drop_remainder and n < batch_size:
    raise ValueError(f"batch_size {batch_size} > {n} examples with drop_remainder: no batch")
  order = epoch_permutation(n, seed, epoch) if shuffle else np.arange(n)
  stop = n - n % batch_size if drop_remainder else n

  def gen():
    for i in range(0, stop, batch_size):
      idx = order[i:i + batch_size]
      yield x[idx], y[idx]
  return gen()


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """In-order (x, y, weight) batches, all of size ``batch_size``; every example once.

  The last batch is zero-padded; ``weight`` float32 (batch_size,) is 1 for real examples and
  0 for padding, so ``sum(weight * per_example)`` over all batches counts each example once.
  """
  n = _check_xy(x, y, batch_size)

  def gen():
    for i in range(0, n, batch_size):
      xb, yb = x[i:i + batch_size], y[i:i + batch_size]
      k = len(xb)
      w = np.zeros(batch_size, np.float32)
      w[:k] = 1
      if k < batch_size:
        xb = np.concatenate([xb, np.zeros((batch_size - k,) + xb.shape[1:], xb.dtype)])
        yb = np.concatenate([yb, np.zeros((batch_size - k,) + yb.shape[1:], yb.dtype)])
      yield xb, yb, w
  return gen()


def class_balanced_sample(labels: np.ndarray, per_class: int, seed: int,
                          num_classes: int | None = None) -> np.ndarray:
  """Indices (int64, (per_class * classes,)) with ``per_class`` examples of every class.

  Classes are 0..num_classes-1 (default: max label + 1); each must have ``per_class``
  examples. Drawn without replacement, deterministic in ``seed``, returned in shuffled order
  so that consecutive slices stay mixed.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
  if per_class < 1:
    raise ValueError(f"per_class must be >= 1, got {per_class}")
  if labels.min() < 0:
    raise ValueError(f"labels must be >= 0, got min {labels.min()}")
  k = int(labels.max()) + 1 if num_classes is None else num_classes
  rng = np.random.default_rng(seed)
  chosen = []
  for c in range(k):
    idx = np.flatnonzero(labels == c)
    if len(idx) < per_class:
      raise ValueError(f"class {c} has {len(idx)} examples, fewer than per_class={per_class}")
    chosen.append(rng.choice(idx, per_class, replace=False))
  return rng.permutation(np.concatenate(chosen))


# --------------------------------------------------------------------------- augmentation

def augment_cifar(key: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
  """Random crop of the zero-padded image plus random horizontal flip, per image.

  images: (batch, H, W, C), already normalised. Each image is padded by ``pad`` pixels of 0 on
  every side -- zero in normalised space, i.e. the dataset mean colour -- then an H x W window
  at a uniform offset in [0, 2 * pad] per axis is cut out and mirrored left-right with
  probability 1/2. Draws are independent per image and a pure function of ``key``; jit-able.
  """
  if images.ndim != 4:
    raise ValueError(f"augment_cifar: images must be (batch, H, W, C), got shape {images.shape}")
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(k, img):
    k_off, k_flip = jax.random.split(k)
    oy, ox = jax.random.randint(k_off, (2,), 0, 2 * pad + 1)
    crop = jax.lax.dynamic_slice(img, (oy, ox, 0), (h, w, c))
    return jnp.where(jax.random.bernoulli(k_flip), crop[:, ::-1], crop)

  return jax.vmap(one)(jax.random.split(key, b), padded)
