"""The tables of docs/localization.md's inpainting section, from the results of ``benchmarks/inpainting.py``.

Reads every ``<dataset>.json`` and ``<dataset>-subset<K>.json`` in a results folder (whole splits first, then
subsets, told apart by the record's ``limit``) and prints three markdown tables, one column per results file:

* ``summary``: the whole test splits, the maps ``evaluate`` computes by default for each model, the seed's game
  and its control, and the grid and leave-one-out maps of the other inpainters; pixel AUROC / AUPRO@0.3 with
  image AUROC in brackets;
* ``main``: every map of the autoencoder and of the default inpainter (32 regions), pixel AUROC / AUPRO@0.3;
* ``attempts``: every map of every other attempt, pixel AUROC / AUPRO@0.3, then each attempt's median
  additivity.

A map an attempt did not score on a dataset is ``-``.

    python -m benchmarks.inpainting_tables benchmarks/results/inpainting
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import inpainting
from shapjax import evaluation

NOTES = {
    ("autoencoder", "residual"): "autoencoder `residual` (the map to beat)",
    ("autoencoder", "shapley"): "autoencoder `shapley` (the seed's reconstruction game)",
    ("autoencoder", "pooled_residual"): "autoencoder `pooled_residual` (control)",
    ("inpainter", "inpaint_grid"): "`inpaint_grid` (control, no game)",
    ("inpainter", "inpaint_loo"): "`inpaint_loo` (control)",
    ("inpainter", "inpaint_beta_16_1"): "`inpaint_beta_16_1` (small coalitions)",
    ("inpainter", "inpaint_beta_1_16"): "`inpaint_beta_1_16` (near-full coalitions)",
    ("inpainter", "inpaint_grid_x_loo"): "`inpaint_grid_x_loo` (control)",
    ("inpainter", "inpaint_grid_x_banzhaf:constant"): "`inpaint_grid_x_banzhaf:constant` (gate 1 / area)",
}
SUMMARY_MAPS = ("inpaint_grid", "inpaint_loo")
"""Maps of the other inpainters in the summary table: the model's own map and the game's control."""


def load(folder: Path) -> list[dict]:
  """Every results file of ``folder``: whole splits (by name), then subsets; each with a ``label``."""
  records = []
  for path in folder.glob("*.json"):
    record = json.loads(path.read_text())
    limit = record.get("limit")
    record["label"] = (f"{record['dataset']} ({limit}-image subset)" if limit is not None
                       else f"{record['dataset']} ({record['n_images']} images)")
    records.append((limit is not None, record["dataset"], record))
  if not records:
    raise ValueError(f"no results (.json) in {folder}")
  return [r for _, _, r in sorted(records, key=lambda r: r[:2])]


def _metrics(record: dict, attempt: str, name: str) -> dict | None:
  for a in record["attempts"]:
    if a["name"] == attempt and name in a["maps"]:
      return a["maps"][name]["overall"]
  return None


def additivity_index(attempt: dict) -> str | None:
  """The semivalue whose coalitions an attempt's additivity was measured on (``evaluate``'s
  ``additivity_index``); for results recorded without it, ``evaluate``'s rule applied to the attempt's maps: the
  first game other than leave-one-out, or leave-one-out alone."""
  if "additivity_index" in attempt:
    return attempt["additivity_index"]
  if attempt["name"] == "autoencoder":
    return "shapley"
  indices = (evaluation.map_index(m) for m in attempt["maps"])
  games = list(dict.fromkeys(evaluation.index_label(i) for i in indices if i is not None))
  return next((g for g in games if g != "loo"), games[0] if games else None)


def cell(record: dict, attempt: str, name: str, *, image: bool = False) -> str:
  """``pixel AUROC / AUPRO@0.3`` (and ``(image AUROC)``) of one map, the median additivity (and the game whose
  coalitions it was measured on), or ``-``."""
  if name == "additivity":
    found = next((a for a in record["attempts"] if a["name"] == attempt), None)
    if found is None or found["additivity_median"] is None:
      return "-"
    return f"{found['additivity_median']:.3f} ({additivity_index(found)})"
  scores = _metrics(record, attempt, name)
  if scores is None:
    return "-"
  text = f"{scores['pixel_auroc']:.3f} / {scores['aupro']:.3f}"
  if image and scores["image_auroc"] is not None:
    text += f" ({scores['image_auroc']:.3f})"
  return text


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def _attempt_maps(records: list[dict], attempt: dict) -> list[str]:
  """The attempt's maps scored in any record, in the attempt's order (the reference's residual left out)."""
  scored = {m for r in records for a in r["attempts"] if a["name"] == attempt["name"] for m in a["maps"]}
  return [m for m in attempt["maps"] if m in scored]


def tables(records: list[dict]) -> dict[str, str]:
  """The ``summary``, ``main`` and ``attempts`` tables (markdown) of ``records`` (:func:`load`)."""
  every = inpainting.attempts()
  autoencoder, default, others = every[0], every[1], every[2:]
  labels = [r["label"] for r in records]
  whole = [r for r in records if r.get("limit") is None]

  summary = [[NOTES[("autoencoder", m)], *(cell(r, "autoencoder", m, image=True) for r in whole)]
             for m in autoencoder["maps"]]
  for name in (*SUMMARY_MAPS, "inpaint_shapley"):
    summary.append([f"inpainter `{name}`", *(cell(r, "inpainter", name, image=True) for r in whole)])
  for attempt in others:
    for name in SUMMARY_MAPS:
      if attempt["regions"] == (32,) and name in _attempt_maps(whole, attempt):
        summary.append([f"{attempt['name']}: `{name}`",
                        *(cell(r, attempt["name"], name, image=True) for r in whole)])
  summary.append(["median additivity of the default inpainter's game, per image",
                  *(cell(r, "inpainter", "additivity") for r in whole)])

  main = [[NOTES[("autoencoder", m)], *(cell(r, "autoencoder", m) for r in records)] for m in autoencoder["maps"]]
  for name in _attempt_maps(records, default):
    main.append([NOTES.get(("inpainter", name), f"`{name}`"), *(cell(r, "inpainter", name) for r in records)])
  main.append(["median additivity of the inpainting game, per image",
               *(cell(r, "inpainter", "additivity") for r in records)])

  rows = [[a["name"], f"`{m}`", *(cell(r, a["name"], m) for r in records)] for a in others
          for m in _attempt_maps(records, a)]
  rows += [[a["name"], "median additivity", *(cell(r, a["name"], "additivity") for r in records)] for a in others
           if any(cell(r, a["name"], "additivity") != "-" for r in records)]
  return {"summary": _table(["map", *(r["label"] for r in whole)], summary),
          "main": _table(["map", *labels], main),
          "attempts": _table(["attempt", "map", *labels], rows)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("results", type=Path, help="the --out folder of benchmarks/inpainting.py")
  args = parser.parse_args(argv)
  for title, table in tables(load(args.results)).items():
    print(f"<!-- {title} -->\n{table}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
