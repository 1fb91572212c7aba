"""End-to-end jobs behind the command line, usable from Python: explain image files, run the demo.

Each job strings library calls together (read -> segment -> attribute, and the model's default pixel map ->
figure + JSON) and writes files; the CLI only parses arguments and calls these.
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

from shapjax import attribution, checkpoint, data, evaluation, masking, metrics, model, plots, segmentation
from shapjax.inpainting import InpainterConfig
from shapjax.training import TrainConfig
from shapjax.training import train as _train

DEFAULT_EXPLAIN_N_PERM = 64
# What a region's value measures in each game: the colour bar of the value map.
_VALUE_LABELS = {"reconstruction": "change in reconstruction loss",
                 "inpainting": "inpainting error removed by showing it"}


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
    params: model.ModelParams,
    out_dir: str | os.PathLike,
    n_perm: int = DEFAULT_EXPLAIN_N_PERM,
    max_regions: int = segmentation.DEFAULT_MAX_REGIONS,
    key: jax.Array | None = None,
    baseline: str = "blur",
    top_k: int = 3,
    compactness: float = 10.0,
    progress: bool = True,
) -> list[dict]:
  """Explains image files: for each, a PNG figure and a JSON of per-region Shapley values and the pixel map.

  Each image is read and resized to the model's input size, split into at most ``max_regions`` SLIC
  superpixels, and attributed with :func:`shapjax.attribute` in the game of the model's kind (image ``i`` uses
  ``fold_in(key, i)``): an autoencoder's reconstruction loss, an inpainter's inpainting error. Beside the region
  values the figure shows the model's default pixel map (:func:`shapjax.evaluation.default_map`, computed as
  :func:`shapjax.evaluate` does by :func:`shapjax.evaluation.image_map`): ``residual`` for an autoencoder,
  ``inpaint_grid`` for an inpainter. When an image sits in an MVTec layout (``<root>/test/<type>/<file>``) its
  ground-truth mask, if found, is outlined on the figure, and the JSON says whether the top region touches it and
  (where the mask holds defect and normal pixels) gives the pixel AUROC of the region-value map and of the pixel
  map.

  Args:
    paths: image files.
    params: a trained autoencoder or inpainter (:func:`shapjax.load`).
    out_dir: folder for ``<stem>.png`` and ``<stem>.json`` (created).
    n_perm: permutations per image (even).
    max_regions: SLIC target and number of players.
    key: PRNG key; defaults to ``jax.random.key(0)``.
    baseline: what absent regions become in an autoencoder's game (see :func:`shapjax.attribute`).
    top_k: regions outlined in the figure and listed first in the JSON.
    compactness: SLIC's colour-versus-position balance (see :func:`shapjax.segment`); lower values weigh
      intensity more.
    progress: show a progress bar.

  Several processes (after ``jax.distributed.initialize()``): every process passes the same ``paths``; process
  ``p`` of ``n`` explains images ``p, p + n, ...`` (with the keys and file names of one process) and writes
  their files.

  Returns:
    One record per image (with several processes, per image of this process): the JSON's content, plus
    ``"figure"`` and ``"json"`` paths, the label map ``"labels"`` (``i32[H, W]``), the ``"values"``
    (``f32[max_regions]``) and the pixel map ``"pixel_map_values"`` (``f32[H, W]``). The JSON holds, besides the
    regions' values, ``"pixel_map"`` (the pixel map's name) and ``"pixel_auroc_region_values"`` and
    ``"pixel_auroc_pixel_map"`` (None without a ground-truth mask holding both defect and normal pixels).

  Raises:
    ValueError: naming the file, for a missing or unreadable image.
  """
  game = attribution.check_game(params)  # an autoencoder's reconstruction game, an inpainter's inpainting game
  pixel_map_name = evaluation.default_map(params)
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
    pixel_map = evaluation.image_map(params, image, name=pixel_map_name)
    n_regions = int(labels.max()) + 1
    sizes = np.bincount(labels.ravel(), minlength=n_regions)
    order = [int(r) for r in np.argsort(-values[:n_regions])]
    mask = _ground_truth_for(path, (height, width))
    truth = np.zeros((height, width), bool) if mask is None else mask
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
        "pixel_map": pixel_map_name,
        "pixel_auroc_region_values": _pixel_auroc(np.asarray(masking.heatmap(values, labels)), truth),
        "pixel_auroc_pixel_map": _pixel_auroc(pixel_map, truth),
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
                           pixel_map=pixel_map, pixel_map_name=pixel_map_name, value_label=_VALUE_LABELS[game],
                           title=f"{path.name}: Shapley values of {n_regions} regions ({game} game, {n_perm} "
                                 f"permutations) and the {pixel_map_name} map", path=figure_path)
    json_path.write_text(json.dumps(record, indent=1))
    records.append({**record, "figure": str(figure_path), "json": str(json_path), "labels": labels,
                    "values": values.astype(np.float32), "pixel_map_values": pixel_map})
  return records


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Sizes of the demo: the full preset takes a few minutes on 2 CPU cores, ``quick()`` seconds.

  Attributes:
    image_size: side of the square grey demo images.
    n_train: defect-free training images.
    n_test: test images (half defective), all scored.
    n_explain: defective test images to explain.
    autoencoder: the :class:`shapjax.TrainConfig` of the reference autoencoder (its model an
      :class:`shapjax.AutoencoderConfig`), whose ``residual`` map is scored beside the inpainter's maps.
    inpainter: the :class:`shapjax.TrainConfig` of the inpainter (its model an :class:`shapjax.InpainterConfig`),
      whose game explains the images and whose ``inpaint_grid`` map is the default.
    n_perm: permutations per explained and per scored image.
    max_regions: superpixels per image.
  """

  image_size: int = 64
  n_train: int = 256
  n_test: int = 32
  n_explain: int = 6
  autoencoder: TrainConfig = TrainConfig(
      model=model.AutoencoderConfig((64, 64, 1), features=(16, 32, 64), latent_features=16), steps=400,
      batch_size=32, learning_rate=3e-3, warmup_steps=40, checkpoint_every=200, keep_checkpoints=1)
  inpainter: TrainConfig = TrainConfig(
      model=InpainterConfig((64, 64, 1), features=(16, 32, 64)), steps=400, batch_size=32, learning_rate=3e-3,
      warmup_steps=40, checkpoint_every=200, keep_checkpoints=1)
  n_perm: int = 32
  max_regions: int = 32

  def __post_init__(self):
    for name, kind in (("autoencoder", "autoencoder"), ("inpainter", "inpainting")):
      config = getattr(self, name).model
      if config is None or model.model_kind(config) != kind:
        raise ValueError(f"DemoConfig.{name} must train a model of kind {kind!r}, got "
                         f"{None if config is None else model.model_kind(config)!r}")

  @classmethod
  def quick(cls) -> "DemoConfig":
    """Seconds, not minutes: for tests and a first look."""
    shape = (32, 32, 1)
    return cls(image_size=32, n_train=32, n_test=4, n_explain=2,
               autoencoder=TrainConfig.tiny(shape, steps=30, checkpoint_every=30, keep_checkpoints=1),
               inpainter=TrainConfig.tiny(shape, model=InpainterConfig.tiny(shape), steps=30, checkpoint_every=30,
                                          keep_checkpoints=1),
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


def _with_image_shape(config: TrainConfig, image_shape: tuple[int, ...]) -> TrainConfig:
  """``config`` with its model built for ``image_shape`` (the demo's images)."""
  if tuple(config.model.image_shape) == tuple(image_shape):
    return config
  return dataclasses.replace(config, model=dataclasses.replace(config.model, image_shape=tuple(image_shape)))


def run_demo(
    out_dir: str | os.PathLike,
    *,
    config: DemoConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    log=print,
) -> dict:
  """The whole job on generated data: build a dataset, train two models, explain defective images, score maps.

  An autoencoder and an inpainter are trained on the same defect-free images. The defective images are explained
  with the inpainter (:func:`explain_files`: Shapley values of SLIC regions in the inpainting game, beside its
  default pixel map ``inpaint_grid``), and every test image is scored (:func:`shapjax.evaluate` with the
  autoencoder as ``reference``) by four maps: ``inpaint_grid`` (the default), the autoencoder's ``residual``,
  the game's ``inpaint_shapley`` and its control ``inpaint_loo``.

  Writes under ``out_dir``: ``data/`` (an MVTec-layout dataset from :func:`shapjax.make_demo_dataset`),
  ``checkpoint/autoencoder/`` and ``checkpoint/inpainter/`` (each with ``loss.png``), ``explanations/`` (a figure
  and JSON per explained image), ``overview.png`` (per explained image: image, ground truth, the
  ``inpaint_grid`` map, the game's Shapley map and the residual map) and ``summary.json`` / ``summary.md`` (image
  AUROC, pixel AUROC and AUPRO@0.3 of each map over the whole test split; per explained image, whether the top
  region hits the defect and each map's pixel AUROC).

  Args:
    out_dir: output folder (created; must not hold an earlier demo's checkpoints).
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
  log(f"[1/5] writing demo data ({config.n_train} train, {config.n_test} test images) to {out_dir / 'data'}")
  root = data.make_demo_dataset(out_dir / "data", n_train=config.n_train, n_test=config.n_test,
                                image_size=config.image_size, seed=seed)
  train_split = data.load_mvtec(root, split="train", image_size=config.image_size)
  test_split = data.load_mvtec(root, split="test", image_size=config.image_size)
  models, trained = {}, {}
  for step, (name, train_config, stream) in enumerate(
      (("autoencoder", config.autoencoder, 0), ("inpainter", config.inpainter, 2)), start=2):
    train_config = _with_image_shape(train_config, train_split.images.shape[1:])
    folder = ckpt_dir / name
    log(f"[{step}/5] training the {name} ({train_config.steps} steps) into {folder}")
    train_started = time.perf_counter()
    _train(train_config, train_split.images, key=jax.random.fold_in(key, stream), checkpoint_dir=folder,
           progress=progress)
    models[name] = checkpoint.load(folder)  # what a user would do: the checkpoint is the product
    trained[name] = {"checkpoint": str(folder), "loss_curve": str(folder / "loss.png"), "steps": train_config.steps,
                     "train_seconds": round(time.perf_counter() - train_started, 1)}
  autoencoder, inpainter = models["autoencoder"], models["inpainter"]
  # The inpainter's default map first, the reference autoencoder's beside it, then the inpainter's game map and
  # its leave-one-out control.
  pixel_name, residual_name = evaluation.default_map(inpainter), evaluation.default_map(autoencoder)
  maps = (pixel_name, residual_name, "inpaint_shapley", "inpaint_loo")

  defective = _round_robin(test_split.defect_types, config.n_explain)
  log(f"[4/5] explaining {len(defective)} defective test images with the inpainter ({config.n_perm} permutations, "
      f"up to {config.max_regions} regions)")
  explain_started = time.perf_counter()
  records = explain_files([test_split.paths[i] for i in defective], params=inpainter,
                          out_dir=out_dir / "explanations", n_perm=config.n_perm,
                          max_regions=config.max_regions, key=jax.random.fold_in(key, 1), progress=progress)
  explain_seconds = time.perf_counter() - explain_started

  log(f"[5/5] scoring the {len(test_split.paths)} test images by {', '.join(maps)}")
  score_started = time.perf_counter()
  scored = evaluation.evaluate(inpainter, test_split, maps=maps, reference=autoencoder, n_perm=config.n_perm,
                               regions=(config.max_regions,), seed=seed, progress=progress)
  score_seconds = time.perf_counter() - score_started

  rows = np.asarray(defective, int)
  columns = {pixel_name: np.stack([r["pixel_map_values"] for r in records]),
             "Shapley map": np.stack([np.asarray(masking.heatmap(r["values"], r["labels"])) for r in records]),
             residual_name: np.stack([evaluation.image_map(autoencoder, test_split.images[i]) for i in defective])}
  per_image = []
  for row, (i, record) in enumerate(zip(defective, records)):
    truth = test_split.masks[i]
    per_image.append({
        "image": record["image"], "defect_type": test_split.defect_types[i],
        "top_region_hits_defect": record.get("ground_truth", {}).get("top_region_hits_defect"),
        f"pixel_auroc_{pixel_name}": _pixel_auroc(columns[pixel_name][row], truth),
        "pixel_auroc_shapley": _pixel_auroc(columns["Shapley map"][row], truth),
        f"pixel_auroc_{residual_name}": _pixel_auroc(columns[residual_name][row], truth),
        "figure": record["figure"]})
  plots.plot_overlay_grid(test_split.images[rows], columns, masks=test_split.masks[rows],
                          region_labels={"Shapley map": np.stack([r["labels"] for r in records])},
                          row_titles=[f"{Path(r['image']).name} ({test_split.defect_types[i]})"
                                      for i, r in zip(defective, records)],
                          title=f"{len(records)} defective test images: the inpainter's {pixel_name} map, its "
                                f"game's Shapley map ({config.n_perm} permutations, up to {config.max_regions} "
                                f"regions) and the autoencoder's {residual_name} map", path=out_dir / "overview.png")
  hits = [p["top_region_hits_defect"] for p in per_image if p["top_region_hits_defect"] is not None]
  summary = {
      "out_dir": str(out_dir), "seed": seed, "image_size": config.image_size,
      "n_test": int(scored["n_images"]), "default_map": pixel_name, "reference_map": residual_name,
      "maps": {name: _map_scores(scored["maps"][name]) for name in maps},
      "autoencoder": trained["autoencoder"], "inpainter": trained["inpainter"],
      "explain_seconds": round(explain_seconds, 1), "score_seconds": round(score_seconds, 1),
      "total_seconds": round(time.perf_counter() - started, 1),
      "n_perm": config.n_perm, "max_regions": config.max_regions,
      "top_region_hit_rate": float(np.mean(hits)) if hits else None,
      **{f"mean_pixel_auroc_{column}": _mean_or_none([p[f"pixel_auroc_{column}"] for p in per_image])
         for column in (pixel_name, "shapley", residual_name)},
      "images": per_image,
      "overview": str(out_dir / "overview.png"),
  }
  (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
  (out_dir / "summary.md").write_text(_summary_markdown(summary))
  return summary


def _map_scores(result: dict) -> dict:
  """One map's overall metrics from :func:`shapjax.evaluate` (None where undefined), its cost, and per type."""
  overall = result["overall"] or dict.fromkeys(("image_auroc", "pixel_auroc", "aupro", "n_images"))
  return {**overall, "seconds_per_image": result["seconds_per_image"], "per_type": result["per_type"]}


def _mean_or_none(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def _fmt(value) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, float):
    return f"{value:.3f}"
  return str(value)


_MAP_NOTES = {
    "inpaint_grid": "the inpainter's own map: grid cells hidden and inpainted, each pixel's error (default)",
    "residual": "the autoencoder's per-pixel reconstruction error",
    "inpaint_shapley": "Shapley values of SLIC regions in the inpainting game, per unit area",
    "inpaint_loo": "the error of hiding each region alone (leave-one-out)",
}


def _summary_markdown(summary: dict) -> str:
  pixel_name, residual_name = summary["default_map"], summary["reference_map"]
  autoencoder, inpainter = summary["autoencoder"], summary["inpainter"]
  lines = [
      "# shapjax demo", "",
      f"Trained an autoencoder ({autoencoder['steps']} steps, {autoencoder['train_seconds']} s) and an inpainter "
      f"({inpainter['steps']} steps, {inpainter['train_seconds']} s); explained {len(summary['images'])} images in "
      f"{summary['explain_seconds']} s; scored {summary['n_test']} test images in {summary['score_seconds']} s; "
      f"total {summary['total_seconds']} s.", "",
      f"## Maps on the whole test split ({summary['n_test']} images)", "",
      "| map | image AUROC | pixel AUROC | AUPRO@0.3 | s / image | what |",
      "|---|---|---|---|---|---|",
  ]
  for name, scores in summary["maps"].items():
    lines.append(f"| {name} | {_fmt(scores['image_auroc'])} | {_fmt(scores['pixel_auroc'])} | "
                 f"{_fmt(scores['aupro'])} | {scores['seconds_per_image']:.2f} | {_MAP_NOTES.get(name, '')} |")
  lines += [
      "", f"Game maps: {summary['n_perm']} permutations, up to {summary['max_regions']} regions per image.", "",
      f"## Explained images (the inpainter's game, its {pixel_name} map, the autoencoder's {residual_name} map)", "",
      f"- top region touches the defect: {_fmt(summary['top_region_hit_rate'])} of images",
      f"- mean pixel AUROC, {pixel_name}: {_fmt(summary[f'mean_pixel_auroc_{pixel_name}'])}; Shapley map: "
      f"{_fmt(summary['mean_pixel_auroc_shapley'])}; {residual_name}: "
      f"{_fmt(summary[f'mean_pixel_auroc_{residual_name}'])}", "",
      f"| image | defect | top region hits defect | pixel AUROC {pixel_name} | pixel AUROC Shapley | "
      f"pixel AUROC {residual_name} |",
      "|---|---|---|---|---|---|",
  ]
  for item in summary["images"]:
    lines.append(f"| {Path(item['image']).name} | {item['defect_type']} | {_fmt(item['top_region_hits_defect'])} | "
                 f"{_fmt(item[f'pixel_auroc_{pixel_name}'])} | {_fmt(item['pixel_auroc_shapley'])} | "
                 f"{_fmt(item[f'pixel_auroc_{residual_name}'])} |")
  return "\n".join(lines) + "\n"
