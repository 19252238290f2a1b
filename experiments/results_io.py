"""results.jsonl: one JSON row per finished run, written atomically."""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable


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
  with open(path.with_name(path.name + ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    _rewrite_with_row(path, row)


def _rewrite_with_row(path: Path, row: dict[str, Any]) -> None:
  old = path.read_bytes() if path.exists() else b""
  if old and not old.endswith(b"\n"):
    old += b"\n"
  data = old + (json.dumps(row, sort_keys=True) + "\n").encode()
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
