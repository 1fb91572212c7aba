"""What the benchmark scripts share for their output: one JSON report file."""

from __future__ import annotations

import json
import os


def write_json(report: dict, path: str | os.PathLike) -> None:
  """Writes ``report`` to ``path`` (indented JSON), creating the folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
