"""Anomaly-detection metrics: image AUROC, pixel AUROC and AUPRO, as in the MVTec AD evaluation.

All functions take host arrays (numpy) and run on the CPU. Maps and masks may be lists of arrays of different
sizes (one pair per image, each map the size of its mask), so that every image is scored at its original
resolution.

References:
  Bergmann et al., "The MVTec Anomaly Detection Dataset: A Comprehensive Real-World Dataset for Unsupervised
  Anomaly Detection", IJCV 2021 (the per-region overlap, PRO, and its area up to a false-positive rate of 0.3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.ndimage
import sklearn.metrics
from jax.typing import ArrayLike

DEFAULT_MAX_FPR = 0.3
"""False-positive rate up to which AUPRO integrates (MVTec AD's choice)."""

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _as_list(arrays, name: str) -> list[np.ndarray]:
  if isinstance(arrays, np.ndarray) or hasattr(arrays, "__array__") and not isinstance(arrays, (list, tuple)):
    arrays = np.asarray(arrays)
    if arrays.ndim == 2:
      arrays = arrays[None]
    if arrays.ndim != 3:
      raise ValueError(f"{name} must be [N, H, W] or a list of [H, W] arrays, got shape {arrays.shape}")
    return list(arrays)
  arrays = [np.asarray(a) for a in arrays]
  if not arrays:
    raise ValueError(f"{name} is empty")
  for i, a in enumerate(arrays):
    if a.ndim != 2:
      raise ValueError(f"{name}[{i}] must be a 2-D [H, W] array, got shape {a.shape}")
  return arrays


def _pairs(maps, masks) -> tuple[list[np.ndarray], list[np.ndarray]]:
  maps = _as_list(maps, "maps")
  masks = _as_list(masks, "masks")
  if len(maps) != len(masks):
    raise ValueError(f"got {len(maps)} maps but {len(masks)} masks")
  for i, (m, g) in enumerate(zip(maps, masks)):
    if m.shape != g.shape:
      raise ValueError(f"maps[{i}] has shape {m.shape} but masks[{i}] has shape {g.shape}; resize the map to "
                       "its mask's size first")
    if not np.all(np.isfinite(m)):
      raise ValueError(f"maps[{i}] contains NaN or inf")
  return maps, [np.asarray(g, bool) for g in masks]


def _binary_auroc(scores: np.ndarray, labels: np.ndarray, what: str) -> float:
  labels = np.asarray(labels, bool)
  n_pos = int(labels.sum())
  if n_pos == 0 or n_pos == labels.size:
    raise ValueError(f"{what} needs both positive and negative examples, got {n_pos} of {labels.size} positive")
  return float(sklearn.metrics.roc_auc_score(labels, scores))


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
  """Area under the ROC curve of image-level anomaly scores.

  Args:
    scores: ``f32[N]`` anomaly score per image (higher = more anomalous).
    labels: ``bool[N]`` or ``int[N]``: 1 for defective images, 0 for good ones.

  Returns:
    AUROC in ``[0, 1]``; 0.5 is chance.

  Example:
    >>> import shapjax
    >>> shapjax.image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
  """
  scores = np.asarray(scores, np.float64).ravel()
  labels = np.asarray(labels).ravel()
  if scores.shape != labels.shape:
    raise ValueError(f"scores has {scores.size} entries but labels has {labels.size}")
  return _binary_auroc(scores, labels, "image_auroc")


def pixel_auroc(maps: ArrayLike | Sequence[ArrayLike], masks: ArrayLike | Sequence[ArrayLike]) -> float:
  """Area under the ROC curve over all pixels of all images.

  Args:
    maps: ``f32[N, H, W]`` or a list of ``f32[H_i, W_i]`` anomaly maps.
    masks: the ground truth, ``bool`` of the same shapes.

  Returns:
    AUROC in ``[0, 1]``.

  Example:
    >>> import numpy as np, shapjax
    >>> masks = np.zeros((2, 4, 4), bool); masks[1, :2, :2] = True
    >>> shapjax.pixel_auroc(masks.astype(np.float32), masks)
    1.0
  """
  maps, masks = _pairs(maps, masks)
  return _binary_auroc(np.concatenate([m.ravel() for m in maps]), np.concatenate([g.ravel() for g in masks]),
                       "pixel_auroc")


def _regions(masks: list[np.ndarray]) -> tuple[np.ndarray, int]:
  """Global ids of the 8-connected components of every mask: ``i64[total pixels]`` (-1 off-defect), count."""
  ids, offset = [], 0
  for g in masks:
    labelled, n = scipy.ndimage.label(g, structure=_EIGHT_CONNECTED)
    labelled = labelled.ravel().astype(np.int64)
    ids.append(np.where(labelled > 0, labelled - 1 + offset, -1))
    offset += n
  return np.concatenate(ids), offset


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
  """Trapezoidal area under the increasing curve ``(x, y)`` from ``x[0]`` to ``x_max`` (interpolated there)."""
  inside = x <= x_max
  xs, ys = x[inside], y[inside]
  if xs[-1] < x_max:
    after = int(np.argmax(x > x_max))
    x0, x1, y0, y1 = x[after - 1], x[after], y[after - 1], y[after]
    y_end = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0) if x1 > x0 else y1
    xs, ys = np.append(xs, x_max), np.append(ys, y_end)
  return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2))


@dataclasses.dataclass(frozen=True)
class PixelMetrics:
  """Pixel-level metrics from one sort of all pixels.

  Attributes:
    pixel_auroc: area under the pixel ROC curve.
    aupro: area under the PRO-versus-FPR curve up to ``max_fpr``, divided by ``max_fpr``.
    max_fpr: the integration limit.
  """

  pixel_auroc: float
  aupro: float
  max_fpr: float


def pixel_metrics(maps: ArrayLike | Sequence[ArrayLike], masks: ArrayLike | Sequence[ArrayLike], *,
                  max_fpr: float = DEFAULT_MAX_FPR) -> PixelMetrics:
  """Pixel AUROC and AUPRO together, sharing one sort of all pixels (the cost of both).

  Every distinct score is a threshold. At threshold ``t`` the false-positive rate is the fraction of all
  defect-free pixels (of all images) scoring ``>= t``; the per-region overlap is the mean, over every
  8-connected component of every ground-truth mask, of the fraction of the component's pixels scoring
  ``>= t``. The PRO curve starts at (0, 0) and ends at (1, 1).

  Args:
    maps: ``f32[N, H, W]`` or a list of ``f32[H_i, W_i]`` anomaly maps (higher = more anomalous).
    masks: ground truth of the same shapes; at least one defective and one defect-free pixel.
    max_fpr: upper limit of the AUPRO integral, in ``(0, 1]``.

  Returns:
    :class:`PixelMetrics`.
  """
  maps, masks = _pairs(maps, masks)
  return grouped_pixel_metrics(maps, masks, {"all": np.ones(len(maps), bool)}, max_fpr=max_fpr)["all"]


def grouped_pixel_metrics(maps: Sequence[ArrayLike], masks: Sequence[ArrayLike],
                          groups: dict[str, ArrayLike], *,
                          max_fpr: float = DEFAULT_MAX_FPR) -> dict[str, PixelMetrics]:
  """:func:`pixel_metrics` of several subsets of the images, from one sort of all pixels.

  Args:
    maps: ``N`` anomaly maps ``f32[H_i, W_i]`` (or ``f32[N, H, W]``).
    masks: ``N`` ground-truth masks of the same shapes.
    groups: name -> ``bool[N]``, the images of each subset (e.g. one defect type plus the good images).
    max_fpr: upper limit of the AUPRO integral, in ``(0, 1]``.

  Returns:
    name -> :class:`PixelMetrics` for every group.
  """
  if not 0 < max_fpr <= 1:
    raise ValueError(f"max_fpr must lie in (0, 1], got {max_fpr}")
  maps, masks = _pairs(maps, masks)
  scores = np.concatenate([m.ravel() for m in maps])
  image = np.concatenate([np.full(m.size, i, np.int32) for i, m in enumerate(maps)])
  region, _ = _regions(masks)
  order = np.argsort(-scores, kind="stable")
  scores, image, region = scores[order], image[order], region[order]
  del order
  results = {}
  for name, members in groups.items():
    members = np.asarray(members, bool)
    if members.shape != (len(maps),):
      raise ValueError(f"group {name!r} must be bool[{len(maps)}], got shape {members.shape}")
    if members.all():
      results[name] = _curve_metrics(scores, region, max_fpr)
    else:
      keep = members[image]  # a boolean selection keeps the sorted order: no second sort
      results[name] = _curve_metrics(scores[keep], region[keep], max_fpr)
  return results


def _curve_metrics(scores: np.ndarray, region: np.ndarray, max_fpr: float) -> PixelMetrics:
  """Both metrics from pixels sorted by decreasing score, with their region ids (-1 = defect-free)."""
  defect = region >= 0
  n_normal = int((~defect).sum())
  present, region_index = np.unique(region[defect], return_inverse=True)
  n_regions = present.size
  if n_regions == 0 or n_normal == 0:
    raise ValueError(f"pixel metrics need defective and defect-free pixels, got {n_regions} defect regions and "
                     f"{n_normal} defect-free pixels")
  # Weight of each pixel in each curve: FPR counts defect-free pixels, PRO averages the regions' recalls.
  region_size = np.bincount(region_index, minlength=n_regions)
  pro_weight = np.zeros(scores.size)
  pro_weight[defect] = 1.0 / (region_size[region_index] * n_regions)
  fpr = np.cumsum(~defect) / n_normal
  tpr = np.cumsum(defect) / int(defect.sum())
  pro = np.cumsum(pro_weight)
  # The curves' points are the last pixel of each run of equal scores (ties pass a threshold together).
  last = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
  fpr, tpr, pro = (np.concatenate([[0.0], a[last]]) for a in (fpr, tpr, pro))
  fpr, pro = np.clip(fpr, 0, 1), np.clip(pro, 0, 1)
  auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
  aupro = _area_up_to(fpr, pro, max_fpr) / max_fpr
  return PixelMetrics(pixel_auroc=auroc, aupro=aupro, max_fpr=float(max_fpr))


def aupro(maps: ArrayLike | Sequence[ArrayLike], masks: ArrayLike | Sequence[ArrayLike], *,
          max_fpr: float = DEFAULT_MAX_FPR) -> float:
  """Normalised area under the per-region-overlap curve up to a false-positive rate (MVTec AD's AUPRO).

  Each 8-connected component of each ground-truth mask counts equally, whatever its size, so a map must find
  small defects as well as large ones. The false-positive rate is over all defect-free pixels of all images,
  and one threshold is swept over all images at once. The area up to ``max_fpr`` (the curve interpolated at
  exactly ``max_fpr``) is divided by ``max_fpr``, so a perfect map scores 1.

  Args:
    maps: ``f32[N, H, W]`` or a list of ``f32[H_i, W_i]`` anomaly maps (higher = more anomalous).
    masks: ground truth of the same shapes.
    max_fpr: upper limit of the integral, in ``(0, 1]``.

  Returns:
    AUPRO in ``[0, 1]``.

  Example:
    >>> import numpy as np, shapjax
    >>> masks = np.zeros((2, 8, 8), bool); masks[0, 1:3, 1:3] = True; masks[1, 5:, 5:] = True
    >>> shapjax.aupro(masks.astype(np.float32), masks)
    1.0
  """
  return pixel_metrics(maps, masks, max_fpr=max_fpr).aupro
