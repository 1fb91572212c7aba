"""End-to-end jobs behind the command line, usable from Python: explain image files, run the demo.

Each job strings library calls together (read -> segment -> attribute -> figure + JSON) and writes files; the
CLI only parses arguments and calls these.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from shapjax import attribution, checkpoint, data, masking, metrics, model, plots, segmentation
from shapjax.training import TrainConfig
from shapjax.training import train as _train

DEFAULT_EXPLAIN_N_PERM = 64


def _ground_truth_for(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
  """The mask of an image inside an MVTec layout (``<root>/test/<type>/<stem>``), resized to ``shape``."""
  if path.parent.parent.name != "test":
    return None
  defect_type = path.parent.name
  if defect_type == "good":
    return np.zeros(shape, bool)
  folder = path.parent.parent.parent / "ground_truth" / defect_type
  for name in (f"{path.stem}_mask.png", f"{path.stem}.png"):
    if (folder / name).is_file():
      mask = data.read_image(folder / name, channels=1)[..., 0] > 0.5
      return data.resize_mask(mask, shape)
  return None


def _unique_stem(path: Path, used: set[str]) -> str:
  stem = path.stem
  if stem in used:
    stem = f"{path.parent.name}_{path.stem}"
  base, count = stem, 1
  while stem in used:
    count += 1
    stem = f"{base}_{count}"
  used.add(stem)
  return stem


def _progress(items, *, total: int, desc: str, enabled: bool):
  if not enabled:
    return items
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(items, total=total, desc=desc, unit="image", dynamic_ncols=True)


def explain_files(
    paths: Sequence[str | os.PathLike],
    *,
    params: model.AutoencoderParams,
    out_dir: str | os.PathLike,
    n_perm: int = DEFAULT_EXPLAIN_N_PERM,
    max_regions: int = segmentation.DEFAULT_MAX_REGIONS,
    key: jax.Array | None = None,
    baseline: str = "blur",
    top_k: int = 3,
    compactness: float = 10.0,
    progress: bool = True,
) -> list[dict]:
  """Explains image files: for each, a PNG figure and a JSON of per-region Shapley values.

  Each image is read and resized to the model's input size, split into at most ``max_regions`` SLIC
  superpixels, and attributed with :func:`shapjax.attribute` (image ``i`` uses ``fold_in(key, i)``). When an
  image sits in an MVTec layout (``<root>/test/<type>/<file>``) its ground-truth mask, if found, is outlined on
  the figure and the JSON says whether the top region touches it.

  Args:
    paths: image files.
    params: a trained autoencoder (:func:`shapjax.load`).
    out_dir: folder for ``<stem>.png`` and ``<stem>.json`` (created).
    n_perm: permutations per image (even).
    max_regions: SLIC target and number of players.
    key: PRNG key; defaults to ``jax.random.key(0)``.
    baseline: what absent regions become (see :func:`shapjax.attribute`).
    top_k: regions outlined in the figure and listed first in the JSON.
    compactness: SLIC's colour-versus-position balance (see :func:`shapjax.segment`); lower values weigh
      intensity more.
    progress: show a progress bar.

  Several processes (after ``jax.distributed.initialize()``): every process passes the same ``paths``; process
  ``p`` of ``n`` explains images ``p, p + n, ...`` (with the keys and file names of one process) and writes
  their files.

  Returns:
    One record per image (with several processes, per image of this process): the JSON's content, plus
    ``"figure"`` and ``"json"`` paths, the label map ``"labels"`` (``i32[H, W]``) and the ``"values"``
    (``f32[max_regions]``).

  Raises:
    ValueError: naming the file, for a missing or unreadable image.
  """
  game = attribution.check_game(params)  # an autoencoder's reconstruction game, an inpainter's inpainting game
  paths = [Path(p) for p in paths]
  if not paths:
    raise ValueError("no images to explain")
  height, width, channels = params.config.image_shape
  # Several processes: each explains every n-th image; the names are chosen over all of them, as in one process.
  used = set()
  stems = [_unique_stem(path, used) for path in paths]
  mine = list(range(jax.process_index(), len(paths), jax.process_count()))
  # Read everything first: a bad path fails before minutes of computing.
  images = [data.read_image(paths[i], image_size=(height, width), channels=channels) for i in mine]
  key = jax.random.key(0) if key is None else key
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  records = []
  for i, image in _progress(list(zip(mine, images)), total=len(mine), desc="explaining", enabled=progress):
    path = paths[i]
    labels = segmentation.segment(image, max_regions=max_regions, compactness=compactness)
    started = time.perf_counter()
    result = attribution.attribute(params, image, labels, n_perm, key=jax.random.fold_in(key, i),
                                   baseline=baseline, max_regions=max_regions)
    values = np.asarray(result.values, np.float64)
    stderr = np.asarray(result.stderr, np.float64)
    seconds = time.perf_counter() - started
    n_regions = int(labels.max()) + 1
    sizes = np.bincount(labels.ravel(), minlength=n_regions)
    order = [int(r) for r in np.argsort(-values[:n_regions])]
    mask = _ground_truth_for(path, (height, width))
    stem = stems[i]
    record = {
        "image": str(path),
        "model_input_size": [height, width],
        "n_regions": n_regions,
        "n_perm": int(n_perm),
        "n_evals": int(result.n_evals),
        # How close this image's game is to additive (1: each region acts alone; see ShapleyResult).
        "additivity": None if not np.isfinite(float(result.additivity)) else float(result.additivity),
        "seconds": round(seconds, 3),
        "game": game,
        "baseline": baseline if game == "reconstruction" else None,
        "compactness": float(compactness),
        "regions_by_value": order,
        "regions": [{"id": r, "value": float(values[r]), "stderr": float(stderr[r]), "pixels": int(sizes[r])}
                    for r in range(n_regions)],
    }
    if mask is not None and mask.any():
      top = labels == order[0]
      record["ground_truth"] = {
          "defect_pixels": int(mask.sum()),
          "top_region_hits_defect": bool((top & mask).any()),
          "top_region_fraction_in_defect": float((top & mask).sum() / top.sum()),
      }
    figure_path, json_path = out_dir / f"{stem}.png", out_dir / f"{stem}.json"
    plots.plot_explanation(image, labels, values, top_k=top_k, mask=mask if mask is not None and mask.any() else None,
                           title=f"{path.name}: Shapley values of {n_regions} regions, {n_perm} permutations",
                           path=figure_path)
    json_path.write_text(json.dumps(record, indent=1))
    records.append({**record, "figure": str(figure_path), "json": str(json_path), "labels": labels,
                    "values": values.astype(np.float32)})
  return records


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Sizes of the demo: the full preset takes a few minutes on 2 CPU cores, ``quick()`` seconds.

  Attributes:
    image_size: side of the square grey demo images.
    n_train: defect-free training images.
    n_test: test images (half defective).
    n_explain: defective test images to explain.
    train: the `shapjax.TrainConfig`.
    n_perm: permutations per explained image.
    max_regions: superpixels per image.
  """

  image_size: int = 64
  n_train: int = 256
  n_test: int = 32
  n_explain: int = 6
  train: TrainConfig = TrainConfig(
      model=model.AutoencoderConfig((64, 64, 1), features=(16, 32, 64), latent_features=16), steps=400,
      batch_size=32, learning_rate=3e-3, warmup_steps=40, checkpoint_every=200, keep_checkpoints=1)
  n_perm: int = 32
  max_regions: int = 32

  @classmethod
  def quick(cls) -> "DemoConfig":
    """Seconds, not minutes: for tests and a first look."""
    return cls(image_size=32, n_train=32, n_test=4, n_explain=2,
               train=TrainConfig.tiny((32, 32, 1), steps=30, checkpoint_every=30, keep_checkpoints=1),
               n_perm=8, max_regions=16)


def _round_robin(defect_types: Sequence[str], count: int) -> list[int]:
  """Indices of up to ``count`` defective images, taking each defect type in turn (blob, scratch, blob, ...)."""
  by_type: dict[str, list[int]] = {}
  for i, kind in enumerate(defect_types):
    if kind != "good":
      by_type.setdefault(kind, []).append(i)
  queues = list(by_type.values())
  chosen = []
  while len(chosen) < count and any(queues):
    for queue in queues:
      if queue and len(chosen) < count:
        chosen.append(queue.pop(0))
  return chosen


def _has_both(truth: np.ndarray) -> bool:
  """Whether an AUROC is defined: ``truth`` holds both positives and negatives."""
  truth = np.asarray(truth, bool)
  return bool(truth.any()) and not bool(truth.all())


def _pixel_auroc(heat: np.ndarray, truth: np.ndarray) -> float | None:
  """:func:`shapjax.pixel_auroc` of one map, or None where the image has no defect pixels (or only those)."""
  return metrics.pixel_auroc(heat, truth) if _has_both(truth) else None


def run_demo(
    out_dir: str | os.PathLike,
    *,
    config: DemoConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    log=print,
) -> dict:
  """The whole job on generated data: build a dataset, train, explain defective images, score.

  Writes under ``out_dir``: ``data/`` (an MVTec-layout dataset from :func:`shapjax.make_demo_dataset`),
  ``checkpoint/`` (with ``loss.png``), ``explanations/`` (a figure and JSON per explained image),
  ``overview.png`` (image, ground truth, Shapley map, residual map per explained image) and
  ``summary.json`` / ``summary.md`` (does the top region hit the defect; pixel AUROC of the Shapley map and of
  the residual map; image AUROC of the reconstruction loss over the whole test split).

  Args:
    out_dir: output folder (created; must not hold an earlier demo's checkpoint).
    config: :class:`DemoConfig`; the default is the full demo.
    seed: seeds the data, the training and the sampling.
    progress: show progress bars.
    log: where one-line progress messages go.

  Returns:
    The summary as a dict.
  """
  config = DemoConfig() if config is None else config
  out_dir = Path(out_dir)
  ckpt_dir = out_dir / "checkpoint"
  if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
    raise ValueError(f"{out_dir} already holds a demo run; choose another --out or delete it")
  key = jax.random.key(seed)
  started = time.perf_counter()
  log(f"[1/4] writing demo data ({config.n_train} train, {config.n_test} test images) to {out_dir / 'data'}")
  root = data.make_demo_dataset(out_dir / "data", n_train=config.n_train, n_test=config.n_test,
                                image_size=config.image_size, seed=seed)
  train_split = data.load_mvtec(root, split="train", image_size=config.image_size)
  test_split = data.load_mvtec(root, split="test", image_size=config.image_size)
  train_config = config.train
  if train_config.model is not None and train_config.model.image_shape != train_split.images.shape[1:]:
    train_config = dataclasses.replace(
        train_config, model=dataclasses.replace(train_config.model, image_shape=train_split.images.shape[1:]))
  log(f"[2/4] training the autoencoder ({train_config.steps} steps) into {ckpt_dir}")
  train_started = time.perf_counter()
  params = _train(train_config, train_split.images, key=jax.random.fold_in(key, 0),
                          checkpoint_dir=ckpt_dir, progress=progress)
  train_seconds = time.perf_counter() - train_started
  params = checkpoint.load(ckpt_dir)  # what a user would do: the checkpoint is the product

  defective = _round_robin(test_split.defect_types, config.n_explain)
  log(f"[3/4] explaining {len(defective)} defective test images ({config.n_perm} permutations, "
      f"up to {config.max_regions} regions)")
  explain_started = time.perf_counter()
  records = explain_files([test_split.paths[i] for i in defective], params=params,
                          out_dir=out_dir / "explanations", n_perm=config.n_perm,
                          max_regions=config.max_regions, key=jax.random.fold_in(key, 1), progress=progress)
  explain_seconds = time.perf_counter() - explain_started

  log("[4/4] scoring")
  losses = np.asarray(model.reconstruction_loss(params, test_split.images))
  residuals = np.asarray(model.residual_map(params, test_split.images[np.asarray(defective, int)]))
  per_image, shapley_maps = [], []
  for row, (i, record) in enumerate(zip(defective, records)):
    heat = np.asarray(masking.heatmap(record["values"], record["labels"]))
    shapley_maps.append(heat)
    truth = test_split.masks[i]
    per_image.append({
        "image": record["image"], "defect_type": test_split.defect_types[i],
        "top_region_hits_defect": record.get("ground_truth", {}).get("top_region_hits_defect"),
        "pixel_auroc_shapley": _pixel_auroc(heat, truth), "pixel_auroc_residual": _pixel_auroc(residuals[row], truth),
        "figure": record["figure"]})
  plots.plot_overlay_grid(test_split.images[np.asarray(defective, int)],
                          {"Shapley map": np.stack(shapley_maps), "residual map": residuals},
                          masks=test_split.masks[np.asarray(defective, int)],
                          region_labels={"Shapley map": np.stack([r["labels"] for r in records])},
                          row_titles=[f"{Path(r['image']).name} ({test_split.defect_types[i]})"
                                      for i, r in zip(defective, records)],
                          title=f"{len(records)} defective test images: Shapley map ({config.n_perm} permutations, "
                                f"up to {config.max_regions} regions) and residual map", path=out_dir / "overview.png")
  hits = [p["top_region_hits_defect"] for p in per_image if p["top_region_hits_defect"] is not None]
  shap_aurocs = [p["pixel_auroc_shapley"] for p in per_image if p["pixel_auroc_shapley"] is not None]
  res_aurocs = [p["pixel_auroc_residual"] for p in per_image if p["pixel_auroc_residual"] is not None]
  summary = {
      "out_dir": str(out_dir), "seed": seed, "image_size": config.image_size, "train_steps": train_config.steps,
      "train_seconds": round(train_seconds, 1), "explain_seconds": round(explain_seconds, 1),
      "total_seconds": round(time.perf_counter() - started, 1),
      "good_test_loss": float(np.mean(losses[test_split.labels == 0])) if (test_split.labels == 0).any() else None,
      "image_auroc_reconstruction_loss":
          metrics.image_auroc(losses, test_split.labels) if _has_both(test_split.labels) else None,
      "top_region_hit_rate": float(np.mean(hits)) if hits else None,
      "mean_pixel_auroc_shapley": float(np.mean(shap_aurocs)) if shap_aurocs else None,
      "mean_pixel_auroc_residual": float(np.mean(res_aurocs)) if res_aurocs else None,
      "images": per_image,
      "checkpoint": str(ckpt_dir), "loss_curve": str(ckpt_dir / "loss.png"),
      "overview": str(out_dir / "overview.png"),
  }
  (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
  (out_dir / "summary.md").write_text(_summary_markdown(summary))
  return summary


def _fmt(value) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, float):
    return f"{value:.3f}"
  return str(value)


def _summary_markdown(summary: dict) -> str:
  lines = [
      "# shapjax demo", "",
      f"Trained {summary['train_steps']} steps in {summary['train_seconds']} s; explained "
      f"{len(summary['images'])} images in {summary['explain_seconds']} s; total {summary['total_seconds']} s.", "",
      f"- top region touches the defect: {_fmt(summary['top_region_hit_rate'])} of images",
      f"- mean pixel AUROC, Shapley map: {_fmt(summary['mean_pixel_auroc_shapley'])}; "
      f"residual map: {_fmt(summary['mean_pixel_auroc_residual'])}",
      f"- image AUROC of the reconstruction loss (whole test split): "
      f"{_fmt(summary['image_auroc_reconstruction_loss'])}", "",
      "| image | defect | top region hits defect | pixel AUROC Shapley | pixel AUROC residual |",
      "|---|---|---|---|---|",
  ]
  for item in summary["images"]:
    lines.append(f"| {Path(item['image']).name} | {item['defect_type']} | {_fmt(item['top_region_hits_defect'])} | "
                 f"{_fmt(item['pixel_auroc_shapley'])} | {_fmt(item['pixel_auroc_residual'])} |")
  return "\n".join(lines) + "\n"
