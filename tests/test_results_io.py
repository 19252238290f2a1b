"""experiments/results_io.py: malformed lines named by file and line (also by every script that
reads results), file modes as a plain open would give, the lock shared by processes and gone
after use."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from experiments import results_io  # noqa: E402


def _lock(path):
  return path.with_name(path.name + ".lock")


@pytest.mark.parametrize("bad, problem", [
    (b'{"run_key": "b", "top1": ', "not valid JSON (Expecting value at column 26)"),
    (b"garbage", "not valid JSON (Expecting value at column 1)"),
    (b"[1, 2]", "a JSON list, not an object (one row per line)"),
    (b"\xff\xfe{}", "not valid UTF-8 text"),
])
def test_a_malformed_line_is_named_by_file_and_line(bad, problem, tmp_path):
  path = tmp_path / "results.jsonl"
  path.write_bytes(b'{"run_key": "a"}\n\n' + bad + b'\n{"run_key": "c"}\n')
  with pytest.raises(results_io.ResultsError) as e:
    results_io.read_rows(path)
  assert str(e.value) == f"{path}:3: {problem}; fix or remove that line"
  assert isinstance(e.value, ValueError)  # scripts catching ValueError still catch it
  with pytest.raises(results_io.ResultsError, match=f"^{path}:3: "):
    results_io.update_rows(path, lambda row: None)
  assert not _lock(path).exists()  # released and removed on the error path too


def test_read_rows_skips_blank_lines_and_a_missing_file(tmp_path):
  path = tmp_path / "results.jsonl"
  assert results_io.read_rows(path) == []
  path.write_text('{"a": 1}\n\n  \n{"a": 2}')  # no newline at the end
  assert results_io.read_rows(path) == [{"a": 1}, {"a": 2}]
  with pytest.raises(results_io.ResultsError, match="is a folder"):
    results_io.read_rows(tmp_path)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_a_new_results_file_gets_the_mode_of_a_plain_open(umask, mode, tmp_path):
  old = os.umask(umask)
  try:
    plain = tmp_path / "plain"
    plain.write_text("x")  # what the user's umask gives any new file
    path = tmp_path / "results.jsonl"
    results_io.append_row(path, {"run_key": "a"})
    results_io.append_row(path, {"run_key": "b"})
  finally:
    os.umask(old)
  assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == mode
  assert not _lock(path).exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "results.jsonl"]  # no temp


def test_a_rewrite_keeps_the_files_mode(tmp_path):
  path = tmp_path / "results.jsonl"
  path.write_text('{"run_key": "a", "x": 1}\n')
  path.chmod(0o604)
  results_io.append_row(path, {"run_key": "b", "x": 2})
  assert path.stat().st_mode & 0o777 == 0o604
  assert results_io.update_rows(path, lambda r: dict(r, x=3) if r["x"] == 1 else None) == 1
  assert path.stat().st_mode & 0o777 == 0o604
  assert results_io.read_rows(path) == [{"run_key": "a", "x": 3}, {"run_key": "b", "x": 2}]
  assert not _lock(path).exists()


def test_a_lock_file_left_by_a_killed_writer_is_reused_and_removed(tmp_path):
  path = tmp_path / "results.jsonl"
  _lock(path).write_text("")  # the holder died: the kernel dropped its flock, the file stayed
  results_io.append_row(path, {"run_key": "a"})
  assert not _lock(path).exists()
  assert results_io.read_rows(path) == [{"run_key": "a"}]


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from experiments import results_io
    for i in range(int(sys.argv[4])):
      results_io.append_row(sys.argv[2], {"writer": int(sys.argv[3]), "i": i})
""")


def test_concurrent_writers_in_separate_processes_lose_no_row(tmp_path):
  """Every append reads the file and renames a new one over it: without mutual exclusion,
  two writers interleaving lose one of the rows (checked: this fails with the lock disabled)."""
  path = tmp_path / "results.jsonl"
  writers, rows = 4, 40
  procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(REPO), str(path), str(w),
                             str(rows)]) for w in range(writers)]
  assert [p.wait(timeout=120) for p in procs] == [0] * writers
  got = [(r["writer"], r["i"]) for r in results_io.read_rows(path)]
  assert sorted(got) == [(w, i) for w in range(writers) for i in range(rows)]
  for w in range(writers):  # each writer's rows in its own order
    assert [i for v, i in got if v == w] == list(range(rows))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]  # no lock, no temp


@pytest.mark.parametrize("script, args", [
    ("sweep.py", ["--out_dir={d}"]),
    ("sweep.py", ["--out_dir={d}", "--dry_run"]),
    ("collapse.py", ["--out_dir={d}"]),
    ("collapse.py", ["--out_dir={d}", "--dry_run"]),
    ("report.py", ["--results={d}", "--out={d}/report"]),
])
def test_every_script_reading_results_reports_a_corrupt_line_in_one_line(script, args,
                                                                         tmp_path):
  path = tmp_path / "results.jsonl"
  path.write_text(json.dumps({"run_key": "a"}) + "\nnot json\n")
  proc = subprocess.run([sys.executable, str(REPO / "experiments" / script)]
                        + [a.format(d=tmp_path) for a in args],
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0
  (line,) = proc.stderr.strip().splitlines()
  assert line == (f"{script}: error: {path}:2: not valid JSON (Expecting value at column 1); "
                  "fix or remove that line")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]  # nothing written
