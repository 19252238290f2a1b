"""The reproduction commands of BUILD.md and experiments/results/*/RESULTS.md that write the
committed results folders: a --dry_run of each finds every one of its runs / searches there, and
every committed results folder is written by some documented command."""
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

RESULTS = REPO / "experiments" / "results"
DOCS = ["BUILD.md"] + sorted(str(p.relative_to(REPO)) for p in RESULTS.rglob("RESULTS.md"))
SCRIPTS = ("experiments/sweep.py", "experiments/collapse.py")


def _commands(doc: str) -> list[list[str]]:
  """The sweep / collapse commands of ``doc``'s bash blocks that write under
  experiments/results, as argument lists (continuations joined, $VARIABLES expanded)."""
  out = []
  for block in re.findall(r"```bash\n(.*?)```", (REPO / doc).read_text(), re.S):
    variables = {}
    for line in block.replace("\\\n", " ").splitlines():
      m = re.fullmatch(r'\s*(\w+)="(.*)"\s*', line)
      if m:
        variables[m[1]] = m[2]
        continue
      for name, value in variables.items():
        line = line.replace(f"${name}", value)
      args = shlex.split(line, comments=True)
      if (args[:1] == ["python"] and len(args) > 1 and args[1] in SCRIPTS
          and any(a.startswith("--out_dir=experiments/results/") for a in args)):
        out.append(args)
  return out


COMMANDS = [(doc, args) for doc in DOCS for args in _commands(doc)]


def test_the_documents_have_commands_for_every_committed_results_folder():
  written = {a.split("=", 1)[1].rstrip("/") for _, args in COMMANDS for a in args
             if a.startswith("--out_dir=")}
  committed = {str(p.parent.relative_to(REPO)) for p in RESULTS.rglob("results.jsonl")}
  assert committed and committed <= written, sorted(committed - written)
  assert len(_commands("BUILD.md")) >= len(committed)


@pytest.mark.parametrize("doc, args", COMMANDS,
                         ids=[f"{doc}:{' '.join(args[1:])}" for doc, args in COMMANDS])
def test_a_documented_command_finds_all_its_runs_finished(doc, args):
  proc = subprocess.run([sys.executable] + args[1:] + ["--dry_run"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  head = proc.stdout.splitlines()[0]
  assert re.search(r"\b\d+ finished in \S+, 0 to do[);]", head), (doc, head)
