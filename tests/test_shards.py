"""Sweeps over many workers: run claims (experiments/claims.py), --shard=I/N, and concurrent
workers sharing one out_dir writing each configuration's row exactly once."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, data_dir

sys.path.insert(0, str(REPO))
from experiments import claims  # noqa: E402

SWEEP = [sys.executable, str(REPO / "experiments" / "sweep.py")]


def _write_claim(path: Path, **fields):
  rec = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None, "boot_id": None,
         "started": time.time(), "token": "old", "note": "test"}
  rec.update(fields)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(rec))


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_a_free_key_is_claimed_and_released(tmp_path):
  claim = claims.try_claim(tmp_path, "k1", note="first")
  assert isinstance(claim, claims.Claim) and claim.holds()
  rec = json.loads((tmp_path / "k1").read_text())
  assert (rec["host"], rec["pid"], rec["note"]) == (socket.gethostname(), os.getpid(), "first")
  assert rec["pid_start"] == claims.pid_start_time(os.getpid()) is not None
  assert claim.release() and not (tmp_path / "k1").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock or temp file left


def test_a_live_owner_on_this_host_is_respected(tmp_path):
  first = claims.try_claim(tmp_path, "k")
  second = claims.try_claim(tmp_path, "k")  # same pid: alive
  assert isinstance(second, claims.Holder) and second.pid == os.getpid()
  assert first.holds()
  # Also with a heartbeat far older than the timeout: on this host only the pid counts.
  os.utime(tmp_path / "k", (time.time() - 10_000,) * 2)
  assert isinstance(claims.try_claim(tmp_path, "k", stale_after=60), claims.Holder)


def test_a_dead_owner_on_this_host_is_taken_over_at_once(tmp_path):
  _write_claim(tmp_path / "k", pid=_dead_pid())
  claim = claims.try_claim(tmp_path, "k", stale_after=10_000)
  assert isinstance(claim, claims.Claim) and claim.holds()
  assert json.loads((tmp_path / "k").read_text())["pid"] == os.getpid()


def test_a_reused_pid_or_a_reboot_is_not_the_owner(tmp_path):
  # The pid runs (it is ours) but started at another time: a new process reusing the pid.
  _write_claim(tmp_path / "a", pid_start=claims.pid_start_time(os.getpid()) + 1)
  assert isinstance(claims.try_claim(tmp_path, "a"), claims.Claim)
  # Recorded during another boot of this host.
  _write_claim(tmp_path / "b", boot_id="not-this-boot")
  assert isinstance(claims.try_claim(tmp_path, "b"), claims.Claim)
  # The same pid and start time is the owner.
  _write_claim(tmp_path / "c", pid_start=claims.pid_start_time(os.getpid()))
  assert isinstance(claims.try_claim(tmp_path, "c"), claims.Holder)


def test_another_hosts_claim_is_taken_over_only_after_its_heartbeat_stops(tmp_path):
  _write_claim(tmp_path / "k", host="some-other-host", pid=1)
  held = claims.try_claim(tmp_path, "k", stale_after=60)
  assert isinstance(held, claims.Holder) and held.host == "some-other-host"
  assert held.heartbeat_age < 60
  os.utime(tmp_path / "k", (time.time() - 61,) * 2)
  claim = claims.try_claim(tmp_path, "k", stale_after=60)
  assert isinstance(claim, claims.Claim) and claim.holds()
  # A file that is not a claim at all counts by its age only.
  (tmp_path / "junk").write_text("not json")
  assert isinstance(claims.try_claim(tmp_path, "junk", stale_after=60), claims.Holder)
  os.utime(tmp_path / "junk", (time.time() - 61,) * 2)
  assert isinstance(claims.try_claim(tmp_path, "junk", stale_after=60), claims.Claim)


def test_the_heartbeat_keeps_the_claim_fresh(tmp_path):
  claim = claims.try_claim(tmp_path, "k", heartbeat_seconds=0.05)
  os.utime(tmp_path / "k", (time.time() - 1000,) * 2)
  with claim.heartbeat():
    deadline = time.time() + 10
    while time.time() - (tmp_path / "k").stat().st_mtime > 100 and time.time() < deadline:
      time.sleep(0.02)
  assert time.time() - (tmp_path / "k").stat().st_mtime < 100


def test_an_owner_that_lost_its_claim_neither_writes_nor_removes_the_new_one(tmp_path):
  old = claims.try_claim(tmp_path, "k")
  # Another worker took it over (e.g. this one looked dead from another host).
  _write_claim(tmp_path / "k", host="some-other-host", pid=1, token="new")
  with old.finishing() as held:
    assert not held
  assert not old.release()
  assert json.loads((tmp_path / "k").read_text())["token"] == "new"


_CLAIMER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from experiments import claims
    start = float(sys.argv[3])
    while time.time() < start:
      time.sleep(0.001)
    got = claims.try_claim(sys.argv[2], "race")
    print("won" if isinstance(got, claims.Claim) else "lost", flush=True)
    time.sleep(1.0)  # hold it (alive) while the others try
""")


def test_many_threads_and_processes_racing_for_one_key_exactly_one_wins(tmp_path):
  """Also over a claim left by a dead worker: every racer sees it stale, one takes it over."""
  for stale in (False, True):
    d = tmp_path / f"stale_{stale}"
    if stale:
      _write_claim(d / "race", pid=_dead_pid())
    start = time.time() + 1.5  # the processes' imports are done by then
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, str(REPO), str(d), str(start)],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    results, barrier = [], threading.Barrier(12)

    def claim():
      barrier.wait()
      results.append(claims.try_claim(d, "race"))
    threads = [threading.Thread(target=claim) for _ in range(12)]
    while time.time() < start:
      time.sleep(0.001)
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    wins = sum(isinstance(r, claims.Claim) for r in results) + outs.count("won")
    assert wins == 1, (stale, outs, results)
    assert outs.count("lost") + sum(isinstance(r, claims.Holder) for r in results) == 15
    assert sorted(p.name for p in d.iterdir()) == ["race"]  # no lock or temp file left


# ------------------------------------------------------------------ sweep.py --shard


def _env():
  return dict(os.environ, BFPRUNE_DATA_DIR=str(data_dir()), JAX_PLATFORMS="cpu")


def _dry_keys(args, out):
  proc = subprocess.run(SWEEP + args + [f"--out_dir={out}", "--dry_run"], env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  head, *lines = proc.stdout.strip().splitlines()
  return head, [line.split()[0] for line in lines], lines


@pytest.mark.parametrize("args, message", [
    (["--shard=1"], "--shard='1' is not I/N"),
    (["--shard=a/b"], "--shard='a/b' is not I/N"),
    (["--shard=1/2/3"], "--shard='1/2/3' is not I/N"),
    (["--shard=0/0"], "--shard=0/0: N must be >= 1"),
    (["--shard=3/3"], "--shard=3/3: I must be in [0, 2]"),
    (["--shard=-1/3"], "--shard=-1/3: I must be in [0, 2]"),
    (["--claim_timeout=0"], "--claim_timeout=0 must be > 0 seconds"),
])
def test_bad_shard_flags_are_one_line(args, message, tmp_path):
  proc = subprocess.run(SWEEP + args + [f"--out_dir={tmp_path / 'out'}"], env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith("sweep.py: error: ") and message in line, proc.stderr[-2000:]
  assert not (tmp_path / "out").exists()


def test_shards_split_the_runs_disjointly_and_evenly_and_dry_run_shows_claims(tmp_path):
  args = ["--pruner=rand,mag,snip", "--compression=0.5,1,2", "--seeds=2"]  # 18 runs
  _, every, _ = _dry_keys(args, tmp_path)
  parts = [_dry_keys(args + [f"--shard={i}/4"], tmp_path) for i in range(4)]
  keys = [p[1] for p in parts]
  assert sorted(k for part in keys for k in part) == sorted(every) and len(set(every)) == 18
  assert sorted(len(k) for k in keys) == [4, 4, 5, 5]
  for (head, part, _), i in zip(parts, range(4)):
    assert head.startswith(f"sweep: shard {i}/4 of 18 runs: {len(part)} runs (0 finished")
    assert part == [k for k in every if k in part]  # in the requested order
  # Round robin over the sorted keys (a deterministic function of the requested runs).
  assert keys[1] == [k for k in every if k in sorted(every)[1::4]]
  # A run claimed by a live worker shows as running, with its holder.
  claim = claims.try_claim(tmp_path / "claims", keys[2][0], note="test")
  head, _, lines = _dry_keys(args + ["--shard=2/4"], tmp_path)
  assert "1 of them running in other workers" in head
  assert lines[0].split()[1] == "running" and f"pid {os.getpid()}" in lines[0]
  claim.release()


def test_three_shards_and_two_identical_sweeps_at_once_write_each_row_once(tmp_path):
  """Five workers start together on one out_dir: --shard=0/3, 1/3, 2/3 and twice the same
  unsharded sweep; all five want runs that others want too."""
  out = tmp_path / "out"
  args = ["--pruner=rand,snip,grasp", "--post_epochs=0", "--train_examples=512",
          f"--out_dir={out}"]
  _, keys, _ = _dry_keys(args, out)
  workers = [[f"--shard={i}/3"] for i in range(3)] + [[], []]
  procs = [subprocess.Popen(SWEEP + args + w, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for w in workers]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (stdout, stderr) in zip(procs, outs):
    assert p.returncode == 0, stderr[-3000:]
  rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
  assert sorted(r["run_key"] for r in rows) == sorted(keys) and len(keys) == 3
  assert sorted(r["pruner"] for r in rows) == ["grasp", "rand", "snip"]
  # Every worker's summary adds up: the runs it wrote plus those it found done or running.
  new = [int(stdout.strip().splitlines()[-1].split("(")[1].split(" new")[0])
         for stdout, _ in outs]
  assert sum(new) == 3, [o[0] for o in outs]
  assert sorted(p.name for p in out.iterdir()) == ["results.jsonl"]  # no claims, no checkpoints
