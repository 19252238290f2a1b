"""experiments/colab.ipynb: executed headless (nbclient) on a tiny grid with the local data, so
the notebook cannot rot; plus its install cell's decisions, checked in-process."""
import json
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import REPO, data_dir

NOTEBOOK = REPO / "experiments" / "colab.ipynb"
KERNEL = "bfprune-test-python"


def _notebook():
  return nbformat.read(NOTEBOOK, as_version=4)


def _cell(nb, tag=None, contains=None):
  """The one code cell with this tag / containing this text."""
  found = [c for c in nb.cells if c.cell_type == "code"
           and (tag is None or tag in c.metadata.get("tags", []))
           and (contains is None or contains in c.source)]
  assert len(found) == 1, f"expected one code cell (tag={tag}, contains={contains!r})"
  return found[0]


def _outputs_text(cell) -> str:
  parts = []
  for o in cell.get("outputs", []):
    parts.append(o.get("text", ""))
    parts.append(o.get("data", {}).get("text/plain", ""))
    parts.append(o.get("data", {}).get("text/markdown", ""))
  return "".join(parts)


def test_notebook_is_committed_without_outputs():
  nb = _notebook()
  nbformat.validate(nb)
  for c in nb.cells:
    if c.cell_type == "code":
      assert c.outputs == [] and c.execution_count is None, c.source[:80]
  _cell(nb, tag="parameters")


def _run_install_cell(cwd: Path, monkeypatch, repo_url: str = ""):
  """Executes the install cell's source in-process from ``cwd``; returns (namespace, the
  subprocess.run commands it issued, which are recorded instead of run)."""
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(list(cmd)))
  monkeypatch.chdir(cwd)
  src = _cell(_notebook(), contains="BFPRUNE_REPO =").source
  src = src.replace('BFPRUNE_REPO = ""', f"BFPRUNE_REPO = {repo_url!r}", 1)
  ns = {"__name__": "__notebook__"}
  exec(compile(src, "install-cell", "exec"), ns)
  return ns, calls


def test_install_cell_uses_the_checkout_and_skips_pip_when_importable(monkeypatch):
  ns, calls = _run_install_cell(REPO / "experiments", monkeypatch)
  assert ns["REPO"] == REPO.resolve()
  assert calls == []  # bfprune is installed in this environment: no pip, no clone


def test_install_cell_outside_a_checkout(monkeypatch, tmp_path):
  with pytest.raises(ValueError, match="set BFPRUNE_REPO"):
    _run_install_cell(tmp_path, monkeypatch)
  # With the URL set it clones into ./bfprune (pip is skipped: bfprune is importable here).
  url = "https://example.invalid/bfprune.git"
  ns, calls = _run_install_cell(tmp_path, monkeypatch, repo_url=url)
  assert calls == [["git", "clone", "--depth=1", url, str(tmp_path.resolve() / "bfprune")]]
  assert ns["REPO"] == tmp_path.resolve() / "bfprune"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
  """A kernelspec that runs this interpreter (whatever 'python3' means elsewhere)."""
  import ipykernel  # noqa: F401  (a dev dependency: fail clearly here if it is missing)
  spec = tmp_path / "jupyter" / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "bfprune test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # A persistent compilation cache the notebook's sweep fills and the test's own sweep reuses.
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  return KERNEL


def test_notebook_runs_a_tiny_grid_and_shows_figures(tmp_path, kernel_name):
  from nbclient import NotebookClient

  nb = _notebook()
  out = tmp_path / "out"
  params = _cell(nb, tag="parameters")
  # Papermill-style: keep the defaults, override after them (a new parameter still gets one).
  params.source += "\n\n# injected by tests/test_notebook.py\n" + "\n".join([
      'DATASET = "mnist"', 'PRUNERS = "rand"', 'COMPRESSIONS = "1"', 'FACTORIZE = "none"',
      "POST_EPOCHS = 1", "TRAIN_EXAMPLES = 2048", "SEEDS = 1",
      f"DATA_DIR = {str(data_dir())!r}", f"OUT_DIR = {str(out)!r}"])
  NotebookClient(nb, kernel_name=kernel_name, timeout=300,
                 resources={"metadata": {"path": str(REPO / "experiments")}}).execute()

  install = _cell(nb, contains="BFPRUNE_REPO =")
  assert "skipping install" in _outputs_text(install)
  assert "pip" not in _outputs_text(install)

  rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
  assert len(rows) == 1
  (row,) = rows
  assert (row["dataset"], row["model"], row["factorize"], row["pruner"]) == \
      ("mnist", "fc", "none", "rand")
  assert row["compression"] == 1 and row["post_epochs"] == 1 and row["seed"] == 0
  assert abs(row["density"] - 0.1) < 1e-3

  # The command the notebook ran, as it printed it, carries the injected parameters; run on
  # its own into another folder it gives the same row. Same flags, same seed, same machine
  # and the same compiled programs: bit-identical numbers (as a resumed sweep run is).
  (cmd,) = [l[2:] for l in _outputs_text(_cell(nb, contains="--post_epochs=")).splitlines()
            if l.startswith("$ ")]
  argv = shlex.split(cmd)
  assert argv[1].endswith("experiments/sweep.py")
  for flag in ("--dataset=mnist", "--pruner=rand", "--compression=1", "--factorize=none",
               "--post_epochs=1", "--train_examples=2048", "--seeds=1",
               f"--out_dir={out}", f"--data_dir={data_dir()}"):
    assert flag in argv, (flag, argv)
  direct = tmp_path / "direct"
  argv = [sys.executable] + [a for a in argv[1:] if not a.startswith("--out_dir=")]
  subprocess.run(argv + [f"--out_dir={direct}"], check=True, capture_output=True, timeout=600)
  (want,) = [json.loads(l) for l in (direct / "results.jsonl").read_text().splitlines()]
  untimed = lambda d: {k: v for k, v in d.items()
                       if "seconds" not in k and k not in ("examples_per_s", "history")}
  assert untimed(row) == untimed(want)  # config, key, accuracy, loss, densities, layers, ...
  assert row["top1"] == want["top1"] and row["run_key"] == want["run_key"]
  assert [untimed(h) for h in row["history"]] == [untimed(h) for h in want["history"]]

  pngs = sorted((out / "report").glob("fig*.png"))
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert len(pngs) >= 1 and len(images) == len(pngs)
  # The report's Table 1 at c = 1 is displayed, holding this run's accuracy.
  report = _cell(nb, contains="report.py")
  shown = _outputs_text(report)
  assert "Table 1" in shown and f"{row['top1']:.2f}" in shown, shown[:2000]
