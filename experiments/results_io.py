"""results.jsonl: one JSON row per finished run, written atomically."""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
  """All rows of a results.jsonl ([] when absent). A malformed line is a clear error."""
  path = Path(path)
  if not path.exists():
    return []
  rows = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n} is not valid JSON ({e.msg}); fix or remove that line") from None
  return rows


def append_row(path: str | os.PathLike, row: dict[str, Any]) -> None:
  """Appends one row atomically: the file is rewritten to a temp file and renamed over.

  A crash at any moment leaves either the old file or the new one, never a half row; an
  exclusive lock on ``<path>.lock`` lets several sweep processes share one results file.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with _locked(path):
    old = path.read_bytes() if path.exists() else b""
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
  with _locked(path):
    if not path.exists():
      return 0
    lines = path.read_bytes().splitlines(keepends=True)
    changed = 0
    for i, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i + 1} is not valid JSON ({e.msg}); fix or remove that "
                         "line") from None
      new = update(row)
      if new is not None:
        lines[i] = (json.dumps(new, sort_keys=True) + "\n").encode()
        changed += 1
    if changed:
      data = b"".join(l if l.endswith(b"\n") else l + b"\n" for l in lines)
      _write_atomic(path, data)
    return changed


class _locked:
  """Exclusive ``flock`` on ``<path>.lock`` for the duration of a ``with`` block."""

  def __init__(self, path: Path):
    self._name = path.with_name(path.name + ".lock")

  def __enter__(self):
    self._file = open(self._name, "w")
    fcntl.flock(self._file, fcntl.LOCK_EX)
    return self

  def __exit__(self, *exc):
    self._file.close()  # releases the lock


def _write_atomic(path: Path, data: bytes) -> None:
  """Writes ``data`` to a temp file beside ``path``, fsyncs it and renames it over ``path``."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
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
