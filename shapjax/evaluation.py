"""Anomaly maps from one trained autoencoder, and their evaluation on an MVTec-layout test split.

Every map is built from the same per-image parts, computed once and cached on disk:

* ``residual``: the per-pixel squared reconstruction error, Gaussian-smoothed.
* ``shapley``: the Shapley value of each SLIC region (:func:`shapjax.attribute`) painted on its pixels,
  averaged over the SLIC scales.
* ``shapley_area``: the Shapley value divided by the region's share of the image, i.e. the loss per pixel that
  the region accounts for (the same units as the residual), so that large regions do not win by size alone.
* ``residual_x_shapley``: the residual map times the (non-negative part of the) ``shapley_area`` map: pixel
  detail from the residual, gated by whether the region the pixel lies in raises the loss.
* ``residual_x_shapley_norm``: the residual map times the ``shapley_area`` map min-max normalised per image, so
  in every image the region that raises the loss most keeps its residual and the others are damped.

Controls without Shapley values, on the same SLIC regions:

* ``pooled_residual``: the residual averaged over each region (what ``shapley_area`` would be if the game were
  additive: if every region's pixels only changed that region's own loss).
* ``residual_x_pooled_norm``: ``residual_x_shapley_norm`` with ``pooled_residual`` in place of ``shapley_area``.

A Shapley map that does not beat its pooled control only re-states the residual.

An inpainter checkpoint (:func:`shapjax.init_inpainter`, ``shapjax train --model inpainting``) has its own maps
(:data:`INPAINT_MAPS`, its default): ``inpaint_shapley``, the Shapley value of each region in the inpainting
game (hidden regions inpainted from the visible ones, :func:`shapjax.inpainted_value_fn`) per unit area, as
``shapley_area``; its controls ``inpaint_loo``, the leave-one-out value (the error of hiding that region alone)
per unit area, and ``inpaint_grid``, the model's own map without a game: square cells of 8 and 16 px hidden in
four checkerboard passes per size, each pixel's error from the pass that hid it, averaged over the sizes (as
RIAD does). The baseline setting does not apply.

Any Shapley map name takes an ablation suffix: ``":constant"`` replaces each image's region values by their
mean, ``":shuffled"`` permutes them among the image's regions. A map whose score survives these ablations does
not use the Shapley values.

The image-level score of every map is its maximum. Maps are scored at each ground-truth mask's original size
(bilinear upsampling) with :mod:`shapjax.metrics`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
import skimage.transform

from shapjax import attribution, inpainting, masking, metrics, model, sampling, segmentation, speedups

SHAPLEY_MAPS = ("shapley", "shapley_area", "residual_x_shapley", "residual_x_shapley_norm")
POOLED_MAPS = ("pooled_residual", "residual_x_pooled_norm")
# An inpainter checkpoint's maps: the inpainting game's Shapley values and leave-one-out values per unit area, and
# the model's own grid-hiding error (no game): the only maps it has, and its default.
INPAINT_MAPS = ("inpaint_shapley", "inpaint_loo", "inpaint_grid")
INPAINT_GRID_CELLS = (8, 16)
BASE_MAPS = ("residual", *SHAPLEY_MAPS, *POOLED_MAPS, *INPAINT_MAPS)
"""Names of the anomaly maps; the Shapley ones also take the suffixes ``:constant`` and ``:shuffled``."""
ABLATIONS = ("constant", "shuffled")
DEFAULT_MAPS = ("residual", "shapley", "shapley_area", "residual_x_shapley", "residual_x_shapley_norm")
DEFAULT_N_PERM = 8
DEFAULT_REGIONS = (32,)
DEFAULT_BASELINE = "reconstruction"
DEFAULT_SIGMA = 2.0
_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class MapSettings:
  """How the per-image parts are computed (everything the cache key depends on).

  Attributes:
    n_perm: permutations per image (even: antithetic pairs).
    regions: SLIC scales: one ``max_regions`` per scale; the Shapley maps average over them.
    baseline: ``"reconstruction"`` (absent regions become the autoencoder's reconstruction of the image,
      meant as a defect-free look-alike), or any baseline of :func:`shapjax.attribute` (``"blur"``, ``"mean"``,
      ``"zeros"``, a float).
    estimator: ``"permutation"``, ``"antithetic"``, ``"stratified"`` or ``"kernel"`` (see
      :func:`shapjax.shapley_values`).
    sigma: Gaussian smoothing of every map, in model pixels.
    seed: seed of the permutation keys (image ``i`` of the full split uses ``fold_in(key(seed), i)``).
  """

  n_perm: int = DEFAULT_N_PERM
  regions: tuple[int, ...] = DEFAULT_REGIONS
  baseline: str | float = DEFAULT_BASELINE
  estimator: str = sampling.DEFAULT_ESTIMATOR
  sigma: float = DEFAULT_SIGMA
  seed: int = 0

  def __post_init__(self):
    regions = (self.regions,) if isinstance(self.regions, (int, np.integer)) else tuple(self.regions)
    object.__setattr__(self, "regions", tuple(int(r) for r in regions))
    if not self.regions or min(self.regions) < 2:
      raise ValueError(f"regions must be one or more ints >= 2, got {self.regions}")
    if isinstance(self.baseline, str) and self.baseline not in ("reconstruction", *masking.BASELINES):
      raise ValueError(f"baseline must be 'reconstruction', one of {masking.BASELINES}, or a float; "
                       f"got {self.baseline!r}")


def parse_map_name(name: str) -> tuple[str, str | None]:
  """Splits a map name into ``(base, ablation)``: ``"shapley_area:shuffled"`` -> ``("shapley_area", "shuffled")``.

  Raises:
    ValueError: naming the map, for an unknown base map or ablation.
  """
  base, _, ablation = name.partition(":")
  if base not in BASE_MAPS:
    raise ValueError(f"unknown map {name!r}; choose from {BASE_MAPS} (Shapley maps may end in "
                     f"{[':' + a for a in ABLATIONS]})")
  if ablation and (ablation not in ABLATIONS or base not in SHAPLEY_MAPS):
    raise ValueError(f"unknown ablation in {name!r}: Shapley maps take {[':' + a for a in ABLATIONS]}")
  return base, ablation or None


def _needs_shapley(names: Sequence[str]) -> bool:
  return any(parse_map_name(n)[0] not in ("residual", "inpaint_grid") for n in names)


def _check_maps_for_model(names: list[str], params, *, default: bool) -> list[str]:
  """The map names a model kind has: an inpainter only :data:`INPAINT_MAPS` (its default), an autoencoder
  all others."""
  inpainter = model.model_kind(params) == "inpainting"
  if inpainter and default:
    return list(INPAINT_MAPS)
  wrong = [n for n in names if (parse_map_name(n)[0] in INPAINT_MAPS) != inpainter]
  if wrong:
    kind, allowed = ("an inpainter", INPAINT_MAPS) if inpainter else ("an autoencoder", BASE_MAPS[:-3])
    raise ValueError(f"maps {wrong} are not available for {kind}; choose from {allowed}")
  return names


# --- Per-image parts ---------------------------------------------------------------------------------------------

@speedups.jit_forward
def _reconstruct_one(params: model.AutoencoderParams, image: jax.Array) -> tuple[jax.Array, jax.Array]:
  reconstruction = model.reconstruct(params, image[None])[0]
  return reconstruction, jnp.mean(jnp.square(reconstruction - image), axis=-1)


def image_parts(params: model.AutoencoderParams, image: np.ndarray, *, settings: MapSettings, key: jax.Array,
                shapley: bool = True) -> dict[str, np.ndarray]:
  """Everything the maps of one image are built from.

  Args:
    params: the autoencoder.
    image: ``f32[H, W, C]`` at the model's size.
    settings: :class:`MapSettings`.
    key: PRNG key of this image's permutations.
    shapley: also segment and attribute (else only the residual).

  Returns:
    ``residual: f32[H, W]`` (unsmoothed), ``residual_seconds``, and with ``shapley``, for each scale ``k``:
    ``labels_k: i32[H, W]``, ``values_k: f32[max_regions]`` and ``additivity_k`` (the game's additivity,
    :class:`shapjax.ShapleyResult`), and ``shapley_seconds``.
  """
  if model.model_kind(params) == "inpainting":
    return _inpainter_parts(params, image, settings=settings, key=key, shapley=shapley)
  start = time.perf_counter()
  image = jnp.asarray(image, jnp.float32)
  reconstruction, residual = jax.block_until_ready(_reconstruct_one(params, image))
  parts = {"residual": np.asarray(residual), "residual_seconds": np.float64(time.perf_counter() - start)}
  if shapley:
    start = time.perf_counter()
    # The reconstruction is meant as a defect-free look-alike (absent regions look normal, not blurred); the
    # autoencoder partly copies a defect into it.
    baseline = reconstruction if settings.baseline == "reconstruction" else settings.baseline
    for k, max_regions in enumerate(settings.regions):
      labels = segmentation.segment(np.asarray(image), max_regions=max_regions)
      result = attribution.attribute(params, image, labels, settings.n_perm, key=jax.random.fold_in(key, k),
                                     baseline=baseline, max_regions=max_regions, estimator=settings.estimator)
      parts[f"labels_{k}"] = labels
      parts[f"values_{k}"] = np.asarray(jax.block_until_ready(result.values))
      parts[f"additivity_{k}"] = np.float32(result.additivity)
    parts["shapley_seconds"] = np.float64(time.perf_counter() - start)
  return parts


@speedups.jit_forward
def _grid_error_one(params, image: jax.Array) -> jax.Array:
  return masking.grid_inpainting_error(lambda x, visible: inpainting.inpaint(params, x, visible), image,
                                       cell_sizes=INPAINT_GRID_CELLS)


def _inpainter_parts(params, image: np.ndarray, *, settings: MapSettings, key: jax.Array,
                     shapley: bool) -> dict[str, np.ndarray]:
  """:func:`image_parts` of an inpainter: ``residual`` is the grid-hiding error (the ``inpaint_grid`` map), the
  values of each scale those of the inpainting game (no baseline), with its leave-one-out values as ``loo_k``."""
  start = time.perf_counter()
  image = jnp.asarray(image, jnp.float32)
  grid = jax.block_until_ready(_grid_error_one(params, image))
  parts = {"residual": np.asarray(grid), "residual_seconds": np.float64(time.perf_counter() - start)}
  if shapley:
    start = time.perf_counter()
    for k, max_regions in enumerate(settings.regions):
      labels = segmentation.segment(np.asarray(image), max_regions=max_regions)
      result = attribution.attribute(params, image, labels, settings.n_perm, key=jax.random.fold_in(key, k),
                                     max_regions=max_regions, estimator=settings.estimator, game="inpainting")
      loo = attribution.attribute(params, image, labels, 1, max_regions=max_regions, index="loo",
                                  game="inpainting")
      parts[f"labels_{k}"] = labels
      parts[f"values_{k}"] = np.asarray(jax.block_until_ready(result.values))
      parts[f"loo_{k}"] = np.asarray(jax.block_until_ready(loo.values))
      parts[f"additivity_{k}"] = np.float32(result.additivity)
    parts["shapley_seconds"] = np.float64(time.perf_counter() - start)
  return parts


def _ablate(values: np.ndarray, n_regions: int, ablation: str | None, seed: int) -> np.ndarray:
  values = np.array(values, np.float64)
  real = values[:n_regions]
  if ablation == "constant":
    real[:] = real.mean()
  elif ablation == "shuffled":
    real[:] = np.random.default_rng(seed).permutation(real)
  return values


def _region_map(parts, n_scales: int, *, per_area: bool, ablation: str | None, seed: int,
                pooled: bool = False, values_part: str = "values") -> np.ndarray:
  maps = []
  for k in range(n_scales):
    labels = parts[f"labels_{k}"]
    n_regions = int(labels.max()) + 1
    if pooled:  # the Shapley values of the additive game v(S) = mean residual over the pixels of S's regions
      residual = np.asarray(parts["residual"], np.float64)
      values = np.bincount(labels.ravel(), residual.ravel(), n_regions) / residual.size
    else:
      values = _ablate(parts[f"{values_part}_{k}"], n_regions, ablation, seed + k)
    if per_area:
      area = np.bincount(labels.ravel(), minlength=values.size).astype(np.float64)
      values = values * labels.size / np.maximum(area, 1.0)
    maps.append(values[labels])
  return np.mean(maps, axis=0)


def anomaly_map(name: str, parts: dict[str, np.ndarray], *, settings: MapSettings, seed: int = 0) -> np.ndarray:
  """One anomaly map of one image from its parts (:func:`image_parts`).

  Args:
    name: one of :data:`BASE_MAPS`, optionally with an ablation suffix (``"shapley_area:shuffled"``).
    parts: from :func:`image_parts`.
    settings: the :class:`MapSettings` the parts were computed with.
    seed: seed of the ``:shuffled`` ablation's permutation.

  Returns:
    ``f32[H, W]`` at the model's size; higher is more anomalous.
  """
  base, ablation = parse_map_name(name)
  smooth = lambda m: scipy.ndimage.gaussian_filter(m, settings.sigma, mode="nearest") if settings.sigma > 0 else m
  residual = smooth(np.asarray(parts["residual"], np.float64))
  if base in ("residual", "inpaint_grid"):  # an inpainter's parts hold its grid error as the residual
    return residual.astype(np.float32)
  n_scales = len(settings.regions)
  if base in ("inpaint_shapley", "inpaint_loo"):  # per unit area: the grid error's units
    values_part = "values" if base == "inpaint_shapley" else "loo"
    return smooth(_region_map(parts, n_scales, per_area=True, ablation=None, seed=seed,
                              values_part=values_part)).astype(np.float32)
  if base == "shapley":
    return smooth(_region_map(parts, n_scales, per_area=False, ablation=ablation, seed=seed)).astype(np.float32)
  pooled = base in POOLED_MAPS
  density = smooth(_region_map(parts, n_scales, per_area=True, ablation=ablation, seed=seed, pooled=pooled))
  if base in ("shapley_area", "pooled_residual"):
    return density.astype(np.float32)
  if base in ("residual_x_shapley_norm", "residual_x_pooled_norm"):
    span = float(density.max() - density.min())
    gate = (density - density.min()) / span if span > 0 else np.ones_like(density)
    return (residual * gate).astype(np.float32)
  return (residual * np.maximum(density, 0.0)).astype(np.float32)


# --- Evaluation --------------------------------------------------------------------------------------------------

def stratified_subset(defect_types: Sequence[str], limit: int | None) -> np.ndarray:
  """A fixed subset of about ``limit`` indices with every defect type in proportion (at least one each).

  Indices are evenly spaced within each type, so the same ``limit`` always picks the same images.
  """
  n = len(defect_types)
  if limit is None or limit >= n:
    return np.arange(n)
  if limit < 1:
    raise ValueError(f"limit must be >= 1, got {limit}")
  types = np.asarray(defect_types)
  picked = []
  for t in sorted(set(defect_types)):
    members = np.flatnonzero(types == t)
    take = max(1, int(round(limit * members.size / n)))
    picked.extend(members[np.linspace(0, members.size - 1, min(take, members.size)).round().astype(int)])
  return np.unique(np.asarray(picked, int))


def _params_digest(params: model.AutoencoderParams) -> str:
  digest = hashlib.sha256(json.dumps(params.config.to_dict(), sort_keys=True).encode())
  for leaf in jax.tree_util.tree_leaves(params.weights):
    digest.update(np.asarray(leaf).tobytes())
  return digest.hexdigest()


def _settings_digest(params_digest: str, settings: MapSettings) -> str:
  record = dict(dataclasses.asdict(settings), version=_CACHE_VERSION, params=params_digest)
  record.pop("sigma")  # smoothing is applied when the maps are built, not cached
  return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_parts(path: Path, shapley: bool):
  if not path.is_file():
    return None
  try:
    with np.load(path) as stored:
      parts = dict(stored)
  except (OSError, ValueError, EOFError):  # a file cut short by an interruption: compute it again
    return None
  if shapley and "shapley_seconds" not in parts:
    return None
  return parts


def _save_parts(path: Path, parts) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.stem + ".partial.npz")
  np.savez(partial, **parts)
  os.replace(partial, path)  # atomic: an interrupted run never leaves a half-written cache entry


def _upsample(image_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  if tuple(image_map.shape) == tuple(size):
    return image_map
  return skimage.transform.resize(image_map, size, order=1, mode="edge", anti_aliasing=False,
                                  preserve_range=True).astype(np.float32)


def _load_split(data_or_split, params: model.AutoencoderParams):
  if hasattr(data_or_split, "original_masks"):  # an MVTecSplit
    return data_or_split
  from shapjax import data  # pylint: disable=g-import-not-at-top
  height, width, channels = params.config.image_shape
  return data.load_mvtec(data_or_split, split="test", image_size=(height, width), channels=channels)


def evaluate(
    params: model.AutoencoderParams,
    data_or_split,
    *,
    maps: Sequence[str] = DEFAULT_MAPS,
    n_perm: int = DEFAULT_N_PERM,
    regions: int | Sequence[int] = DEFAULT_REGIONS,
    baseline: str | float = DEFAULT_BASELINE,
    estimator: str = sampling.DEFAULT_ESTIMATOR,
    sigma: float = DEFAULT_SIGMA,
    seed: int = 0,
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    figures_dir: str | os.PathLike | None = None,
    n_figure_images: int = 8,
    progress: bool = True,
) -> dict:
  """Scores anomaly maps of one autoencoder on a test split: image AUROC, pixel AUROC, AUPRO@0.3.

  For each test image the residual and (when a Shapley map is asked for) the SLIC labels and Shapley values
  at every scale are computed once, then every map is derived from them. With ``cache_dir`` these per-image
  parts are saved as one ``.npz`` per image, under a folder named by a hash of the weights and the settings,
  so an interrupted run resumes where it stopped and other maps of the same settings cost nothing.

  Metrics are computed overall and per defect type (that type's images plus all good images), with every
  map upsampled to its mask's original size.

  Args:
    params: the trained autoencoder.
    data_or_split: an MVTec-layout folder (its test split is loaded at the model's image size) or a
      :class:`shapjax.data.MVTecSplit` at the model's size.
    maps: names from :data:`BASE_MAPS`, Shapley ones optionally with ``":constant"`` or ``":shuffled"``.
    n_perm: permutations per image and scale.
    regions: SLIC ``max_regions``, or several (one per scale; the Shapley maps average them).
    baseline: ``"reconstruction"``, ``"blur"``, ``"mean"``, ``"zeros"`` or a float (see :class:`MapSettings`).
    estimator: ``"permutation"``, ``"antithetic"``, ``"stratified"`` or ``"kernel"`` (see
      :func:`shapjax.shapley_values`).
    sigma: Gaussian smoothing of the maps, in model pixels.
    seed: seed of the permutation keys and of the ``:shuffled`` ablation.
    limit: evaluate a fixed stratified subset of about this many images (:func:`stratified_subset`).
    cache_dir: folder for the per-image cache; ``None`` caches nothing.
    figures_dir: when given, writes ``overlays.png`` (image, ground truth, each map) for a sample of images.
    n_figure_images: images in the overlay figure (spread over the defect types).
    progress: show a progress bar.

  Several processes (after ``jax.distributed.initialize()``): call it on every process with the same
  arguments; each computes every ``n``-th image (each on its own default device) and every process returns the
  whole result, the same as one process's (but for the timings). Only process 0 writes the figure.

  Returns:
    A JSON-ready dict: ``settings``, ``n_images``, ``maps`` (name -> ``overall`` and ``per_type`` metrics,
    ``seconds_per_image``), ``images`` (path, defect type, image score of every map, and ``additivity``: the
    image's game's additivity at each region scale, :class:`shapjax.ShapleyResult`, None without Shapley maps
    or for an entry cached before it was recorded) and ``cached_images``
    (how many came from the cache).
  """
  names = list(dict.fromkeys(maps))
  for name in names:
    parse_map_name(name)
  names = _check_maps_for_model(names, params, default=tuple(maps) == DEFAULT_MAPS)
  settings = MapSettings(n_perm=int(n_perm), regions=regions, baseline=baseline, estimator=estimator,
                         sigma=float(sigma), seed=int(seed))
  sampling.check_counts(max(settings.regions), settings.n_perm, sampling.DEFAULT_BATCH_SIZE, estimator)
  split = _load_split(data_or_split, params)
  if tuple(split.images.shape[1:]) != tuple(params.config.image_shape):
    raise ValueError(f"test images have shape {split.images.shape[1:]} but the model expects "
                     f"{params.config.image_shape}; load the split at the model's size")
  indices = stratified_subset(split.defect_types, limit)
  shapley = _needs_shapley(names)
  cache = None
  if cache_dir is not None:
    cache = Path(cache_dir) / _settings_digest(_params_digest(params), settings)
  key = jax.random.key(settings.seed)

  image_maps = {name: [] for name in names}
  seconds = {name: [] for name in names}
  additivity = {}  # image index -> the game's additivity at each scale (None without Shapley maps)
  cached = 0
  # Several processes: each takes every n-th image (all defect types on every host) and the maps are gathered.
  iterator = mine = indices[jax.process_index()::jax.process_count()]
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    iterator = tqdm.tqdm(mine, desc="evaluate", unit="image", dynamic_ncols=True)
  for index in iterator:
    index = int(index)
    path = None
    if cache is not None:
      stem = Path(split.paths[index]).stem
      digest = hashlib.sha256(np.ascontiguousarray(split.images[index]).tobytes()).hexdigest()[:12]
      path = cache / f"{split.defect_types[index]}_{stem}_{digest}.npz"
    parts = _load_parts(path, shapley) if path is not None else None
    if parts is None:
      parts = image_parts(params, split.images[index], settings=settings, key=jax.random.fold_in(key, index),
                          shapley=shapley)
      if path is not None:
        _save_parts(path, parts)
    else:
      cached += 1
    # Entries cached before the additivity was recorded lack it: None, not a recomputation.
    additivity[index] = [_finite_or_none(parts.get(f"additivity_{k}")) for k in range(len(settings.regions))]
    for name in names:
      image_maps[name].append(anomaly_map(name, parts, settings=settings, seed=settings.seed + index))
      cost = float(parts["residual_seconds"])
      if _needs_shapley([name]):
        cost += float(parts["shapley_seconds"])
      seconds[name].append(cost)
  if jax.process_count() > 1:
    image_maps, seconds, cached = _gather_processes(names, image_maps, seconds, cached, len(indices),
                                                    params.config.image_shape[:2])
    additivity = _gather_additivity(additivity, indices, len(settings.regions))

  types = [split.defect_types[i] for i in indices]
  labels = np.asarray([t != "good" for t in types], np.int32)
  masks = [np.asarray(split.original_masks[i], bool) for i in indices]
  groups = {"overall": np.ones(len(indices), bool)}
  for t in sorted(set(types) - {"good"}):
    groups[t] = np.asarray([u in (t, "good") for u in types])
  results = {}
  groups = {g: member for g, member in groups.items() if any(masks[i].any() for i in np.flatnonzero(member))}
  for name in names:
    full = [_upsample(m, g.shape) for m, g in zip(image_maps[name], masks)]
    image_scores = np.asarray([float(m.max()) for m in image_maps[name]])
    pixel = metrics.grouped_pixel_metrics(full, masks, groups) if groups else {}
    per_group = {}
    for group, member in groups.items():
      has_both = 0 < int(labels[member].sum()) < int(member.sum())
      per_group[group] = {
          "image_auroc": metrics.image_auroc(image_scores[member], labels[member]) if has_both else None,
          "pixel_auroc": pixel[group].pixel_auroc,
          "aupro": pixel[group].aupro,
          "n_images": int(member.sum()),
      }
    results[name] = {
        "overall": per_group.get("overall"),
        "per_type": {g: s for g, s in per_group.items() if g != "overall"},
        "seconds_per_image": float(np.mean(seconds[name])) if seconds[name] else 0.0,
    }
    del full

  if figures_dir is not None and jax.process_index() == 0:  # one figure, not one per host
    _save_overlays(split, indices, image_maps, Path(figures_dir) / "overlays.png", n_figure_images)
  return {
      "settings": dataclasses.asdict(settings),
      "model": params.config.to_dict(),
      "n_images": int(len(indices)),
      "cached_images": int(cached),
      "maps": results,
      "images": [{"path": split.paths[i], "defect_type": split.defect_types[i],
                  "scores": {name: float(image_maps[name][j].max()) for name in names},
                  "additivity": additivity.get(int(i)) if shapley else None}
                 for j, i in enumerate(indices)],
  }


def _finite_or_none(value):
  return None if value is None or not np.isfinite(float(value)) else float(value)


def _gather_additivity(local: dict, indices, n_scales: int) -> dict:
  """Every process's per-image additivity -> all of them (process ``p`` holds images ``p, p + n, ...``)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  n_processes = jax.process_count()
  n_max = -(-len(indices) // n_processes)
  array = np.full((n_max, n_scales), np.nan, np.float32)
  for j, i in enumerate(indices[jax.process_index()::n_processes]):
    array[j] = [np.nan if v is None else v for v in local.get(int(i), [None] * n_scales)]
  gathered = np.asarray(multihost_utils.process_allgather(array))  # [processes, n_max, scales]
  return {int(i): [_finite_or_none(v) for v in gathered[p, j]]
          for p in range(n_processes) for j, i in enumerate(indices[p::n_processes])}


def _gather_processes(names, image_maps, seconds, cached: int, n_images: int, shape):
  """Every process's maps, seconds and cache count -> all of them, in the order of the images (every host).

  Process ``p`` holds images ``p, p + n, p + 2n, ...`` of the ``n_images``; the others are gathered from their
  processes (``multihost_utils.process_allgather``, padded to one shape).
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  n_processes = jax.process_count()
  n_max = -(-n_images // n_processes)
  local_maps = np.zeros((n_max, len(names), *shape), np.float32)
  local_seconds = np.zeros((n_max, len(names)), np.float64)
  for j, name in enumerate(names):
    local_maps[:len(image_maps[name]), j] = image_maps[name]
    local_seconds[:len(seconds[name]), j] = seconds[name]
  all_maps, all_seconds, all_cached = (np.asarray(x) for x in multihost_utils.process_allgather(
      (local_maps, local_seconds.astype(np.float32), np.int32(cached))))
  order = [(i % n_processes, i // n_processes) for i in range(n_images)]  # image i: (its process, its row)
  maps = {name: [all_maps[p, row, j] for p, row in order] for j, name in enumerate(names)}
  times = {name: [float(all_seconds[p, row, j]) for p, row in order] for j, name in enumerate(names)}
  return maps, times, int(all_cached.sum())


def _save_overlays(split, indices, image_maps, path: Path, n_images: int) -> None:
  from shapjax import plots  # pylint: disable=g-import-not-at-top
  types = [split.defect_types[i] for i in indices]
  # Round-robin over the defect types (defective first), so the sample shows each kind of defect.
  by_type = {t: [j for j, u in enumerate(types) if u == t] for t in sorted(set(types), key=lambda t: t == "good")}
  picked = []
  while len(picked) < min(n_images, len(indices)):
    for members in by_type.values():
      if members and len(picked) < n_images:
        picked.append(members.pop(0))
  rows = [int(indices[j]) for j in picked]
  figure_maps = {name: np.stack([image_maps[name][j] for j in picked]) for name in image_maps}
  plots.plot_overlay_grid(split.images[rows], figure_maps, masks=split.masks[rows],
                          row_titles=[f"{split.defect_types[i]}/{Path(split.paths[i]).stem}" for i in rows],
                          path=path)


def format_table(result: dict, *, per_type: bool = True) -> str:
  """The metrics of :func:`evaluate` as markdown tables (overall, then one per defect type)."""

  def fmt(x):
    return "-" if x is None else f"{x:.3f}"

  def table(title, rows):
    lines = [f"**{title}**", "", "| map | image AUROC | pixel AUROC | AUPRO@0.3 | s / image |",
             "|---|---|---|---|---|"]
    lines += rows
    return "\n".join(lines) + "\n"

  maps = result["maps"]
  out = [table(f"overall ({result['n_images']} images)",
               [f"| {name} | {fmt(m['overall']['image_auroc'])} | {fmt(m['overall']['pixel_auroc'])} | "
                f"{fmt(m['overall']['aupro'])} | {m['seconds_per_image']:.2f} |"
                for name, m in maps.items() if m["overall"]])]
  if per_type:
    types = sorted({t for m in maps.values() for t in m["per_type"]})
    for t in types:
      out.append(table(t, [f"| {name} | {fmt(m['per_type'][t]['image_auroc'])} | "
                            f"{fmt(m['per_type'][t]['pixel_auroc'])} | {fmt(m['per_type'][t]['aupro'])} | "
                            f"{m['seconds_per_image']:.2f} |" for name, m in maps.items() if t in m["per_type"]]))
  return "\n".join(out)


def write_json(result: dict, path: str | os.PathLike) -> Path:
  """Writes :func:`evaluate`'s result as indented JSON (creating the folder)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1, default=lambda x: x.item() if hasattr(x, "item") else str(x)))
  return path

