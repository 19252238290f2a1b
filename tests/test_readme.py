"""The README's library example runs as written (so the documentation cannot rot)."""
import re

import jax
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
  # The loop trained the kept weights and left every pruned one at exactly 0, checked here
  # against a fresh initialisation (the README's own check could be edited away).
  masks, params = namespace["masks"], namespace["params"]
  init = namespace["model"].init(jax.random.key(1), namespace["x"])["params"]
  pruned = kept = changed = 0
  for m, p, p0 in zip(*(jax.tree.leaves(namespace["bfprune"].tree_map_masked(
      lambda m, v: None if m is None else v, masks, t)) for t in (masks, params, init))):
    m, p, p0 = map(np.asarray, (m, p, p0))
    assert np.all(p[~m] == 0.0)
    pruned += int(np.sum(~m))
    kept += int(np.sum(m))
    changed += int(np.sum(p[m] != p0[m]))
  assert pruned > 0 and changed > 0.9 * kept


def test_readme_test_command_matches_ci():
  readme = (REPO / "README.md").read_text()
  ci = (REPO / ".ci" / "run").read_text()
  test_cmd = "python -m pytest -q tests"
  assert test_cmd in readme and test_cmd in ci
  assert "BFPRUNE_DATA_DIR=../shared/data" in readme
