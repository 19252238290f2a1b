"""The README's library example runs as written (so the documentation cannot rot)."""
import re

import numpy as np

from conftest import REPO


def test_readme_library_example_runs(capsys):
  text = (REPO / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "README has no python example"
  namespace: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
  info = namespace["info"]
  assert abs(info["density"] - 0.1) < 1e-3
  assert 0 < info["flop_density"] < 1
  assert info["collapsed"] in (False, np.False_)
  assert capsys.readouterr().out.strip()


def test_readme_test_command_matches_ci():
  readme = (REPO / "README.md").read_text()
  ci = (REPO / ".ci" / "run").read_text()
  test_cmd = "python -m pytest -q tests"
  assert test_cmd in readme and test_cmd in ci
  assert "BFPRUNE_DATA_DIR=../shared/data" in readme
