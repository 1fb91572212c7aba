"""Is the region game additive? What Shapley values of reconstruction loss can and cannot add to the residual.

For one trained autoencoder and one MVTec-layout dataset this script measures, on a fixed stratified subset of
defective test images and for each baseline:

* ``corr``: the correlation, over an image's SLIC regions, between the regions' Shapley values and the sums of
  the plain per-pixel residual over the same regions (median and minimum over images). A value near 1 says the
  game is additive: each region's pixels change only that region's own loss, so the Shapley map is the residual
  pooled over regions and cannot carry anything the residual does not.
* per-image pixel AUROC (mean over the subset) of the ``shapley_area`` map, of the pooled residual, and of the
  residual itself.

And, on the whole test split, the pixel AUROC and AUPRO@0.3 of an *oracle* region map (each region painted with
the fraction of its pixels that are defective): the best that any map constant on these regions could score, so
whether the region size, rather than the values, is what limits the Shapley maps.

    python -m benchmarks.additivity ../shared/data/kolektor_sdd --checkpoint CKPT --out results/additivity
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
import sklearn.metrics

import shapjax
from shapjax import evaluation, metrics

BASELINES = ("reconstruction", "blur", "mean", "normal_mean")


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
  return scipy.ndimage.gaussian_filter(np.asarray(x, np.float64), sigma, mode="nearest")


def additivity(params, test, train_images, indices, *, regions: int, n_perm: int, sigma: float) -> list[dict]:
  """One row per baseline: correlation with pooled residual sums and per-image pixel AUROCs."""
  normal_mean = jnp.asarray(train_images.mean(axis=0))
  rows = []
  for name in BASELINES:
    started = time.perf_counter()
    corr, auc_shapley, auc_pooled, auc_residual = [], [], [], []
    for i in indices:
      image, mask = jnp.asarray(test.images[i]), np.asarray(test.masks[i])
      reconstruction, residual = evaluation._reconstruct_one(params, image)
      residual = np.asarray(residual, np.float64)
      baseline = {"reconstruction": reconstruction, "normal_mean": normal_mean}.get(name, name)
      labels = shapjax.segment(np.asarray(image), max_regions=regions)
      n = int(labels.max()) + 1
      values = np.asarray(shapjax.attribute(params, image, labels, n_perm, key=jax.random.key(int(i)),
                                            baseline=baseline, max_regions=regions).values)[:n]
      area = np.bincount(labels.ravel(), minlength=n)
      pooled = np.bincount(labels.ravel(), residual.ravel(), n)
      corr.append(float(np.corrcoef(values, pooled)[0, 1]))
      if mask.any() and not mask.all():
        score = lambda m: sklearn.metrics.roc_auc_score(mask.ravel(), _smooth(m, sigma).ravel())
        auc_shapley.append(score((values / area)[labels]))
        auc_pooled.append(score((pooled / area)[labels]))
        auc_residual.append(score(residual))
    rows.append({"baseline": name, "corr_median": float(np.median(corr)), "corr_min": float(np.min(corr)),
                 "auroc_shapley_area": float(np.mean(auc_shapley)), "auroc_pooled_residual": float(np.mean(auc_pooled)),
                 "auroc_residual": float(np.mean(auc_residual)), "images": len(indices),
                 "seconds": time.perf_counter() - started})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def oracle(test, *, regions: int, sigma: float) -> dict:
  """Pixel AUROC and AUPRO of the region map that knows the masks: the ceiling of any map on these regions."""
  maps, masks = [], []
  for image, mask, full_mask in zip(test.images, test.masks, test.original_masks):
    labels = shapjax.segment(np.asarray(image), max_regions=regions)
    n = int(labels.max()) + 1
    fraction = np.bincount(labels.ravel(), np.asarray(mask, np.float64).ravel(), n) / np.bincount(labels.ravel(),
                                                                                                  minlength=n)
    small = _smooth(fraction[labels], sigma).astype(np.float32)
    maps.append(evaluation._upsample(small, full_mask.shape))
    masks.append(np.asarray(full_mask, bool))
  result = metrics.pixel_metrics(maps, masks)
  return {"pixel_auroc": float(result.pixel_auroc), "aupro": float(result.aupro), "images": len(maps)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("data", type=Path, help="one MVTec-layout dataset")
  parser.add_argument("--checkpoint", type=Path, required=True)
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results/additivity"))
  parser.add_argument("--limit", type=int, default=30, help="stratified subset of the test split")
  parser.add_argument("--regions", type=int, default=evaluation.DEFAULT_REGIONS[0])
  parser.add_argument("--n-perm", type=int, default=2)
  args = parser.parse_args(argv)

  params = shapjax.load(args.checkpoint)
  height, width, channels = params.config.image_shape
  test = shapjax.load_mvtec(args.data, split="test", image_size=(height, width), channels=channels)
  train = shapjax.load_mvtec(args.data, split="train", image_size=(height, width), channels=channels)
  types = np.asarray(test.defect_types)
  indices = [int(i) for i in evaluation.stratified_subset(types, args.limit) if types[i] != "good"]
  sigma = evaluation.DEFAULT_SIGMA
  report = {"command": "python -m benchmarks.additivity " + " ".join(sys.argv[1:] if argv is None else argv),
            "dataset": args.data.name, "model": params.config.to_dict(), "regions": args.regions,
            "n_perm": args.n_perm,
            "baselines": additivity(params, test, train.images, indices, regions=args.regions, n_perm=args.n_perm,
                                    sigma=sigma),
            "oracle_region_map": oracle(test, regions=args.regions, sigma=sigma)}
  print(json.dumps(report["oracle_region_map"]))
  args.out.mkdir(parents=True, exist_ok=True)
  tag = f"{args.data.name}_{params.config.bottleneck}"
  (args.out / f"{tag}.json").write_text(json.dumps(report, indent=1))
  lines = [f"### {args.data.name}, {params.config.bottleneck} bottleneck, {args.regions} regions, "
           f"{len(indices)} defective images", "",
           "| baseline | corr(Shapley, region residual sum): median / min | per-image pixel AUROC: shapley_area / "
           "pooled residual / residual |", "|---|---|---|"]
  for row in report["baselines"]:
    lines.append(f"| {row['baseline']} | {row['corr_median']:.3f} / {row['corr_min']:.3f} | "
                 f"{row['auroc_shapley_area']:.3f} / {row['auroc_pooled_residual']:.3f} / {row['auroc_residual']:.3f} |")
  o = report["oracle_region_map"]
  lines += ["", f"Oracle region map (defect fraction per region, whole test split of {o['images']} images): pixel "
            f"AUROC {o['pixel_auroc']:.3f}, AUPRO@0.3 {o['aupro']:.3f}.", ""]
  (args.out / f"{tag}.md").write_text("\n".join(lines))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
