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

An inpainter checkpoint (:func:`shapjax.init_inpainter`, ``shapjax train --model inpainting``) has its own maps,
named after the semivalue of the inpainting game (hidden regions inpainted from the visible ones,
:func:`shapjax.inpainted_value_fn`) they paint, each per unit area as ``shapley_area``:

* ``inpaint_shapley``, ``inpaint_banzhaf``, ``inpaint_beta_A_B`` (Beta Shapley with ``alpha = A``,
  ``beta = B``, e.g. ``inpaint_beta_16_1``, which weights small coalitions of visible regions, or
  ``inpaint_beta_1_4``, which weights near-full ones): the game maps.
* ``inpaint_loo``: the leave-one-out value, the error of hiding that region alone (a control: no sampling).
* ``inpaint_grid``: the model's own map without a game: square cells of 8 and 16 px hidden in four
  checkerboard passes per size, each pixel's error from the pass that hid it, averaged over the sizes (as RIAD
  does).
* ``inpaint_grid_x_<index>`` (e.g. ``inpaint_grid_x_shapley``): the grid map gated by that game map, min-max
  normalised per image, as ``residual_x_shapley_norm`` gates the residual.
* ``residual``: with ``reference=`` (an autoencoder at the same image size), that autoencoder's residual map.

The baseline setting does not apply to an inpainter.

Any Shapley or inpainting game map takes an ablation suffix: ``":constant"`` replaces each image's region values
by their mean, ``":shuffled"`` permutes them among the image's regions. A map whose score survives these
ablations does not use the game's values.

Each model kind has a default map (:func:`default_map`): its own pixel-level map, ``residual`` for an
autoencoder and ``inpaint_grid`` for an inpainter, the best measured of its kind. :func:`image_map` computes any
one map of one image the way :func:`evaluate` does.

The image-level score of every map is its maximum. Maps are scored at each ground-truth mask's original size
(bilinear upsampling) with :mod:`shapjax.metrics`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
import skimage.transform
from jax.typing import ArrayLike

from shapjax import attribution, inpainting, masking, metrics, model, sampling, segmentation, speedups

SHAPLEY_MAPS = ("shapley", "shapley_area", "residual_x_shapley", "residual_x_shapley_norm")
POOLED_MAPS = ("pooled_residual", "residual_x_pooled_norm")
# An inpainter checkpoint's maps: the inpainting game's semivalues per unit area (``inpaint_<index>``), the grid
# map gated by them (``inpaint_grid_x_<index>``), the controls ``inpaint_loo`` and ``inpaint_grid`` (no game), and
# with a reference autoencoder its ``residual``.
INPAINT_MAPS = ("inpaint_shapley", "inpaint_banzhaf", "inpaint_beta_16_1", "inpaint_beta_1_4", "inpaint_loo",
                "inpaint_grid", "inpaint_grid_x_shapley")
"""Examples of an inpainter's map names; any semivalue fits ``inpaint_<index>`` and ``inpaint_grid_x_<index>``."""
# Each model kind's own pixel-level map (no game): the best measured map of that kind (docs/localization.md), the
# one evaluate() lists first and explain_files() and the demo show beside the region values.
_DEFAULT_MAP_OF_KIND = {"autoencoder": "residual", "inpainting": "inpaint_grid"}
INPAINT_DEFAULT_MAPS = (_DEFAULT_MAP_OF_KIND["inpainting"], "inpaint_shapley", "inpaint_loo")
INPAINT_GRID_CELLS = (8, 16)
BASE_MAPS = ("residual", *SHAPLEY_MAPS, *POOLED_MAPS)
"""Names of an autoencoder's anomaly maps; the Shapley ones also take the suffixes ``:constant`` and ``:shuffled``."""
_INPAINT_PATTERN = re.compile(r"inpaint_(grid_x_)?(shapley|banzhaf|loo|beta_([0-9.]+)_([0-9.]+))")
ABLATIONS = ("constant", "shuffled")
DEFAULT_MAPS = (_DEFAULT_MAP_OF_KIND["autoencoder"], "shapley", "shapley_area", "residual_x_shapley",
                "residual_x_shapley_norm")
DEFAULT_N_PERM = 8
DEFAULT_REGIONS = (32,)
DEFAULT_BASELINE = "reconstruction"
DEFAULT_SIGMA = 2.0
_CACHE_VERSION = 2


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


def _is_inpainter_map(base: str) -> bool:
  return base == "inpaint_grid" or _INPAINT_PATTERN.fullmatch(base) is not None


def map_index(name: str):
  """The semivalue an inpainter's map paints, in normal form (:func:`shapjax.sampling.check_index`).

  ``"inpaint_shapley"`` -> ``"shapley"``, ``"inpaint_grid_x_beta_16_1:shuffled"`` -> ``("beta", 16.0, 1.0)``;
  None for ``inpaint_grid`` and an autoencoder's maps.

  Raises:
    ValueError: naming the map, for Beta parameters that are not positive numbers.
  """
  match = _INPAINT_PATTERN.fullmatch(name.partition(":")[0])
  if match is None:
    return None
  if match.group(3) is None:
    return match.group(2)
  try:
    return sampling.check_index(("beta", float(match.group(3)), float(match.group(4))))
  except ValueError as error:
    raise ValueError(f"map {name!r}: {error}") from None


def index_label(index) -> str:
  """The name part of a semivalue: ``"shapley"``, ``"banzhaf"``, ``"loo"``, ``("beta", 16, 1)`` -> ``"beta_16_1"``."""
  index = sampling.check_index(index)
  return index if isinstance(index, str) else f"beta_{index[1]:g}_{index[2]:g}"


def parse_map_name(name: str) -> tuple[str, str | None]:
  """Splits a map name into ``(base, ablation)``: ``"shapley_area:shuffled"`` -> ``("shapley_area", "shuffled")``.

  Raises:
    ValueError: naming the map, for an unknown base map or ablation.
  """
  base, _, ablation = name.partition(":")
  if base not in BASE_MAPS and not _is_inpainter_map(base):
    raise ValueError(f"unknown map {name!r}; an autoencoder has {BASE_MAPS}, an inpainter inpaint_grid, "
                     f"inpaint_<index> and inpaint_grid_x_<index> with index shapley, banzhaf, loo or beta_A_B (e.g. "
                     f"{INPAINT_MAPS}); Shapley and inpainting game maps may end in "
                     f"{[':' + a for a in ABLATIONS]}")
  map_index(base)
  game_map = base in SHAPLEY_MAPS or _INPAINT_PATTERN.fullmatch(base) is not None
  if ablation and (ablation not in ABLATIONS or not game_map):
    raise ValueError(f"unknown ablation in {name!r}: Shapley and inpainting game maps take "
                     f"{[':' + a for a in ABLATIONS]}")
  return base, ablation or None


def _needs_shapley(names: Sequence[str]) -> bool:
  """An autoencoder's maps need Shapley values."""
  return any(parse_map_name(n)[0] != "residual" for n in names)


def _game_indices(names: Sequence[str]) -> list:
  """The semivalues an inpainter's maps need, in order, each once."""
  return list(dict.fromkeys(i for i in (map_index(n) for n in names) if i is not None))


def _check_maps_for_model(names: list[str], params, *, default: bool, reference) -> list[str]:
  """The map names a model kind has: an inpainter its own (:data:`INPAINT_DEFAULT_MAPS` by default, plus the
  reference's ``residual``), an autoencoder :data:`BASE_MAPS`."""
  inpainter = model.model_kind(params) == "inpainting"
  if reference is not None:
    if not inpainter or model.model_kind(reference) != "autoencoder":
      raise ValueError("reference= is an autoencoder whose residual map an inpainter's evaluation shows beside its "
                       "own maps; pass it with an inpainter")
    if tuple(reference.config.image_shape) != tuple(params.config.image_shape):
      raise ValueError(f"the reference autoencoder takes images of shape {reference.config.image_shape}, the "
                       f"inpainter {params.config.image_shape}: train both at the same image size")
  if inpainter and default:
    return list(INPAINT_DEFAULT_MAPS) + (["residual"] if reference is not None else [])
  if inpainter:
    wrong = [n for n in names if not _is_inpainter_map(parse_map_name(n)[0])
             and not (n == "residual" and reference is not None)]
    if "residual" in wrong:
      raise ValueError("an inpainter's 'residual' map is its reference autoencoder's: pass reference= "
                       "(shapjax evaluate --reference AE_DIR)")
  else:
    wrong = [n for n in names if _is_inpainter_map(parse_map_name(n)[0])]
  if wrong:
    kind, allowed = (("an inpainter", ("inpaint_grid", "inpaint_<index>", "inpaint_grid_x_<index>"))
                     if inpainter else ("an autoencoder", BASE_MAPS))
    raise ValueError(f"maps {wrong} are not available for {kind}; choose from {allowed}")
  return names


# --- Per-image parts ---------------------------------------------------------------------------------------------

@speedups.jit_forward
def _reconstruct_one(params: model.AutoencoderParams, image: jax.Array) -> tuple[jax.Array, jax.Array]:
  reconstruction = model.reconstruct(params, image[None])[0]
  return reconstruction, jnp.mean(jnp.square(reconstruction - image), axis=-1)


def image_parts(params: model.AutoencoderParams, image: np.ndarray, *, settings: MapSettings, key: jax.Array,
                shapley: bool = True, games: Sequence = ("shapley", "loo"),
                parts: dict | None = None) -> dict[str, np.ndarray]:
  """Everything the maps of one image are built from.

  Args:
    params: the autoencoder or the inpainter.
    image: ``f32[H, W, C]`` at the model's size.
    settings: :class:`MapSettings`.
    key: PRNG key of this image's permutations.
    shapley: an autoencoder's: also segment and attribute (else only the residual).
    games: an inpainter's: the semivalues of the inpainting game to compute (``"shapley"``, ``"banzhaf"``,
      ``("beta", a, b)``, ``"loo"``).
    parts: an inpainter's: parts computed before (a cache entry); only what they lack is computed.

  Returns:
    An autoencoder's: ``residual: f32[H, W]`` (unsmoothed), ``residual_seconds``, and with ``shapley``, for each
    scale ``k``: ``labels_k: i32[H, W]``, ``values_k: f32[max_regions]`` and ``additivity_k`` (the game's
    additivity, :class:`shapjax.ShapleyResult`), and ``shapley_seconds``. An inpainter's: ``grid: f32[H, W]``
    (the grid-hiding error, unsmoothed), ``grid_seconds``, ``labels_k``, and per semivalue with label ``L``
    (:func:`index_label`) ``values_L_k``, ``additivity_L_k`` and ``seconds_L``.
  """
  if model.model_kind(params) == "inpainting":
    return _inpainter_parts(params, image, settings=settings, key=key, games=games, parts=parts)
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


def _inpainter_parts(params, image: np.ndarray, *, settings: MapSettings, key: jax.Array, games: Sequence,
                     parts: dict | None = None) -> dict[str, np.ndarray]:
  """:func:`image_parts` of an inpainter, completing ``parts`` (a cached entry) with what it lacks."""
  parts = dict(parts or {})
  image = jnp.asarray(image, jnp.float32)
  if "grid" not in parts:
    start = time.perf_counter()
    parts["grid"] = np.asarray(jax.block_until_ready(_grid_error_one(params, image)))
    parts["grid_seconds"] = np.float64(time.perf_counter() - start)
  for index in games:
    label = index_label(index)
    if f"seconds_{label}" in parts:
      continue
    start = time.perf_counter()
    for k, max_regions in enumerate(settings.regions):
      if f"labels_{k}" not in parts:
        parts[f"labels_{k}"] = segmentation.segment(np.asarray(image), max_regions=max_regions)
      # The Shapley value uses the settings' estimator, other indices their own default; leave-one-out is exact.
      estimator = settings.estimator if index == "shapley" else None
      result = attribution.attribute(params, image, parts[f"labels_{k}"], 1 if index == "loo" else settings.n_perm,
                                     key=jax.random.fold_in(key, k), max_regions=max_regions, estimator=estimator,
                                     index=index, game="inpainting")
      parts[f"values_{label}_{k}"] = np.asarray(jax.block_until_ready(result.values))
      parts[f"additivity_{label}_{k}"] = np.float32(result.additivity)
    parts[f"seconds_{label}"] = np.float64(time.perf_counter() - start)
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
    name: a map name (:func:`parse_map_name`), optionally with an ablation suffix (``"shapley_area:shuffled"``).
    parts: from :func:`image_parts` (an inpainter's ``residual`` map needs its reference's ``residual`` part).
    settings: the :class:`MapSettings` the parts were computed with.
    seed: seed of the ``:shuffled`` ablation's permutation.

  Returns:
    ``f32[H, W]`` at the model's size; higher is more anomalous.
  """
  base, ablation = parse_map_name(name)
  smooth = lambda m: scipy.ndimage.gaussian_filter(m, settings.sigma, mode="nearest") if settings.sigma > 0 else m
  n_scales = len(settings.regions)
  if _is_inpainter_map(base):
    grid = smooth(np.asarray(parts["grid"], np.float64))
    if base == "inpaint_grid":
      return grid.astype(np.float32)
    values_part = f"values_{index_label(map_index(base))}"
    density = smooth(_region_map(parts, n_scales, per_area=True, ablation=ablation, seed=seed,
                                 values_part=values_part))  # per unit area: the grid error's units
    if not base.startswith("inpaint_grid_x_"):
      return density.astype(np.float32)
    return (grid * _min_max(density)).astype(np.float32)
  residual = smooth(np.asarray(parts["residual"], np.float64))
  if base == "residual":
    return residual.astype(np.float32)
  if base == "shapley":
    return smooth(_region_map(parts, n_scales, per_area=False, ablation=ablation, seed=seed)).astype(np.float32)
  pooled = base in POOLED_MAPS
  density = smooth(_region_map(parts, n_scales, per_area=True, ablation=ablation, seed=seed, pooled=pooled))
  if base in ("shapley_area", "pooled_residual"):
    return density.astype(np.float32)
  if base in ("residual_x_shapley_norm", "residual_x_pooled_norm"):
    return (residual * _min_max(density)).astype(np.float32)
  return (residual * np.maximum(density, 0.0)).astype(np.float32)


def _min_max(density: np.ndarray) -> np.ndarray:
  """A gate in [0, 1]: the map min-max normalised (all ones for a constant map)."""
  span = float(density.max() - density.min())
  return (density - density.min()) / span if span > 0 else np.ones_like(density)


def _map_seconds(name: str, parts) -> float:
  """Seconds one image's map cost: the parts it is built from."""
  base = parse_map_name(name)[0]
  if not _is_inpainter_map(base):
    cost = float(parts["residual_seconds"])
    return cost + (float(parts["shapley_seconds"]) if base != "residual" else 0.0)
  index = map_index(base)
  cost = float(parts[f"seconds_{index_label(index)}"]) if index is not None else 0.0
  return cost + (float(parts["grid_seconds"]) if base == "inpaint_grid" or "_grid_x_" in base else 0.0)


# --- One map of one image ---------------------------------------------------------------------------------------

def default_map(params) -> str:
  """The map a model kind is scored and shown by: its own pixel-level map, which needs no game.

  ``"residual"`` for an autoencoder, ``"inpaint_grid"`` for an inpainter: the best measured map of each kind
  (``docs/localization.md``). :func:`evaluate` lists it first by default, :func:`shapjax.explain_files` draws it
  beside the region values.

  Args:
    params: an autoencoder's or an inpainter's params (or their config).

  Returns:
    A map name (:func:`parse_map_name`).

  Example:
    >>> import shapjax
    >>> from shapjax import evaluation
    >>> evaluation.default_map(shapjax.InpainterConfig.tiny((32, 32, 1)))
    'inpaint_grid'
  """
  return _DEFAULT_MAP_OF_KIND[model.model_kind(params)]


def image_map(
    params: model.ModelParams,
    image: ArrayLike,
    *,
    name: str | None = None,
    settings: MapSettings | None = None,
    index: int = 0,
    reference: model.AutoencoderParams | None = None,
) -> np.ndarray:
  """One anomaly map of one image, computed from the model as :func:`evaluate` computes it.

  The parts the map needs (:func:`image_parts`) are computed and the map is built from them
  (:func:`anomaly_map`): a pixel-level map such as ``residual`` or ``inpaint_grid`` costs one batch of forward
  passes; a game map also segments the image and samples the game.

  Args:
    params: the autoencoder or the inpainter.
    image: ``f32[H, W, C]`` in ``[0, 1]`` at the model's size (``params.config.image_shape``).
    name: a map name (:func:`parse_map_name`) of the model's kind; default :func:`default_map`.
    settings: :class:`MapSettings` (smoothing, and for game maps the regions, permutations, ...); default
      ``MapSettings()``, the settings of :func:`evaluate`'s defaults.
    index: the image's index in the split :func:`evaluate` scores: its game uses the same permutation key
      (``fold_in(key(settings.seed), index)``) and ablation seed, so the map equals the one scored there.
    reference: with an inpainter and ``name="residual"``, the autoencoder whose residual map to compute.

  Returns:
    ``f32[H, W]`` at the model's size; higher is more anomalous.

  Raises:
    ValueError: for a map the model kind does not have, or an image of another shape.

  Example:
    >>> import jax, numpy as np, shapjax
    >>> from shapjax import evaluation
    >>> params = shapjax.init_inpainter((16, 16, 1), key=jax.random.key(0), features=(4, 8))
    >>> evaluation.image_map(params, np.full((16, 16, 1), 0.5, np.float32)).shape
    (16, 16)
  """
  name = default_map(params) if name is None else name
  _check_maps_for_model([name], params, default=False, reference=reference)
  settings = MapSettings() if settings is None else settings
  image = np.asarray(image, np.float32)
  if image.shape != tuple(params.config.image_shape):
    raise ValueError(f"image has shape {image.shape} but the model expects {params.config.image_shape}")
  inpainter = model.model_kind(params) == "inpainting"
  if inpainter and parse_map_name(name)[0] == "residual":  # the reference autoencoder's own map
    return image_map(reference, image, name=name, settings=settings, index=index)
  key = jax.random.fold_in(jax.random.key(settings.seed), index)
  if inpainter:
    parts = image_parts(params, image, settings=settings, key=key, games=_game_indices([name]))
  else:
    parts = image_parts(params, image, settings=settings, key=key, shapley=_needs_shapley([name]))
  return anomaly_map(name, parts, settings=settings, seed=settings.seed + index)


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
    reference: model.AutoencoderParams | None = None,
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
    maps: map names (:func:`parse_map_name`): an autoencoder's from :data:`BASE_MAPS`, an inpainter's
      ``inpaint_grid``, ``inpaint_<index>``, ``inpaint_grid_x_<index>`` (and ``residual`` with ``reference``); game
      maps optionally with ``":constant"`` or ``":shuffled"``. The default: :data:`DEFAULT_MAPS` for an
      autoencoder, :data:`INPAINT_DEFAULT_MAPS` (and the reference's ``residual``) for an inpainter.
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
    reference: with an inpainter, an autoencoder at the same image size whose ``residual`` map is scored beside
      the inpainter's maps (it is not cached: one forward pass per image).
    progress: show a progress bar.

  Several processes (after ``jax.distributed.initialize()``): call it on every process with the same
  arguments; each computes every ``n``-th image (each on its own default device) and every process returns the
  whole result, the same as one process's (but for the timings). Only process 0 writes the figure.

  Returns:
    A JSON-ready dict: ``settings``, ``n_images``, ``maps`` (name -> ``overall`` and ``per_type`` metrics,
    ``seconds_per_image``), ``images`` (path, defect type, image score of every map, and ``additivity``: the
    image's game's additivity at each region scale, :class:`shapjax.ShapleyResult`, None without Shapley maps
    or for an entry cached before it was recorded), ``additivity_index`` (the semivalue whose sampled coalitions
    the additivity is measured on: an inpainter's first game map's other than ``"loo"``, ``"loo"`` if it is the
    only one, an autoencoder's ``"shapley"``; None without game maps) and ``cached_images`` (how many came
    from the cache).
  """
  names = list(dict.fromkeys(maps))
  for name in names:
    parse_map_name(name)
  names = _check_maps_for_model(names, params, default=tuple(maps) == DEFAULT_MAPS, reference=reference)
  settings = MapSettings(n_perm=int(n_perm), regions=regions, baseline=baseline, estimator=estimator,
                         sigma=float(sigma), seed=int(seed))
  sampling.check_counts(max(settings.regions), settings.n_perm, sampling.DEFAULT_BATCH_SIZE, estimator)
  split = _load_split(data_or_split, params)
  if tuple(split.images.shape[1:]) != tuple(params.config.image_shape):
    raise ValueError(f"test images have shape {split.images.shape[1:]} but the model expects "
                     f"{params.config.image_shape}; load the split at the model's size")
  indices = stratified_subset(split.defect_types, limit)
  inpainter = model.model_kind(params) == "inpainting"
  games = _game_indices(names) if inpainter else []
  shapley = bool(games) if inpainter else _needs_shapley(names)
  # The game whose additivity is reported per image: the first sampled one (leave-one-out's if it is alone).
  reported = next((g for g in games if g != "loo"), games[0] if games else None)
  additivity_index = index_label(reported) if reported is not None else "shapley" if shapley else None
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
    parts = _load_parts(path, shapley and not inpainter) if path is not None else None
    image_key = jax.random.fold_in(key, index)
    if inpainter:
      known = set(parts or ())
      parts = image_parts(params, split.images[index], settings=settings, key=image_key, games=games, parts=parts)
      fresh = set(parts) != known
    elif parts is None:
      parts, fresh = image_parts(params, split.images[index], settings=settings, key=image_key,
                                 shapley=shapley), True
    else:
      fresh = False
    if fresh and path is not None:
      _save_parts(path, parts)
    cached += not fresh
    if reference is not None:
      start = time.perf_counter()
      residual = jax.block_until_ready(_reconstruct_one(reference, jnp.asarray(split.images[index]))[1])
      parts.update(residual=np.asarray(residual), residual_seconds=np.float64(time.perf_counter() - start))
    # Entries cached before the additivity was recorded lack it: None, not a recomputation.
    prefix = "" if not inpainter else f"{index_label(reported)}_" if reported is not None else None
    additivity[index] = [None if prefix is None else _finite_or_none(parts.get(f"additivity_{prefix}{k}"))
                         for k in range(len(settings.regions))]
    for name in names:
      image_maps[name].append(anomaly_map(name, parts, settings=settings, seed=settings.seed + index))
      seconds[name].append(_map_seconds(name, parts))
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
      "additivity_index": additivity_index,
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

