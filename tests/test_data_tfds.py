"""bfprune.data without a folder: the standard files through tensorflow-datasets' download cache
(no TensorFlow), the CIFAR-10 binary reader, the failure modes, and ``python -m bfprune.data fetch``.

Nothing here reaches the internet. tfds's cache is seeded from the MNIST files of the test data
folder the way tfds stores a cached download; where a download would be attempted, name
resolution is blocked in-process (``offline``) or a subprocess gets a proxy that refuses
connections, so any attempt fails at once. Real downloads run against a local HTTP server.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums, resource

from bfprune import data as D
from bfprune.data import _tfds
from bfprune.data import __main__ as cli
from conftest import REPO, data_dir

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
              "http_proxy", "https_proxy", "all_proxy", "no_proxy")
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


# ------------------------------------------------------------------------------- fixtures

@pytest.fixture
def no_proxy_env(monkeypatch):
  for v in PROXY_VARS:
    monkeypatch.delenv(v, raising=False)


@pytest.fixture
def offline(monkeypatch, no_proxy_env):
  """No name resolution, as on a machine without network; records every host asked for."""
  asked = []

  def no_dns(host, *args, **kwargs):
    asked.append(host)
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
  monkeypatch.setattr(socket, "getaddrinfo", no_dns)
  return asked


@pytest.fixture
def tfds_dir(tmp_path, monkeypatch):
  """An empty tfds data folder in $TFDS_DATA_DIR, and no bfprune data folder."""
  path = tmp_path / "tfds"
  monkeypatch.setenv("TFDS_DATA_DIR", str(path))
  monkeypatch.delenv(D.ENV_VAR, raising=False)
  return path


def seed_mnist_cache(dl_dir: Path, subfolder: str = "") -> dict[str, Path]:
  """The official MNIST files placed where tfds keeps a cached download: the name from
  ``get_dl_fname(url, sha256)`` plus its ``.INFO`` file. Returns {file name: cached path}."""
  target = dl_dir / subfolder
  target.mkdir(parents=True, exist_ok=True)
  out = {}
  for url, info in tfds.builder_cls("mnist").url_infos.items():
    path = target / resource.get_dl_fname(url, info.checksum)
    shutil.copyfile(data_dir() / "mnist" / info.filename, path)
    resource.write_info_file(url=url, path=path, dataset_name="mnist",
                             original_fname=info.filename, url_info=info)
    out[info.filename] = path
  assert sorted(out) == sorted(MNIST_FILES)
  return out


def dead_proxy() -> str:
  """http://127.0.0.1:<port> with nothing listening: every connection is refused at once."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}"


def offline_env(home: Path) -> dict[str, str]:
  """Environment of a subprocess on a fresh machine without network: empty home and tfds
  folder, no data folder, and all traffic sent to a proxy that refuses it."""
  env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS and k != D.ENV_VAR}
  proxy = dead_proxy()
  env.update(HOME=str(home), TFDS_DATA_DIR=str(home / "tensorflow_datasets"), JAX_PLATFORMS="cpu",
             HTTP_PROXY=proxy, HTTPS_PROXY=proxy, http_proxy=proxy, https_proxy=proxy)
  return env


def assert_one_line_naming_the_folder_options(msg: str):
  assert "\n" not in msg and "Traceback" not in msg, msg
  assert "--data_dir" in msg and "BFPRUNE_DATA_DIR" in msg, msg


# ------------------------------------------------------------------------------- MNIST via tfds

def test_mnist_from_seeded_tfds_cache_equals_folder(tfds_dir, offline, mnist):
  seed_mnist_cache(tfds_dir / "downloads")
  got = D.load_dataset("mnist", None)
  assert offline == []  # served from the cache: no host was even looked up
  for field in ("train_x", "train_y", "test_x", "test_y"):
    a, b = getattr(got, field), getattr(mnist, field)
    assert a.dtype == b.dtype and a.shape == b.shape, field
    np.testing.assert_array_equal(a, b, err_msg=field)
  assert (got.num_classes, got.name) == (10, "mnist")


def test_damaged_cache_file_is_removed_then_offline_error(tfds_dir, offline):
  """Cache in tfds's per-dataset subfolder (where its new downloads go); one file damaged."""
  cached = seed_mnist_cache(tfds_dir / "downloads", subfolder="mnist")
  bad = cached["t10k-labels-idx1-ubyte.gz"]
  raw = bytearray(bad.read_bytes())
  raw[-3] ^= 0xFF
  bad.write_bytes(bytes(raw))
  with pytest.raises(D.DataError, match="cached download of .*t10k-labels.*has sha256") as e:
    D.load_mnist("test")
  assert str(bad) in str(e.value) and "removed it" in str(e.value)
  assert not bad.exists() and not resource.get_info_path(bad).exists()
  assert offline == []
  with pytest.raises(D.DataError, match="storage.googleapis.com:443 unreachable") as e:
    D.load_mnist("test")  # the file is missing now: a download is needed, and fails offline
  assert_one_line_naming_the_folder_options(str(e.value))
  assert offline == ["storage.googleapis.com"]


@pytest.mark.parametrize("name, host", [("mnist", "storage.googleapis.com"),
                                        ("cifar10", "www.cs.toronto.edu")])
def test_offline_without_cache_is_one_fast_line(tfds_dir, offline, name, host):
  t0 = time.monotonic()
  with pytest.raises(D.DataError, match=f"cannot download {name} .*{host}:443 unreachable") as e:
    D.load_dataset(name, None)
  assert time.monotonic() - t0 < 10
  assert_one_line_naming_the_folder_options(str(e.value))
  leftovers = [p for p in tfds_dir.rglob("*") if p.is_file() or ".tmp." in p.name]
  assert leftovers == []


def test_hanging_name_lookup_is_bounded(tfds_dir, monkeypatch, no_proxy_env):
  def slow_dns(*args, **kwargs):
    time.sleep(3)
    raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
  monkeypatch.setattr(socket, "getaddrinfo", slow_dns)
  monkeypatch.setattr(_tfds, "PROBE_TIMEOUT_S", 0.3)
  t0 = time.monotonic()
  with pytest.raises(D.DataError, match=r"unreachable \(no answer within 0.3 s\)"):
    D.load_mnist("test")
  assert time.monotonic() - t0 < 2


# ------------------------------------------------------------------------------- real downloads, local server

class _Server:
  """HTTP server on 127.0.0.1 serving ``routes`` {path: bytes | int status}; counts requests."""

  def __init__(self, routes: dict):
    self.routes, self.hits = routes, []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802
        outer.hits.append(self.path)
        body = outer.routes.get(self.path, 404)
        if isinstance(body, int):
          self.send_error(body)
          return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


def _info(content: bytes, filename: str) -> checksums.UrlInfo:
  return checksums.UrlInfo(size=len(content), checksum=hashlib.sha256(content).hexdigest(),
                           filename=filename)


def _no_tmp_left(dl_dir: Path) -> bool:
  return not any(".tmp." in p.name for p in dl_dir.rglob("*"))


def test_download_through_tfds_then_cache(tmp_path, no_proxy_env):
  content = (data_dir() / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()
  server = _Server({"/t10k-labels-idx1-ubyte.gz": content})
  url = server.url + "/t10k-labels-idx1-ubyte.gz"
  infos = {url: _info(content, "t10k-labels-idx1-ubyte.gz")}
  dl_dir = tmp_path / "downloads"
  try:
    got = _tfds.download_urls("mnist", infos, dl_dir)
  finally:
    server.close()
  path = got["t10k-labels-idx1-ubyte.gz"]
  assert path == dl_dir / "mnist" / resource.get_dl_fname(url, infos[url].checksum)
  assert path.read_bytes() == content and resource.is_locally_cached(path)
  assert server.hits == ["/t10k-labels-idx1-ubyte.gz"] and _no_tmp_left(dl_dir)
  assert _tfds.download_urls("mnist", infos, dl_dir) == got  # server gone: from the cache


@pytest.mark.parametrize("case", ["busy", "missing", "checksum"])
def test_failed_download_is_one_line_bounded_and_leaves_nothing(tmp_path, no_proxy_env, case):
  content = b"not what was registered"
  server = _Server({"/busy.gz": 503, "/checksum.gz": content})
  url = f"{server.url}/{case}.gz"
  infos = {url: _info(b"the registered content", f"{case}.gz")}
  dl_dir = tmp_path / "downloads"
  t0 = time.monotonic()
  try:
    with pytest.raises(D.DataError, match="downloading mnist through tensorflow-datasets") as e:
      _tfds.download_urls("mnist", infos, dl_dir)
  finally:
    server.close()
  assert time.monotonic() - t0 < 15
  assert_one_line_naming_the_folder_options(str(e.value))
  assert _no_tmp_left(dl_dir)
  assert not any(p.is_file() for p in dl_dir.rglob("*"))
  if case == "busy":  # tfds's 10 retries with backoff (~3.5 min) are bounded
    assert len(server.hits) == _tfds.DOWNLOAD_RETRIES + 1
  if case == "checksum":
    assert "checksum" in str(e.value).lower()


# ------------------------------------------------------------------------------- CIFAR-10 binary

def cifar_images(rows: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Per batch (data_batch_1..5, test_batch): uint8 (rows, 32, 32, 3) images and labels."""
  rng = np.random.default_rng(seed)
  imgs = [rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8) for _ in range(6)]
  labs = [rng.integers(0, 10, rows).astype(np.uint8) for _ in range(6)]
  return imgs, labs


def binary_batch(images: np.ndarray, labels: np.ndarray) -> bytes:
  """Official binary format, written record by record: label byte, then the R, G and B planes."""
  out = bytearray()
  for img, lab in zip(images, labels):
    out.append(int(lab))
    for ch in range(3):
      out += img[:, :, ch].tobytes()  # one plane, row-major
  return bytes(out)


BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar_tarball(path: Path, images, labels, members: dict | None = None) -> Path:
  """A tar.gz laid out like ``cifar-10-binary.tar.gz``; ``members`` overrides / drops files."""
  files = {f"{b}.bin": binary_batch(i, l) for b, i, l in zip(BATCHES, images, labels)}
  files["batches.meta.txt"] = b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n"
  files["readme.html"] = b"<html></html>"
  files.update(members or {})
  with tarfile.open(path, "w:gz") as tar:
    for name, blob in files.items():
      if blob is None:
        continue
      info = tarfile.TarInfo("cifar-10-batches-bin/" + name)
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  return path


def denorm(x: np.ndarray) -> np.ndarray:
  """Normalised float images back to uint8 pixel values."""
  return np.rint((x * np.array(D.CIFAR10_STD) + np.array(D.CIFAR10_MEAN)) * 255).astype(np.uint8)


def test_cifar_binary_known_pixels():
  """A hand-made record: planes R=10, G=20, B=30 with one marked pixel, label 7."""
  img = np.empty((32, 32, 3), np.uint8)
  img[...] = (10, 20, 30)
  img[1, 2, 1] = 200  # row 1, column 2, green
  planes = bytes([7]) + bytes([10] * 1024) + bytes([20] * 34 + [200] + [20] * 989) + bytes([30] * 1024)
  assert planes == binary_batch(img[None], np.array([7]))
  x, y = D._parse_cifar_binary("hand-made", planes * 2)
  assert x.shape == (2, 32, 32, 3) and x.dtype == np.uint8 and y.tolist() == [7, 7]
  np.testing.assert_array_equal(x[0], img)


def test_cifar_tarball_reader_equals_pickle_reader(tmp_path, monkeypatch):
  imgs, labs = cifar_images(rows=4, seed=1)
  tar = write_cifar_tarball(tmp_path / "cifar-10-binary.tar.gz", imgs, labs)
  py = tmp_path / "py" / "cifar-10-batches-py"
  py.mkdir(parents=True)
  for b, i, l in zip(BATCHES, imgs, labs):  # the python format of the same images
    obj = {b"data": i.transpose(0, 3, 1, 2).reshape(len(i), 3072), b"labels": l.tolist()}
    (py / b).write_bytes(pickle.dumps(obj, protocol=4))
  # The tfds path reads the tarball tfds hands over (the download itself is tested above).
  monkeypatch.delenv(D.ENV_VAR, raising=False)
  monkeypatch.setattr(_tfds, "download", lambda name: {"cifar-10-binary.tar.gz": tar})
  for split, idx in (("train", slice(0, 5)), ("test", slice(5, 6))):
    with pytest.warns(D.DataWarning, match="partial"):
      x, y = D.load_cifar10(split)
    with pytest.warns(D.DataWarning, match="partial"):
      x_py, y_py = D.load_cifar10(split, tmp_path / "py")
    np.testing.assert_array_equal(denorm(x), np.concatenate(imgs[idx]))
    np.testing.assert_array_equal(y, np.concatenate(labs[idx]).astype(np.int32))
    np.testing.assert_array_equal(x, x_py)
    np.testing.assert_array_equal(y, y_py)
    assert x.dtype == np.float32 and y.dtype == np.int32


@pytest.mark.parametrize("case", ["short", "label", "missing", "corrupt"])
def test_cifar_tarball_errors(tmp_path, case):
  imgs, labs = cifar_images(rows=2, seed=2)
  good = binary_batch(imgs[5], labs[5])
  members, pattern = {
      "short": ({"test_batch.bin": good[:-1]}, r"test_batch.bin: 6145 bytes, expected a positive "
                                               r"multiple of 3073"),
      "label": ({"test_batch.bin": good[:3073] + bytes([10]) + good[3074:]},
                r"test_batch.bin: record 1 has label 10, expected 0..9"),
      "missing": ({"test_batch.bin": None}, r"no cifar-10-batches-bin/test_batch.bin in the archive"),
      "corrupt": ({}, "truncated or corrupt tar.gz"),
  }[case]
  tar = write_cifar_tarball(tmp_path / "c.tar.gz", imgs, labs, members)
  if case == "corrupt":
    tar.write_bytes(tar.read_bytes()[:-200])
  with pytest.raises(D.DataError, match=pattern) as e:
    D._read_cifar_tar(tar, ["test_batch"])
  assert str(tar) in str(e.value)


def test_cifar_binary_batches_in_folders(tmp_path):
  """The folder loader reads binary batches flat or in cifar-10-batches-bin/, never mixed."""
  imgs, labs = cifar_images(rows=2, seed=4)
  for sub in ("flat", "cifar-10-batches-bin"):
    folder = tmp_path / sub / (sub if sub != "flat" else "")
    folder.mkdir(parents=True, exist_ok=True)
    for b, i, l in zip(BATCHES, imgs, labs):
      (folder / f"{b}.bin").write_bytes(binary_batch(i, l))
    with pytest.warns(D.DataWarning, match="partial"):
      x, y = D.load_cifar10("test", tmp_path / sub)
    np.testing.assert_array_equal(denorm(x), imgs[5])
    np.testing.assert_array_equal(y, labs[5])
  (tmp_path / "flat" / "data_batch_4.bin").unlink()
  with pytest.raises(D.DataError, match=r"incomplete folder .*flat; missing: .*data_batch_4\.bin"):
    D.load_cifar10("train", tmp_path / "flat")
  (tmp_path / "flat" / "test_batch.bin").write_bytes(b"\x00" * 3072)
  with pytest.raises(D.DataError, match=r"test_batch\.bin: 3072 bytes, expected a positive multiple"):
    D.load_cifar10("test", tmp_path / "flat")


# ------------------------------------------------------------------------------- fetch

def test_fetch_mnist_from_cache(tfds_dir, offline, mnist, tmp_path, capsys):
  seed_mnist_cache(tfds_dir / "downloads")
  dest = tmp_path / "dest"
  assert cli.main(["fetch", str(dest), "--dataset", "mnist"]) == 0
  assert f"mnist: standard files in {dest / 'mnist'}" in capsys.readouterr().out
  for name in MNIST_FILES:
    assert (dest / "mnist" / name).read_bytes() == (data_dir() / "mnist" / name).read_bytes()
  assert sorted(p.name for p in (dest / "mnist").iterdir()) == sorted(MNIST_FILES)  # no temp files
  x, y = D.load_mnist("test", dest)
  np.testing.assert_array_equal(x, mnist.test_x)
  np.testing.assert_array_equal(y, mnist.test_y)


def test_fetch_cifar_writes_binary_batches_the_folder_loader_reads(tmp_path, monkeypatch):
  imgs, labs = cifar_images(rows=3, seed=3)
  tar = write_cifar_tarball(tmp_path / "cifar-10-binary.tar.gz", imgs, labs)
  monkeypatch.setattr(_tfds, "download", lambda name: {"cifar-10-binary.tar.gz": tar})
  dest = tmp_path / "dest"
  out = D.fetch("cifar10", dest)
  assert out == dest / "cifar10" / "cifar-10-batches-bin"
  assert sorted(p.name for p in out.iterdir()) == sorted(
      [b + ".bin" for b in BATCHES] + ["batches.meta.txt"])
  for split, idx in (("train", slice(0, 5)), ("test", slice(5, 6))):
    with pytest.warns(D.DataWarning, match="partial"):
      x, y = D.load_cifar10(split, dest)
    np.testing.assert_array_equal(denorm(x), np.concatenate(imgs[idx]))
    np.testing.assert_array_equal(y, np.concatenate(labs[idx]))
  # Another copy the loader would read first: refused with a line naming it.
  other = dest / "cifar-10-batches-py"
  other.mkdir()
  (other / "test_batch").write_bytes(b"")
  with pytest.raises(D.DataError, match=f"but the loader reads {re.escape(str(other))}"):
    D.fetch("cifar10", dest)


def test_fetch_cli_offline_is_one_line(tmp_path):
  """The module entry point on a fresh machine without network: exit 1, one line, fast."""
  dest = tmp_path / "dest"
  t0 = time.monotonic()
  proc = subprocess.run([sys.executable, "-m", "bfprune.data", "fetch", str(dest)], cwd=REPO,
                        env=offline_env(tmp_path / "home"), capture_output=True, text=True,
                        timeout=60)
  assert time.monotonic() - t0 < 60
  assert proc.returncode == 1, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr  # also: no RuntimeWarning from `-m`
  assert lines[0].startswith("python -m bfprune.data fetch: error: mnist: cannot download mnist")
  assert "Connection refused" in lines[0] or "ConnectionRefused" in lines[0], lines[0]
  assert_one_line_naming_the_folder_options(lines[0])
  assert not dest.exists()


def test_sweep_offline_without_data_folder_exits_with_one_line(tmp_path):
  """The README's main job on a fresh machine without network or data folder."""
  proc = subprocess.run(
      [sys.executable, str(REPO / "experiments" / "sweep.py"), "--pruner=grasp",
       f"--out_dir={tmp_path / 'runs'}"], cwd=REPO, env=offline_env(tmp_path / "home"),
      capture_output=True, text=True, timeout=90)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if "error" in l.lower()]
  assert len(errors) == 1, proc.stderr
  assert errors[0].startswith("sweep.py: data error: cannot download mnist")
  assert "--data_dir" in errors[0]
  assert not any(".tmp." in p.name for p in (tmp_path / "home").rglob("*"))
