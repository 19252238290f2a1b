"""Run claims: at most one worker runs a configuration, however many sweeps share an out_dir.

Before a run starts, its worker claims it: a JSON file ``<claims_dir>/<run key>`` naming the
owner (host, pid, the pid's start time, a random token). Every read-decide-write on a claim
happens under an exclusive ``flock`` of ``<claims_dir>/<run key>.lock`` (the results file's lock,
``results_io``), and the file itself is only ever written whole (temp file + rename), so a
reader never sees half a claim and two workers never both decide that a claim is theirs.

A claim is taken over only when its owner is gone:

* owner on this host: its pid is not running (or runs a newer process: the pid's start time,
  read from ``/proc``, differs from the one recorded), or the host has rebooted since;
* owner on another host: its heartbeat, the claim file's mtime, which the owner refreshes
  every ``heartbeat_seconds`` from a background thread, is older than ``stale_after`` seconds
  (mtimes come from the shared file system, so clocks need to agree to well within that).

A worker that loses its claim (declared stale while it still ran, e.g. a host cut off from the
file system for longer than ``stale_after``) finds out in ``Claim.finishing`` and must not
write its result: the new owner writes it, so a results row still appears once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

from experiments.results_io import _locked as _file_lock  # flock on <path>.lock, removed after
from experiments.results_io import _write_atomic


def _read_text(path: str) -> Optional[str]:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return None


def pid_start_time(pid: int) -> Optional[int]:
  """When ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field 22); None when
  there is no such process or no ``/proc``."""
  text = _read_text(f"/proc/{pid}/stat")
  if text is None:
    return None
  try:  # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    return int(text.rsplit(")", 1)[1].split()[19])
  except (IndexError, ValueError):
    return None


def boot_id() -> Optional[str]:
  """This boot of this machine (Linux), to tell a pid recorded before a reboot."""
  text = _read_text("/proc/sys/kernel/random/boot_id")
  return text.strip() if text else None


def pid_running(pid: int) -> bool:
  """Whether a process ``pid`` exists on this host (signal 0 checks without signalling)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a claim, as recorded in its file, and how fresh its heartbeat is."""
  host: str
  pid: int
  pid_start: Optional[int]
  boot_id: Optional[str]
  started: float  # time.time() when claimed
  token: str
  note: str
  heartbeat_age: float  # seconds since the file's mtime

  def describe(self) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
    return (f"{self.host} pid {self.pid} since {started} (heartbeat {self.heartbeat_age:.0f} s "
            "ago)")


def read_claim(path: str | os.PathLike) -> Optional[Holder]:
  """The claim at ``path``; None when there is none. A file that is not a claim (written by
  something else) reads as an unknown holder on an unknown host, so only its age counts."""
  path = Path(path)
  try:
    text = path.read_text()
    age = time.time() - path.stat().st_mtime
  except FileNotFoundError:
    return None
  try:
    rec = json.loads(text)
    return Holder(host=str(rec["host"]), pid=int(rec["pid"]), pid_start=rec.get("pid_start"),
                  boot_id=rec.get("boot_id"), started=float(rec["started"]),
                  token=str(rec["token"]), note=str(rec.get("note", "")), heartbeat_age=age)
  except (ValueError, KeyError, TypeError):
    return Holder(host="?", pid=-1, pid_start=None, boot_id=None, started=0.0, token="?",
                  note=f"unreadable claim file {path}", heartbeat_age=age)


def holder_alive(holder: Holder, stale_after: float) -> bool:
  """Whether ``holder`` may still be running its claim (see the module docstring)."""
  if holder.host == socket.gethostname():
    if holder.boot_id is not None and boot_id() is not None and holder.boot_id != boot_id():
      return False  # recorded before this machine rebooted
    if not pid_running(holder.pid):
      return False
    start = pid_start_time(holder.pid)
    return holder.pid_start is None or start is None or start == holder.pid_start
  return holder.heartbeat_age < stale_after


class Claim:
  """A claim this process holds on one run key (from ``try_claim``)."""

  def __init__(self, path: Path, token: str, heartbeat_seconds: float):
    self.path = path
    self.token = token
    self._interval = heartbeat_seconds
    self._stop: Optional[threading.Event] = None
    self._thread: Optional[threading.Thread] = None

  def holds(self) -> bool:
    """Whether the claim file is still this one's (not taken over, not removed)."""
    holder = read_claim(self.path)
    return holder is not None and holder.token == self.token

  def _beat(self, stop: threading.Event) -> None:
    while not stop.wait(self._interval):
      try:
        os.utime(self.path)
      except OSError:  # removed (released) or the file system hiccuped: try again next time
        pass

  @contextlib.contextmanager
  def heartbeat(self) -> Iterator["Claim"]:
    """Refreshes the claim's mtime every ``heartbeat_seconds`` while the block runs."""
    stop = threading.Event()
    thread = threading.Thread(target=self._beat, args=(stop,), daemon=True,
                              name=f"claim-heartbeat-{self.path.name}")
    thread.start()
    try:
      yield self
    finally:
      stop.set()
      thread.join()

  @contextlib.contextmanager
  def finishing(self) -> Iterator[bool]:
    """Under the claim's lock, yields whether this process still holds it; on leaving the
    block a held claim is removed. Write the run's result inside the block, only when it
    yields True: no other worker can take the claim over meanwhile."""
    with _file_lock(self.path):
      held = self.holds()
      try:
        yield held
      finally:
        if held:
          self.path.unlink()

  def release(self) -> bool:
    """Removes the claim if this process still holds it; returns whether it did."""
    with self.finishing() as held:
      return held


def _record(note: str) -> dict:
  pid = os.getpid()
  return {"host": socket.gethostname(), "pid": pid, "pid_start": pid_start_time(pid),
          "boot_id": boot_id(), "started": time.time(), "token": uuid.uuid4().hex,
          "note": note}


def try_claim(claims_dir: str | os.PathLike, key: str, stale_after: float = 600.0,
              heartbeat_seconds: float = 60.0, note: str = "") -> Claim | Holder:
  """Claims run ``key``: returns a ``Claim`` when this process now holds it, else the live
  ``Holder`` of the existing claim. An existing claim whose holder is gone
  (``holder_alive`` is False) is taken over. ``note`` is stored for people reading the file.
  """
  claims_dir = Path(claims_dir)
  claims_dir.mkdir(parents=True, exist_ok=True)
  path = claims_dir / key
  rec = _record(note)
  with _file_lock(path):
    holder = read_claim(path)
    if holder is not None and holder_alive(holder, stale_after):
      return holder
    _write_atomic(path, (json.dumps(rec, sort_keys=True) + "\n").encode())
  return Claim(path, rec["token"], heartbeat_seconds)


def live_holders(claims_dir: str | os.PathLike, keys, stale_after: float = 600.0
                 ) -> dict[str, Holder]:
  """The live holders of the claims on ``keys`` (read without locking: for display)."""
  out = {}
  for key in keys:
    holder = read_claim(Path(claims_dir) / key)
    if holder is not None and holder_alive(holder, stale_after):
      out[key] = holder
  return out

