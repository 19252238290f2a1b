"""The standard MNIST / CIFAR-10 files through tensorflow-datasets' download machinery.

tfds knows each dataset's URLs and sha256 checksums (``builder_cls(name).url_infos``) and its
``DownloadManager`` downloads, verifies and caches them under ``<tfds data dir>/downloads``
(``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``; new downloads go to ``downloads/<name>/``,
a cache in ``downloads/`` itself is found too). Preparing the dataset would need TensorFlow
(``tf.io.gfile`` while extracting), so only the download is left to tfds; bfprune's own readers
parse the files.

Bounds, since tfds alone spends about 3.5 minutes retrying an unreachable host (10 retries with
exponential backoff, measured 204 s on 2026-11-29 when name resolution fails at once):
* before any download, each host that is not cached gets a TCP connect (or its proxy does), in
  a thread joined after ``PROBE_TIMEOUT_S`` so that a hanging name lookup is bounded too;
* during the download tfds's retry count is lowered to ``DOWNLOAD_RETRIES`` (this module's one
  reach into tfds internals: ``downloader.MAX_RETRIES``, read by tfds at each request).
A stalled transfer is not bounded: tfds passes no timeout to ``requests``.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Iterator

from bfprune.data import ENV_VAR, DataError

PROBE_TIMEOUT_S = 10.0
DOWNLOAD_RETRIES = 3

_WHERE = (f"point --data_dir (data_dir=) or ${ENV_VAR} at a folder of the standard files "
          "(`python -m bfprune.data fetch DIR` writes one on a machine with network)")

# sha256-verified cached downloads, keyed by (path, size, mtime, inode): re-hash only when changed.
_VERIFIED: set[tuple] = set()


def tfds_data_dir() -> Path:
  """tfds's data folder: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (read at each call)."""
  return Path(os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets").expanduser()


def download_dir() -> Path:
  """Where tfds caches downloads: ``<tfds data dir>/downloads``."""
  return tfds_data_dir() / "downloads"


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 400 else text[:400] + " ..."


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # heavy: only imported on this path
    from tensorflow_datasets.core.download import downloader, resource
  except Exception as e:  # ImportError, or a missing dependency of tfds raised at import
    raise DataError(f"no data folder given and tensorflow-datasets cannot be imported "
                    f"({type(e).__name__}: {_one_line(e)}); {_WHERE}") from e
  return tfds, downloader, resource


def url_infos(name: str) -> dict:
  """tfds's registered ``{url: UrlInfo(size, checksum, filename)}`` for dataset ``name``."""
  tfds, _, _ = _import_tfds()
  try:
    infos = tfds.builder_cls(name).url_infos
  except Exception as e:
    raise DataError(f"tensorflow-datasets has no usable checksums for {name!r} "
                    f"({type(e).__name__}: {_one_line(e)}); {_WHERE}") from e
  if not infos:
    raise DataError(f"tensorflow-datasets registers no URLs for {name!r}; {_WHERE}")
  return dict(infos)


def _filename(url: str, info) -> str:
  return info.filename or os.path.basename(urllib.parse.urlparse(url).path)


def _cached_path(resource, dl_dir: Path, name: str, url: str, checksum: str) -> Path | None:
  """The cached download of ``url`` where tfds's DownloadManager would look for it, or None."""
  fname = resource.get_dl_fname(url, checksum)
  for path in (dl_dir / name / fname, dl_dir / fname):
    if resource.is_locally_cached(path):
      return path
  return None


def _probe_target(url: str) -> tuple[str, int]:
  """(host, port) a download of ``url`` connects to first: its proxy if one is set."""
  import requests  # a tfds dependency
  proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
  parts = urllib.parse.urlparse(proxy if proxy else url)
  if proxy and not parts.hostname:  # "host:port" without a scheme
    parts = urllib.parse.urlparse("http://" + proxy)
  default = 443 if parts.scheme == "https" else 80
  return parts.hostname or "", parts.port or default


def _probe(host: str, port: int, timeout: float) -> str | None:
  """None if a TCP connection to host:port opens within ``timeout`` s, else why not."""
  result: list[str | None] = []

  def connect():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      result.append(None)
    except OSError as e:
      result.append(f"{type(e).__name__}: {e.strerror or e}")

  worker = threading.Thread(target=connect, daemon=True)  # name lookup cannot be timed out
  worker.start()
  worker.join(timeout)
  return result[0] if result else f"no answer within {timeout:g} s"


@contextlib.contextmanager
def _bounded_retries(downloader) -> Iterator[None]:
  old = getattr(downloader, "MAX_RETRIES", None)
  if old is None:  # another tfds version: keep its own policy
    yield
    return
  downloader.MAX_RETRIES = min(old, DOWNLOAD_RETRIES)
  try:
    yield
  finally:
    downloader.MAX_RETRIES = old


def _tmp_dirs(dl_dir: Path, name: str) -> set[Path]:
  """tfds's in-progress download folders (``<file>.tmp.<uuid hex>``, beside the file's place)."""
  return {p for d in (dl_dir, dl_dir / name) if d.is_dir() for p in d.glob("*.tmp.*")
          if p.is_dir()}


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _verify_cached(path: Path, info, url: str, resource) -> None:
  """A cached file is found by name only: re-check its sha256; remove it if it is damaged."""
  st = path.stat()
  key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
  if key in _VERIFIED:
    return
  got = _sha256(path)
  if got != info.checksum:
    for p in (path, resource.get_info_path(path)):
      with contextlib.suppress(OSError):
        p.unlink()
    raise DataError(f"{path}: cached download of {url} has sha256 {got}, expected "
                    f"{info.checksum}; removed it, run again to download it anew")
  _VERIFIED.add(key)


def download_urls(name: str, infos: dict, dl_dir: Path | None = None, *,
                  probe_timeout: float | None = None) -> dict[str, Path]:
  """Every url of ``infos`` from tfds's download cache, downloading the missing ones with tfds's
  DownloadManager.

  name: dataset name (the cache subfolder); infos: ``{url: UrlInfo}`` with the sha256 each file
  must have; dl_dir: default ``download_dir()``. A file counts as cached where the manager looks
  for it (``dl_dir/<name>/`` or ``dl_dir/``, named by ``resource.get_dl_fname(url, sha256)``,
  with its ``.INFO`` file). Returns ``{file name: cached path}``, every file's sha256 checked.
  Raises one-line ``DataError`` when a host is unreachable, tfds fails, or a cached file is
  damaged (which is then removed); tfds's partial downloads are removed.
  """
  tfds, downloader, resource = _import_tfds()
  dl_dir = download_dir() if dl_dir is None else Path(dl_dir)
  timeout = PROBE_TIMEOUT_S if probe_timeout is None else probe_timeout
  fnames = {url: _filename(url, info) for url, info in infos.items()}
  paths = {url: _cached_path(resource, dl_dir, name, url, info.checksum)
           for url, info in infos.items()}
  missing = [url for url, path in paths.items() if path is None]
  if missing:  # the manager alone would find the cache too, but draws progress bars
    for target in dict.fromkeys(_probe_target(url) for url in missing):
      why = _probe(*target, timeout)
      if why is not None:
        raise DataError(f"cannot download {name} through tensorflow-datasets: "
                        f"{target[0]}:{target[1]} unreachable ({why}); no network? {_WHERE}")
    before = _tmp_dirs(dl_dir, name)
    try:
      with _bounded_retries(downloader):
        manager = tfds.download.DownloadManager(download_dir=dl_dir, url_infos=infos,
                                                dataset_name=name)
        got = manager.download({fnames[url]: url for url in missing})
    except Exception as e:  # requests, tfds and OS errors alike: one line, no traceback
      # tfds leaves its partial download folder behind; a new one appeared with this attempt
      # (a concurrent download of the same files by another process could be caught too).
      for tmp in _tmp_dirs(dl_dir, name) - before:
        shutil.rmtree(tmp, ignore_errors=True)
      raise DataError(f"downloading {name} through tensorflow-datasets into {dl_dir} failed "
                      f"({type(e).__name__}: {_one_line(e)}); {_WHERE}") from e
    paths.update({url: Path(got[fnames[url]]) for url in missing})
  for url, path in paths.items():
    _verify_cached(path, infos[url], url, resource)
  return {fnames[url]: path for url, path in paths.items()}


def download(name: str) -> dict[str, Path]:
  """``{official file name: cached path}`` of dataset ``name`` ('mnist' | 'cifar10') via tfds."""
  return download_urls(name, url_infos(name))
