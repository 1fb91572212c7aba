"""examples/colab_tpu.ipynb executes top to bottom on the CPU with its tiny setting, in this environment's kernel."""

import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs the test extra")
NotebookClient = pytest.importorskip("nbclient", reason="the notebook test needs the test extra").NotebookClient
pytestmark = pytest.mark.slow

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
NOTEBOOK = EXAMPLES / "colab_tpu.ipynb"


def _text(cell) -> str:
  parts = []
  for output in cell.get("outputs", []):
    parts.append(output.get("text", ""))
    parts.append(output.get("data", {}).get("text/plain", ""))
  return "".join(parts)


def test_colab_notebook_runs_on_cpu(monkeypatch):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel must be this environment's Python: the "python3" kernelspec runs "python" from PATH.
  monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
  monkeypatch.setenv("SHAPJAX_NOTEBOOK_TINY", "1")
  notebook.cells.append(nbformat.v4.new_code_cell("import sys, jax; print('KERNEL', sys.prefix, jax.device_count())"))
  client = NotebookClient(notebook, kernel_name="python3", timeout=240,
                          resources={"metadata": {"path": str(EXAMPLES)}})
  client.execute()

  outputs = "\n".join(_text(cell) for cell in notebook.cells if cell.cell_type == "code")
  assert f"KERNEL {sys.prefix} 4" in outputs  # the venv's kernel, with conftest's 4 fake CPU devices
  assert "No TPU found" in outputs
  assert "| 1 |" in outputs and "| 4 |" in outputs and "images/s" in outputs  # the throughput table
  difference = float(outputs.split("largest difference between one device and 4: ")[1].split()[0])
  assert difference < 1e-5
  figures = [output for cell in notebook.cells for output in cell.get("outputs", [])
             if "image/png" in output.get("data", {})]
  assert figures, "the notebook showed no figure"
