"""Score anomaly-map formulas from an evaluate() cache, without recomputing any attribution.

``shapjax.evaluate(..., cache_dir=CACHE)`` keeps each test image's residual, SLIC labels and Shapley values as
one ``.npz`` under ``CACHE/<digest>/``. This script reads such a folder and the dataset's masks and scores, on
the whole cached split, formulas that combine the residual with the Shapley values (and their ``:constant`` /
``:shuffled`` ablations), next to the same formulas with the residual pooled over the regions (sum or max)
instead of the Shapley values. A table is printed and written as markdown and JSON.

    python -m benchmarks.map_variants ../shared/data/kolektor_sdd CACHE/<digest> --out results/variants
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import scipy.ndimage
from PIL import Image

from shapjax import data, evaluation, metrics


def load_cached_split(root: Path, folder: Path) -> list[dict]:
  """Per-image parts of every ``.npz`` in ``folder`` with the full-size ground-truth mask."""
  records = []
  for path in sorted(folder.glob("*.npz")):
    defect, _, rest = path.stem.partition("_")
    image_path = next((root / "test" / defect).glob(rest.rsplit("_", 1)[0] + ".*"))
    with Image.open(image_path) as image:
      shape = image.size[::-1]
    if defect == "good":
      mask = np.zeros(shape, bool)
    else:
      mask = data._read_mask(data._find_mask(root, defect, image_path), shape, image_path)
    with np.load(path) as parts:
      if "labels_0" not in parts.files:
        raise ValueError(f"{path} holds no Shapley values: evaluate() ran with the residual map only")
      records.append({"type": defect, "mask": mask, **{k: parts[k] for k in parts.files}})
  if not records:
    raise FileNotFoundError(f"no cached .npz files in {folder}")
  return records


def _minmax(x: np.ndarray) -> np.ndarray:
  return (x - x.min()) / (x.max() - x.min() + 1e-12)


# Gates of the residual map, each a function of one region value per region (density: value / region area).
GATES = {
    "R * minmax(d)": lambda d: _minmax(d),
    "R * (1 + minmax(d))": lambda d: 1 + _minmax(d),
    "R * (1 + 3 minmax(d))": lambda d: 1 + 3 * _minmax(d),
    "R * (1 + relu(d / mean|d|))": lambda d: 1 + np.maximum(d / (np.abs(d).mean() + 1e-12), 0),
    "R * exp(z(d) / 2)": lambda d: np.exp(0.5 * (d - d.mean()) / (d.std() + 1e-12)),
}


def region_values(record: dict, source: str, ablation: str | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``(labels, density)``: one value per region divided by its area, from Shapley values or pooled residual."""
  labels = record["labels_0"]
  n = int(labels.max()) + 1
  area = np.bincount(labels.ravel(), minlength=n).astype(np.float64)
  residual = np.asarray(record["residual"], np.float64)
  if source == "shapley":
    values = evaluation._ablate(record["values_0"], n, ablation, seed)[:n]
  elif source == "pooled sum":
    values = np.bincount(labels.ravel(), residual.ravel(), n)
  else:  # pooled max: the Shapley values of a max game rank regions by this
    values = np.full(n, -np.inf)
    np.maximum.at(values, labels.ravel(), residual.ravel())
    values = values * area  # so that the division by area below leaves the maximum
  return labels, values / area


def score(maps: list[np.ndarray], records: list[dict]) -> dict:
  masks = [r["mask"] for r in records]
  full = [evaluation._upsample(m.astype(np.float32), k.shape) for m, k in zip(maps, masks)]
  pixel = metrics.pixel_metrics(full, masks)
  image = metrics.image_auroc([m.max() for m in maps], [r["type"] != "good" for r in records])
  return {"image_auroc": float(image), "pixel_auroc": float(pixel.pixel_auroc), "aupro": float(pixel.aupro)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("data", type=Path, help="the MVTec-layout dataset the cache was computed on")
  parser.add_argument("cache", type=Path, help="one evaluate() cache folder (CACHE/<digest>)")
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results/variants"))
  parser.add_argument("--sigma", type=float, default=evaluation.DEFAULT_SIGMA)
  args = parser.parse_args(argv)

  records = load_cached_split(args.data, args.cache)
  smooth = lambda m: scipy.ndimage.gaussian_filter(np.asarray(m, np.float64), args.sigma, mode="nearest")
  residuals = [smooth(r["residual"]) for r in records]
  rows = [{"map": "residual", "source": "-", **score(residuals, records)}]
  print(json.dumps(rows[-1]), flush=True)
  sources = [("shapley", None), ("shapley", "constant"), ("shapley", "shuffled"), ("pooled sum", None),
             ("pooled max", None)]
  for source, ablation in sources:
    densities = [region_values(r, source, ablation, seed=i) for i, r in enumerate(records)]
    label = source + (f":{ablation}" if ablation else "")
    rows.append({"map": "d (region map)", "source": label,
                 **score([smooth(d[l]) for l, d in densities], records)})
    print(json.dumps(rows[-1]), flush=True)
    for name, gate in GATES.items():
      maps = [res * smooth(gate(d)[l]) for res, (l, d) in zip(residuals, densities)]
      rows.append({"map": name, "source": label, **score(maps, records)})
      print(json.dumps(rows[-1]), flush=True)

  args.out.mkdir(parents=True, exist_ok=True)
  name = args.data.name
  command = "python -m benchmarks.map_variants " + " ".join(sys.argv[1:] if argv is None else argv)
  (args.out / f"{name}.json").write_text(json.dumps({"command": command, "images": len(records), "rows": rows},
                                                    indent=1))
  lines = [f"### {name}: {len(records)} cached test images (R: residual, d: region value / area)", "",
           "| map | d from | image AUROC | pixel AUROC | AUPRO@0.3 |", "|---|---|---|---|---|"]
  lines += [f"| {r['map']} | {r['source']} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} |"
            for r in rows]
  (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
