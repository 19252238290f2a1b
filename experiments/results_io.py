"""results.jsonl: one JSON row per finished run, written atomically.

Writers take an exclusive lock, so several processes can append to one file; the lock file
(``<path>.lock``) exists only while a writer holds it. Rewritten files keep the mode the file
had, and a new file gets the mode a plain ``open`` would give it (0666 less the umask).
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional


class ResultsError(ValueError):
  """A results file that cannot be read; the message starts with '<path>:<line>:' (or
  '<path>:' when the whole file is unreadable) and says what to do."""


def _parse(path: Path, n: int, line: bytes) -> dict[str, Any]:
  """Line ``n`` (1-based) of ``path`` as a row; ResultsError naming file and line otherwise."""
  try:
    row = json.loads(line.decode("utf-8"))  # decoded here: json would also guess UTF-16/32
  except UnicodeDecodeError:
    raise ResultsError(f"{path}:{n}: not valid UTF-8 text; fix or remove that line") from None
  except json.JSONDecodeError as e:
    raise ResultsError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); fix or "
                       "remove that line") from None
  if not isinstance(row, dict):
    raise ResultsError(f"{path}:{n}: a JSON {type(row).__name__}, not an object (one row per "
                       "line); fix or remove that line")
  return row


def _read_bytes(path: Path) -> Optional[bytes]:
  """The file's bytes, None when absent; ResultsError when it cannot be read."""
  try:
    return path.read_bytes()
  except FileNotFoundError:
    return None
  except IsADirectoryError:
    raise ResultsError(f"{path}: is a folder, not a results file") from None
  except OSError as e:
    raise ResultsError(f"{path}: cannot be read ({e.strerror})") from None


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
  """All rows of a results.jsonl ([] when absent). A malformed line raises ResultsError."""
  return [row for _, row in read_numbered_rows(path)]


def read_numbered_rows(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
  """``read_rows`` with each row's 1-based line number, for messages about one row that name
  its line the way ResultsError does (``row_error``); blank lines are skipped."""
  path = Path(path)
  data = _read_bytes(path)
  if data is None:
    return []
  return [(n, _parse(path, n, line)) for n, line in enumerate(data.splitlines(), 1)
          if line.strip()]


def row_error(path: str | os.PathLike, line: int, problem: str) -> ResultsError:
  """A ResultsError about one row's content: '<path>:<line>: <problem>; fix or remove that
  line'."""
  return ResultsError(f"{path}:{line}: {problem}; fix or remove that line")


def append_row(path: str | os.PathLike, row: dict[str, Any]) -> None:
  """Appends one row atomically: the file is rewritten to a temp file and renamed over.

  A crash at any moment leaves either the old file or the new one, never a half row; an
  exclusive lock (``_locked``) lets several processes append to one results file.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with _locked(path):
    old = _read_bytes(path) or b""
    if old and not old.endswith(b"\n"):
      old += b"\n"
    _write_atomic(path, old + (json.dumps(row, sort_keys=True) + "\n").encode())


def update_rows(path: str | os.PathLike,
                update: Callable[[dict[str, Any]], Optional[dict[str, Any]]]) -> int:
  """Replaces rows in place, atomically and under the same lock as ``append_row``.

  ``update(row)`` returns the new row, or None to keep the row (its line stays byte for byte).
  The file is read inside the lock, so rows appended concurrently are never lost; the result is
  written to a temp file in the same folder, fsynced and renamed over (no write when nothing
  changed). Returns the number of rows replaced.
  """
  path = Path(path)
  if not path.exists():
    return 0
  with _locked(path):
    data = _read_bytes(path)
    if data is None:
      return 0
    lines = data.splitlines(keepends=True)
    changed = 0
    for i, line in enumerate(lines):
      if not line.strip():
        continue
      new = update(_parse(path, i + 1, line))
      if new is not None:
        lines[i] = (json.dumps(new, sort_keys=True) + "\n").encode()
        changed += 1
    if changed:
      data = b"".join(l if l.endswith(b"\n") else l + b"\n" for l in lines)
      _write_atomic(path, data)
    return changed


class _locked:
  """Exclusive ``flock`` on ``<path>.lock`` for a ``with`` block; the file is removed on exit.

  Removing it is what makes a waiter's lock stale: a process that opened the file before the
  holder removed it gets the lock on an unlinked file, so after locking it checks that its file
  is still the one at ``<path>.lock`` and otherwise starts over. A holder killed mid-block
  leaves the file behind; the kernel has dropped its lock, and the next writer removes it.
  """

  def __init__(self, path: Path):
    self._name = path.with_name(path.name + ".lock")
    self._fd: Optional[int] = None

  def __enter__(self):
    while True:
      fd = os.open(self._name, os.O_RDWR | os.O_CREAT, 0o666)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        mine = os.fstat(fd)
        try:
          there = os.stat(self._name)
        except FileNotFoundError:
          there = None
      except BaseException:
        os.close(fd)
        raise
      if there is not None and (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
        self._fd = fd
        return self
      os.close(fd)  # removed by the previous holder: lock the file now at the path

  def __exit__(self, *exc):
    try:
      os.unlink(self._name)  # while still locked, so no one can hold a lock on this path now
    finally:
      os.close(self._fd)  # releases the lock
      self._fd = None


def _umask() -> int:
  """The process umask, read without changing it where Linux allows (/proc), else by the
  set-and-restore idiom."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _write_atomic(path: Path, data: bytes) -> None:
  """Writes ``data`` to a temp file beside ``path``, fsyncs it and renames it over ``path``.

  mkstemp creates the temp file 0600; it gets the mode ``path`` has, or for a new file the
  mode a plain ``open`` would give (0666 less the umask), so results stay readable by others
  as the user's other files are.
  """
  try:
    mode = os.stat(path).st_mode & 0o777
  except FileNotFoundError:
    mode = 0o666 & ~_umask()
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      os.fchmod(f.fileno(), mode)
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def finished_keys(rows: Iterable[dict[str, Any]]) -> set[str]:
  return {r["run_key"] for r in rows if "run_key" in r}
